"""The project's own exceptions: what a user did wrong and what to do about it."""


class CldmError(Exception):
    """Base class: the message is meant for the user, as is."""


class CheckpointError(CldmError):
    """A weight file or folder cannot be used (corrupt, unsafe, wrong model, non-finite values)."""


class MissingWeightsError(CldmError):
    """Weights (or a tokenizer) that are needed are not on this machine."""


class InputError(CldmError):
    """A bad argument: an image that cannot be read, a value out of range, mismatched lists."""


class Stopped(CldmError):
    """The user stopped the generation; it ended at a step boundary and left nothing behind."""
