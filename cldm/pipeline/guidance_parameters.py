"""The guidance extras in the PNG parameters text, under the keys the A1111 world writes for them: Forge's "Rescale
CFG", Forge's FreeU extension (freeu_enabled, freeu_b1 ... freeu_s2) and the sd-perturbed-attention extension
(pag_enabled, pag_scale, pag_adaptive_scale); the PAG layers, which those do not name as diffusers does, go under
"pag_layers" (diffusers' names, comma-separated); DDIM's eta as A1111's "Eta DDIM" and TCD's gamma as "Eta". Settings
that are off are left out."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cldm.models.freeu import FreeU
from cldm.pipeline.guidance import PAG_DEFAULT_LAYERS, uses_pag
from cldm.pipeline.key_values import finite_number

if TYPE_CHECKING:
    from cldm.pipeline.request import GenerationRequest

FREEU_KEYS = ("b1", "b2", "s1", "s2")
LAYER_SEPARATOR = ", "
ETA_KEYS = {"ddim": "Eta DDIM", "tcd": "Eta"}  # the samplers whose eta the request carries (TCD: its gamma)


def guidance_fields(r: GenerationRequest) -> list[str]:
    """The "Key: value" items of the request's guidance extras that are on."""
    out = []
    if r.eta > 0 and r.sampler in ETA_KEYS:  # A1111 writes DDIM's as "Eta DDIM"; TCD's gamma under plain "Eta"
        out.append(f"{ETA_KEYS[r.sampler]}: {r.eta}")
    if r.cfg_rescale > 0:
        out.append(f"Rescale CFG: {r.cfg_rescale}")
    if r.freeu is not None:
        out += ["freeu_enabled: True", *(f"freeu_{k}: {getattr(r.freeu, k)}" for k in FREEU_KEYS)]
    if uses_pag(r):
        out += ["pag_enabled: True", f"pag_scale: {r.pag_scale}"]
        if r.pag_adaptive_scale > 0:
            out.append(f"pag_adaptive_scale: {r.pag_adaptive_scale}")
        out.append(f'pag_layers: "{LAYER_SEPARATOR.join(r.pag_layers)}"')
    return out


def read_guidance(fields: dict[str, str]) -> dict:
    """The guidance extras of a parsed text as GenerationRequest fields; the defaults (off) for what it leaves out
    or cannot be read."""
    freeu = None
    if fields.get("freeu_enabled", "").lower() == "true":
        values = [finite_number(fields.get(f"freeu_{k}")) for k in FREEU_KEYS]
        freeu = FreeU(*values) if None not in values else None
    pag_on = fields.get("pag_enabled", "true").lower() == "true"
    layers = tuple(n.strip() for n in fields.get("pag_layers", "").split(LAYER_SEPARATOR) if n.strip())
    return {
        "eta": finite_number(fields.get("Eta DDIM", fields.get("Eta"))) or 0.0,
        "cfg_rescale": finite_number(fields.get("Rescale CFG")) or 0.0,
        "freeu": freeu,
        "pag_scale": (finite_number(fields.get("pag_scale")) or 0.0) if pag_on else 0.0,
        "pag_layers": layers or PAG_DEFAULT_LAYERS,
        "pag_adaptive_scale": finite_number(fields.get("pag_adaptive_scale")) or 0.0,
    }
