"""The guidance extras as command-line options (--cfg-rescale, --freeu, --pag-scale, --pag-layers) and the
GenerationRequest fields they make, for the commands that build requests from a command line (`cldm.cli`'s
generate); `cldm.pipeline.guidance` computes them."""

from __future__ import annotations

import argparse
from pathlib import Path

from cldm.errors import InputError
from cldm.io import checkpoints
from cldm.models.family import FAMILIES, SD15, ModelFamily, family
from cldm.models.freeu import FreeU
from cldm.pipeline.guidance import PAG_DEFAULT_LAYERS


def add_guidance_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cfg-rescale", type=float, default=0.0, metavar="PHI",
                   help="0..1: the guided prediction brought back to the conditional one's spread (diffusers' "
                   "guidance_rescale, 0.7 in the paper): against washed-out or over-bright pictures at high --cfg")  # fmt: skip
    p.add_argument("--freeu", type=float, nargs="*", metavar="B",
                   help="FreeU: backbone factors b1 b2 and skip factors s1 s2; with no numbers the published ones "
                   "for the base's family (SD1.5 1.5 1.6 0.9 0.2, SD2 1.4 1.6 0.9 0.2, SDXL 1.3 1.4 0.9 0.2)")  # fmt: skip
    p.add_argument("--pag-scale", type=float, default=0.0, help="perturbed-attention guidance (0: off; 3 is usual)")
    p.add_argument("--pag-layers", nargs="+", default=list(PAG_DEFAULT_LAYERS), metavar="LAYER",
                   help="PAG's self-attention layers by diffusers' names: mid (default), down, up, down_blocks.1, "
                   "up_blocks.0.attentions.0 ...")  # fmt: skip


def guidance_from_args(a: argparse.Namespace) -> dict:
    """The options as GenerationRequest fields."""
    return {"cfg_rescale": a.cfg_rescale, "freeu": freeu_from_args(a), "pag_scale": a.pag_scale,
            "pag_layers": tuple(a.pag_layers)}  # fmt: skip


def freeu_from_args(a: argparse.Namespace) -> FreeU | None:
    """`--freeu B1 B2 S1 S2`, or `--freeu` alone: the published factors of the base's family."""
    if a.freeu is None:
        return None
    if not a.freeu:
        return base_family(a.base).freeu
    if len(a.freeu) != 4:
        raise InputError(f"give --freeu four numbers B1 B2 S1 S2, or none for the family's (got {len(a.freeu)})")
    return FreeU(*a.freeu)


def base_family(base: str) -> ModelFamily:
    """The family of a base, told from its weights without loading them; a hub id not downloaded yet by the
    family's reference repository (SD1.5 for others)."""
    if Path(base).exists():
        return family(checkpoints.peek_family(base)[0])
    return next((f for f in FAMILIES.values() if f.base_repo == base), SD15)
