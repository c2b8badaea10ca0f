"""The annotators' own exceptions: user-caused problems the UI shows as a message."""

from __future__ import annotations


class AnnotatorError(ValueError):
    """A problem the user can fix: unknown annotator, bad image, out-of-range parameter, unusable weights."""


class MissingAnnotatorWeights(AnnotatorError):
    """An annotator's weight file is neither in the local models folder nor in the Hugging Face cache."""
