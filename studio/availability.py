"""What this machine can run, decided once when the app starts: the base (the demo model when SD1.5 weights cannot
be had) and which condition tabs can run.

A tab runs when its ControlNet is here (or can be downloaded: the hub answered at start-up) and the preprocessor it
starts on has its weights; with a model card (the demo model) only the card's conditions have ControlNets. Offline,
a default preprocessor whose weights are missing gives way to one that runs: the example's, or "none" on an example
picture that already is a hint. The page greys a tab that cannot run, and shows each tab's note: one line saying
which file to get and where to put it. Nothing here goes to the network but `choose_base`'s one look for a hub base.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import annotators
from annotators.weights import local_folder
from cldm.hints.conditions import BY_KEY, CONDITIONS, PREPROCESSOR_NONE, Condition
from cldm.io import locate
from cldm.io.model_card import ModelCard, card_for
from cldm.models.family import SD15

Example = tuple[str, str, str]  # picture in assets/examples, preprocessor, prompt

# Pictures in assets/examples that already are a condition's hint (drawn by assets/make_examples.py), with a prompt
# for each: a tab whose own preprocessor cannot run here starts on one, with the preprocessor "none".
HINT_EXAMPLES: dict[str, tuple[str, str]] = {
    "seg": ("shapes_seg.png", "a blue circle and a yellow star on a pink background"),
    "openpose": ("pose.png", "a dancer on a stage, spotlight"),
}
RESTART = "then restart the app"
DEMO_DIR = Path(__file__).resolve().parents[1] / "assets" / "demo"
DEMO_BASE = "shapes_sd.safetensors"


@dataclass(frozen=True)
class TabState:
    """A condition tab as the page starts it."""

    ready: bool  # False: the tab is greyed, its Generate and Preview hint disabled
    note: str  # one line: which file to get and where to put it ("" when nothing is missing)
    preprocessor: str  # the preprocessor it starts on
    example: Example | None  # its example row (None: no example runs here)


def _labels(card: ModelCard) -> str:
    """The names of the card's conditions, as the tabs show them."""
    return ", ".join(BY_KEY[k].label if k in BY_KEY else k for k in card.conditions)


def controlnet_problem(cond: Condition, card: ModelCard | None, family: str) -> str:
    """Why no request can use `cond`'s ControlNet whatever is downloaded ("" when one can): the model card has none
    for it, or no ControlNet of the base's family is known for it."""
    if card is not None and cond.key not in card.conditions:
        return (
            f"The {card.name} model only has ControlNets for {_labels(card)}: for {cond.label}, start the app on SD1.5 "
            f"weights (python app.py --base FILE) with {cond.model_file} in the models folder."
        )
    if cond.weights(family) is None:
        return f"No {family} ControlNet is known for {cond.label}: pick an SD1.5 base for it."
    return ""


def _missing_controlnet(cond: Condition, card: ModelCard | None, models_dir: str | None, offline: bool,
                        family: str) -> str:  # fmt: skip
    """The note of a tab whose ControlNet cannot be had ("" when it can)."""
    problem = controlnet_problem(cond, card, family)
    if problem:
        return problem
    w = cond.weights(family)
    folder = Path(models_dir or "models")
    if card is not None:  # a card's ControlNets sit beside its base, under the table's names
        if locate.controlnet_on_disk(w.stem, w.repo, models_dir, w.file):
            return ""
        return f"The {card.name} model's {cond.label} ControlNet is missing: put {w.stem}.safetensors in {folder}/."
    if not offline or locate.controlnet_on_disk(w.stem, w.repo, models_dir, w.file):
        return ""
    if w.file:
        get = f"{w.file} from {w.repo} into {folder}/"
    elif w.repo.startswith("lllyasviel/"):
        get = f"{cond.model_file} from {SD15.controlnet_repo} into {folder}/"
    else:
        get = f"the diffusers folder {w.repo} into {folder / w.stem}/"
    return f"Offline, and the {cond.label} ControlNet is not here: get {get}, {RESTART}."


def _weights_line(preprocessor: str, files: Sequence[annotators.WeightFile], models_dir: str | None) -> str:
    """One line: "Depth (MiDaS) needs dpt_hybrid-midas-501f0c75.pt from lllyasviel/Annotators in models/annotators/"."""
    label = annotators.ANNOTATORS[preprocessor].label
    folder, item = local_folder(models_dir or "models"), files[0]
    if item.folder:  # a transformers model: a folder of its own
        return f"{label} needs the model {item.repo} in {folder / item.folder}/"
    return f"{label} needs {' and '.join(f.filename for f in files)} from {item.repo} in {folder}/"


def _example(cond: Condition, card: ModelCard | None) -> Example:
    """The tab's example: the model card's for its condition where it has one, else the condition table's."""
    if card is not None and cond.key in card.examples:
        e = card.examples[cond.key]
        return e["image"], e["preprocessor"], e["prompt"]
    return cond.example


def tab_state(cond: Condition, card: ModelCard | None, models_dir: str | None, offline: bool,
              family: str = SD15.name) -> TabState:  # fmt: skip
    """Whether `cond`'s tab can run here, the preprocessor and example it starts on, and its note."""
    example = _example(cond, card)
    # a card's example sets the preprocessor the tab starts on (the demo seg example's map needs "none")
    default = example[1] if card is not None and example[1] in cond.preprocessors else cond.preprocessors[0]
    missing = _missing_controlnet(cond, card, models_dir, offline, family)
    if missing:
        return TabState(False, missing, default, example)

    def runs(preprocessor: str) -> bool:  # online, weights are downloaded when first used
        return not offline or not annotators.missing_weights(preprocessor, models_dir)

    shown = example if runs(example[1]) else None
    if runs(default):
        return TabState(True, "", default, shown)
    need = f"Offline: {_weights_line(default, annotators.missing_weights(default, models_dir), models_dir)}"
    if shown is not None and example[1] in cond.preprocessors:
        return TabState(True, f"{need}; until then it starts on the preprocessor {example[1]}.", example[1], shown)
    if PREPROCESSOR_NONE in cond.preprocessors:
        if cond.key in HINT_EXAMPLES:
            picture, prompt = HINT_EXAMPLES[cond.key]
            shown = (picture, PREPROCESSOR_NONE, prompt)
        until = f"until then upload a ready {cond.label} hint (preprocessor none)"
        return TabState(True, f"{need}; {until}.", PREPROCESSOR_NONE, shown)
    return TabState(False, f"{need}, {RESTART}.", default, None)


def tab_states(card: ModelCard | None, models_dir: str | None, offline: bool,
               family: str = SD15.name) -> dict[str, TabState]:  # fmt: skip
    """Every condition tab's state, by condition key."""
    return {cond.key: tab_state(cond, card, models_dir, offline, family) for cond in CONDITIONS}


def ready_first(states: dict[str, TabState], preferred: Sequence[str], allowed: Sequence[Condition]) -> list[str]:
    """Conditions for units that start switched on (Multi's): the preferred ones that run here, then the others
    that run here, in table order, then the rest; only those in `allowed`."""
    keys = [c.key for c in allowed]
    order = [k for k in preferred if k in keys] + [k for k in keys if k not in preferred]
    return [k for k in order if states[k].ready] + [k for k in order if not states[k].ready]


def choose_base(base: str, demo: bool) -> tuple[str, ModelCard | None, str]:
    """(base, its model card, banner): the demo model when asked for, or when the SD1.5 weights cannot be had."""
    if not demo and locate.base_available(base):
        card = card_for(base)
        return base, card, f"Base model: `{base}`." + (f" {card.description}" if card else "")
    if not (DEMO_DIR / DEMO_BASE).is_file():
        return base, None, f"Base model: `{base}` (not available here, and the demo model is missing too)."
    card = card_for(DEMO_DIR / DEMO_BASE)
    why = "as asked (--demo)" if demo else f"because `{base}` is not on this machine and the hub cannot be reached"
    banner = (
        f"**Demo model** ({why}): {card.description} The {_labels(card)} tabs run on it, e.g. "
        '"a green triangle on a white background" with a sketched triangle. The other tabs need SD1.5 weights: '
        "`python app.py --base FILE`."
    )
    return str(DEMO_DIR / DEMO_BASE), card, banner
