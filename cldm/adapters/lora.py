"""LoRA: low-rank changes to the UNet's and the text encoder's weights, merged for one request and taken out after.

Formats read (from a state dict; `files.read_file` opens the files):
- kohya / A1111 (`lora_unet_<diffusers module, dots as underscores>.lora_down.weight`, `.lora_up.weight`, `.alpha`;
  `lora_te_text_model_...` for the text encoder), LoCon convolutions (resnet and sampler convs) included. SD2.x
  LoRAs have the same names. SDXL's kohya LoRAs name the UNet by the original (SGM) blocks, which are our module
  names (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, `lora_unet_middle_block_1_...`,
  `lora_unet_output_blocks_...`), and the two text encoders `lora_te1_` (CLIP ViT-L, `sd.text`) and `lora_te2_`
  (OpenCLIP bigG, `sd.text_2`); the diffusers-derived names (`lora_unet_down_blocks_1_attentions_0_...`) are read too;
- diffusers / PEFT (`unet.<module>.lora_A.weight` / `lora_B.weight`, `text_encoder.<module>...`, SDXL's
  `text_encoder_2.<module>...`; the older `.lora.down.weight` / `.lora.up.weight`), with `.alpha` when present, else
  the `lora_adapter_metadata` diffusers saves, else alpha = rank. Text-encoder modules are read with or without
  `text_model.` (transformers 5 saves CLIPTextModel without it).

A layer's change is `weight * alpha / rank * up @ down` (convolutions flattened), added in float32 to the base
weight; `apply` keeps a copy of every weight it touches and `restore` puts it back bit for bit. The ControlNet is not
patched, as in A1111. A LoRA made for another family than the base's is refused, both families named, before any
weight changes (`lora_family`: told from its key names and, for real models, its widths; a LoRA of tiny or unknown
widths is refused when its layers do not fit the base's).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from cldm.adapters.emphasis import MAX_PROMPT_CHARS
from cldm.errors import InputError
from cldm.io import keymaps
from cldm.models.family import FAMILIES

log = logging.getLogger(__name__)
StateDict = dict[str, torch.Tensor]
_SUFFIXES = {  # key ending -> role
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up", ".alpha": "alpha",
}  # fmt: skip
# A tag's parts stop at '<' too, so each try scans at most to the next tag: linear in the prompt's length.
_TAG = re.compile(r"<(?:lora|lyco):([^:<>]+)((?::[^:<>]*)*)>", re.IGNORECASE)
# The clean-up after the tags go. A match may start only where a run of spaces does (`(?<!\s)`): without it every
# position inside a long run is tried again and the time grows with the run's length squared.
_EMPTY_ITEMS = re.compile(r"(?<!\s)\s*,\s*(?:,\s*)+")  # ", ," left between commas -> one ", "
_SPACE_COMMA = re.compile(r"(?<!\s)\s+,")
_SPACES = re.compile(r"\s{2,}")
# alpha / rank: trainers write alpha between 1 and a few times the rank (rsLoRA's alpha / sqrt(rank) stays in the
# tens); past this the file is damaged (an alpha of 1e30 merges to weights that overflow every activation).
# LoRAs in one request: A1111 prompts use a handful; each one merged costs a pass over most of the model's weights.
MAX_REQUEST_LORAS = 16
MAX_LORA_SCALE = 1000.0
# float16's largest value: SD1.5 weights ship in half precision, and a merged weight past it cannot be stored there
# (nor be right in float32: it overflows the activations into NaN pictures).
MAX_MERGED_WEIGHT = 65504.0
# The width of the text states the UNet's cross-attention reads (to_k / to_v take them), and of the text encoders'
# hidden states, in the real models of each family: how a LoRA's family shows in its shapes.
_CONTEXT_FAMILY = {768: "SD1.5", 1024: "SD2.x", 2048: "SDXL"}
_TEXT_FAMILIES = {768: ("SD1.5", "SDXL"), 1024: ("SD2.x",), 1280: ("SDXL",)}  # CLIP ViT-L, OpenCLIP ViT-H, bigG
_SGM_UNET = ("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks")
_PART_NAMES = {"unet": "UNet", "text": "text encoder", "text_2": "second text encoder"}


@dataclass
class LoraLayer:
    part: str  # "unet", "text" or "text_2" (SDXL's second text encoder)
    key: str  # the weight's key in that module
    down: torch.Tensor
    up: torch.Tensor
    scale: float  # alpha / rank

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """up @ down * alpha / rank, shaped like the weight it changes (float32)."""
        up, down = self.up.float().flatten(1), self.down.float().flatten(1)
        return (up @ down * self.scale).reshape(shape)


@dataclass
class Lora:
    name: str
    layers: list[LoraLayer] = field(default_factory=list)
    skipped: int = 0  # layers of the file that this model does not have (left out, as A1111 does)
    hash: str = ""  # A1111's short hash of the file, for the "Lora hashes" of the PNG parameters
    family: str = ""  # the family of the base it was matched to (`parse`); `apply` refuses it on another


def targets(sd) -> dict[str, tuple[str, str]]:
    """Every name a LoRA file may give a layer of this model -> (part, our weight key). SD1.5 and SD2.x: kohya's
    `lora_unet_<diffusers module>` / `lora_te_`, PEFT's `unet.` / `text_encoder.`; SDXL (two text encoders): kohya's
    `lora_unet_<our (SGM) module>` and `lora_unet_<diffusers module>`, `lora_te1_` / `lora_te2_`, PEFT's `unet.`,
    `text_encoder.` / `text_encoder_2.`."""
    table: dict[str, tuple[str, str]] = {}
    xl = getattr(sd, "text_2", None) is not None
    unet_keys = [k for k, v in sd.unet.state_dict().items() if k.endswith(".weight") and v.ndim in (2, 4)]
    for ours, theirs in keymaps.key_table(unet_keys, keymaps.unet_modules(sd.config.unet)).items():
        module = theirs[: -len(".weight")]
        if xl:  # kohya trains SDXL on the original UNet: its names are ours
            table["lora_unet_" + ours[: -len(".weight")].replace(".", "_")] = ("unet", ours)
        table["lora_unet_" + module.replace(".", "_")] = ("unet", ours)
        table["unet." + module] = ("unet", ours)
    encoders = [("text", sd.text, "lora_te1_" if xl else "lora_te_", "text_encoder.")]
    if xl:
        encoders.append(("text_2", sd.text_2, "lora_te2_", "text_encoder_2."))
    for part, text, kohya, peft in encoders:
        for k, v in text.state_dict().items():
            if k.endswith(".weight") and v.ndim == 2 and k.startswith("transformer.text_model.encoder."):
                module = k[len("transformer.") : -len(".weight")]
                table[kohya + module.replace(".", "_")] = (part, k)
                table[peft + module] = (part, k)
                table[peft + module.removeprefix("text_model.")] = (part, k)  # transformers 5's CLIPTextModel
    return table


def lora_family(groups: dict[str, dict[str, torch.Tensor]]) -> tuple[list[str], list[str]]:
    """The families a LoRA may be made for (FAMILIES' order; all of them when nothing tells) and what tells it, from
    its layers (name -> {"down": ..., "up": ...}): the key names (`lora_te1_`/`lora_te2_`/`text_encoder_2.` and
    kohya's SGM block names are SDXL's; `lora_te_` is a one-encoder family's) and the widths of the real models
    (cross-attention reading 768-, 1024- or 2048-wide text states; 768-, 1024- or 1280-wide text encoders). Evidence
    that contradicts the rest is left out of the verdict (the shapes are checked against the base after)."""
    names = list(groups)
    found: list[tuple[set[str], str]] = []
    two = [p for p in ("lora_te1_", "lora_te2_", "text_encoder_2.") if any(n.startswith(p) for n in names)]
    if two:
        found.append(({"SDXL"}, f"it has {' and '.join(two)} keys: SDXL's two text encoders"))
    if any(n.startswith(_SGM_UNET) for n in names):
        found.append(({"SDXL"}, "its UNet layers have kohya's SDXL block names (lora_unet_input_blocks_...)"))
    if any(n.startswith("lora_te_") for n in names):
        found.append(({"SD1.5", "SD2.x"}, "it has lora_te_ keys: one text encoder"))

    def width(group: str) -> int | None:
        down = groups[group].get("down")
        return int(down.flatten(1).shape[1]) if down is not None and down.ndim >= 2 else None

    contexts = {width(n) for n in names if re.search(r"attn2[._]to_[kv]$", n)} - {None}
    if len(contexts) == 1 and (w := contexts.pop()) in _CONTEXT_FAMILY:
        found.append(({_CONTEXT_FAMILY[w]}, f"it changes {w}-wide cross-attention"))
    texts = {width(n) for n in names if re.search(r"self_attn[._]q_proj$", n) and not n.startswith(
        ("lora_te2_", "text_encoder_2."))} - {None}  # fmt: skip
    if len(texts) == 1 and (w := texts.pop()) in _TEXT_FAMILIES:
        found.append((set(_TEXT_FAMILIES[w]), f"its text encoder is {w} wide"))
    families, why = set(FAMILIES), []
    for fams, reason in found:
        if families & fams:
            families &= fams
            why.append(reason)
    return [f for f in FAMILIES if f in families], why


def _families(names: list[str]) -> str:
    return " or ".join(names)


def _peft_alphas(metadata: dict[str, str] | None, name: str) -> dict[str, tuple[float, float]]:
    """diffusers' `lora_adapter_metadata` (the PEFT config it saves beside the weights): part -> (alpha, rank)."""
    if not metadata or "lora_adapter_metadata" not in metadata:
        return {}
    try:
        config = json.loads(metadata["lora_adapter_metadata"])
    except ValueError:
        return {}
    if not isinstance(config, dict):
        return {}
    out = {}
    for part in ("unet", "text_encoder", "text_encoder_2"):
        if config.get(f"{part}.use_dora"):
            raise InputError("DoRA LoRAs (use_dora) are not supported; use a plain LoRA.")
        if f"{part}.lora_alpha" in config and f"{part}.r" in config:
            alpha, rank = _number(config[f"{part}.lora_alpha"]), _number(config[f"{part}.r"])
            if alpha is None or rank is None or rank <= 0:
                raise InputError(f"{name}: its lora_adapter_metadata gives lora_alpha {config[f'{part}.lora_alpha']!r}"
                                 f" and r {config[f'{part}.r']!r} for the {part}, which no LoRA has: the file is "
                                 "damaged. Use another copy of the file or another LoRA.")  # fmt: skip
            if config.get(f"{part}.use_rslora"):  # rank-stabilised: the scale is alpha / sqrt(r), not alpha / r
                alpha *= rank**0.5
            out[part] = (alpha, rank)
    return out


def _number(value) -> float | None:
    """A finite number from a JSON value, else None."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def parse(state: StateDict, sd, name: str, metadata: dict[str, str] | None = None) -> Lora:
    """A LoRA state dict (and its file's metadata) -> the layers it changes in `sd`; InputError when it is not a
    LoRA for this model."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        for suffix, role in _SUFFIXES.items():
            if key.endswith(suffix):
                groups.setdefault(key[: -len(suffix)], {})[role] = value
                break
    if not groups:
        if any(("hada_w" in k or "lokr_w" in k) for k in state):
            raise InputError(f"{name} is a LyCORIS LoHa/LoKr file: not supported; use a plain LoRA (or LoCon).")
        raise InputError(f"{name} is not a LoRA (no lora_down/lora_up or lora_A/lora_B weights).")
    if any(k.endswith(".dora_scale") for k in state):
        raise InputError(f"{name} is a DoRA (dora_scale weights): not supported; use a plain LoRA.")
    base = sd.family.name
    families, why = lora_family(groups)
    if base not in families:
        raise InputError(f"{name} is a LoRA for {_families(families)} ({'; '.join(why)}); this base is {base}. Use "
                         f"a LoRA made for {base}.")  # fmt: skip
    table = targets(sd)
    params = {part: m.state_dict() for part, m in _modules(sd).items()}
    unknown = sorted(g for g in groups if g not in table)
    if len(unknown) == len(groups):
        raise InputError(f"{name}: none of its {len(groups)} layers exists in an {base} model (first: {unknown[0]})"
                         f"{_other_family(groups, sd, families)}.")  # fmt: skip
    if unknown:  # A1111 applies the layers it knows and names the others
        log.warning("LoRA %s: %d layers left out, not in this model (first: %s)", name, len(unknown), unknown[0])
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise InputError(f"{name} holds NaN or infinite values (in {bad[0]}): the file is damaged.")
    lora, alphas = Lora(name, family=base), _peft_alphas(metadata, name)
    lora.skipped = len(unknown)
    for group, parts in groups.items():
        if group in unknown:
            continue
        if "down" not in parts or "up" not in parts:
            raise InputError(f"{name}: layer {group} lacks its {'up' if 'down' in parts else 'down'} weight.")
        part, key = table[group]
        down, up = parts["down"], parts["up"]
        rank = down.shape[0] if down.ndim >= 2 else 0
        if rank == 0 or up.ndim < 2 or "alpha" in parts and parts["alpha"].numel() != 1:
            shapes = f"up {tuple(up.shape)} x down {tuple(down.shape)}"
            shapes += f", alpha {tuple(parts['alpha'].shape)}" if "alpha" in parts else ""
            raise InputError(f"{name}: layer {group} is damaged ({shapes}; a LoRA layer has a rank of 1 or more "
                             "and one alpha). Use another copy of the file or another LoRA.")  # fmt: skip
        target = params[part][key]
        if up.shape[0] != target.shape[0] or down.flatten(1).shape[1] != target[0].numel() or up.shape[1] != rank:
            width = down.flatten(1).shape[1]
            sd2 = base == "SD1.5" and (part == "text" and width == 1024 or part == "unet" and width in (1024, 2048))
            why = " (an SD2.x or SDXL LoRA)" if sd2 else _other_family(groups, sd, families)
            raise InputError(f"{name}: layer {group} has the shape {tuple(up.shape)} x {tuple(down.shape)}, which "
                             f"does not fit this {base} model's {tuple(target.shape)}{why}. Use a LoRA made for "
                             f"{base}.")  # fmt: skip
        peft = alphas.get("unet" if group.startswith("unet.") else
                          "text_encoder_2" if group.startswith("text_encoder_2.") else "text_encoder")  # fmt: skip
        if "alpha" in parts:
            alpha = float(parts["alpha"])
        elif peft is not None:  # diffusers' saved config: alpha for its rank, scaled to this layer's rank
            alpha = peft[0] * rank / peft[1]
        else:
            alpha = float(rank)
        if not abs(alpha / rank) <= MAX_LORA_SCALE:  # not finite, or absurd
            raise InputError(f"{name}: layer {group} has alpha {alpha:g} for rank {rank} (a scale of "
                             f"{alpha / rank:g}; LoRAs use at most {MAX_LORA_SCALE:g}): the file is damaged. Use "
                             "another copy or another LoRA.")  # fmt: skip
        lora.layers.append(LoraLayer(part, key, down, up, alpha / rank))
    return lora


def _modules(sd) -> dict[str, torch.nn.Module]:
    """The modules a LoRA changes, by part."""
    out = {"unet": sd.unet, "text": sd.text}
    if getattr(sd, "text_2", None) is not None:
        out["text_2"] = sd.text_2
    return out


def _other_family(groups: dict[str, dict[str, torch.Tensor]], sd, families: list[str]) -> str:
    """Why a LoRA whose layers do not fit the base is another family's: its cross-attention's text width against
    the base's, and the families its names leave (for tiny or unknown widths that is all the names can tell)."""
    base = sd.family.name
    hints = []
    others = [f for f in families if f != base]
    if others and len(families) < len(FAMILIES):
        hints.append(f"it is made for {_families(others)}" if base not in families else
                     f"it may be made for {_families(families)}")  # fmt: skip
    widths = {int(p["down"].flatten(1).shape[1]) for n, p in groups.items()
              if re.search(r"attn2[._]to_[kv]$", n) and p.get("down") is not None and p["down"].ndim >= 2}  # fmt: skip
    context = sd.config.unet.context_dim
    if len(widths) == 1 and (w := widths.pop()) != context:
        hints.append(f"its cross-attention reads {w}-wide text states, this {base} base's {context}-wide")
    return f" ({'; '.join(hints)})" if hints else ""


def apply(sd, loras: Iterable[tuple]) -> dict[tuple[str, str], torch.Tensor]:
    """Merge the LoRAs into `sd`'s UNet and text encoder: (lora, weight) or (lora, UNet weight, text-encoder
    weight). Returns the touched weights' originals, for `restore`."""
    modules = _modules(sd)
    originals: dict[tuple[str, str], torch.Tensor] = {}
    params = {part: dict(m.named_parameters()) for part, m in modules.items()}
    sane: list[tuple[torch.Tensor, str, float, LoraLayer]] = []  # per merge: is every weight finite and in range
    loras = list(loras)
    base = sd.family.name
    for lora, *_ in loras:  # before any weight changes
        if lora.family and lora.family != base:
            raise InputError(f"LoRA {lora.name} was read for an {lora.family} base; this base is {base}. Use a LoRA "
                             f"made for {base}.")  # fmt: skip
    try:
        with torch.no_grad():
            for lora, weight, *text in loras:
                for layer in lora.layers:
                    w = text[0] if layer.part != "unet" and text and text[0] is not None else weight
                    p = params[layer.part][layer.key]
                    if p.shape[0] != layer.up.shape[0] or p[0].numel() != layer.down[0].numel():
                        raise InputError(f"LoRA {lora.name} was matched to another model: {layer.key} does not fit.")
                    originals.setdefault((layer.part, layer.key), p.detach().clone())
                    delta = layer.delta(p.shape).to(p.device)
                    p.copy_((p.float() + w * delta).to(p.dtype))
                    sane.append(((p.abs() <= MAX_MERGED_WEIGHT).all(), lora.name, w, layer))  # NaN fails too
            _check_merged(sane)
    except BaseException:
        restore(sd, originals)  # all or nothing: a merge that fails halfway leaves the base as it was
        raise
    return originals


def _check_merged(sane: list[tuple[torch.Tensor, str, float, LoraLayer]]) -> None:
    """InputError naming the first LoRA whose merge left a weight non-finite or past MAX_MERGED_WEIGHT."""
    bad = next((item for item in sane if not bool(item[0])), None)  # the first read waits for every merge
    if bad is None:
        return
    _, name, w, layer = bad
    raise InputError(f"LoRA {name} at weight {w:g} makes the {_PART_NAMES.get(layer.part, layer.part)}'s "
                     f"{layer.key} infinite, NaN or past {MAX_MERGED_WEIGHT:g}: the file is damaged (its values or "
                     "alpha are absurd). Use another copy of the file or another LoRA.")  # fmt: skip


def restore(sd, originals: dict[tuple[str, str], torch.Tensor]) -> None:
    """Put back the weights `apply` changed, exactly."""
    params = {part: dict(m.named_parameters()) for part, m in _modules(sd).items()}
    with torch.no_grad():
        for (part, key), value in originals.items():
            params[part][key].copy_(value)


def prompt_tags(prompt: str) -> tuple[str, list[tuple[str, float, float]]]:
    """A1111's LoRA tags: (the prompt without them, [(name, UNet weight, text-encoder weight)]).

    `<lora:name>` (weight 1), `<lora:name:0.8>`, `<lora:name:te:unet>` (A1111's order: the first number is the text
    encoder's, the second the UNet's, which defaults to the first), named `te=`/`unet=` (`dyn=` is ignored), and the
    `<lyco:...>` spelling. A name given twice is one LoRA whose weights are the sums (what two merges of it would
    give, for the cost of one). The prompt as written, tags included, may be at most MAX_PROMPT_CHARS long and name
    at most MAX_REQUEST_LORAS LoRAs; InputError otherwise."""
    if len(prompt) > MAX_PROMPT_CHARS:  # before any pattern runs: the tags count, as everything the user sent
        raise InputError(f"The prompt is {len(prompt)} characters long (LoRA tags included); at most "
                         f"{MAX_PROMPT_CHARS}. Shorten it.")  # fmt: skip
    tags: dict[str, tuple[float, float]] = {}  # name -> (UNet weight, text-encoder weight), in the prompt's order
    for m in _TAG.finditer(prompt):
        positional, named = [], {}
        try:
            for arg in (a.strip() for a in m.group(2).split(":")[1:]):
                if "=" in arg:
                    key, _, value = arg.partition("=")
                    named[key.strip().lower()] = float(value)
                elif arg:
                    positional.append(float(arg))
        except ValueError as e:
            raise InputError(f"{m.group(0)}: the LoRA weights must be numbers, e.g. <lora:name:0.8>.") from e
        te = named.get("te", positional[0] if positional else 1.0)
        unet = named.get("unet", positional[1] if len(positional) > 1 else te)
        name = m.group(1).strip()
        unet_sum, te_sum = tags.get(name, (0.0, 0.0))
        tags[name] = (unet_sum + unet, te_sum + te)
    if len(tags) > MAX_REQUEST_LORAS:
        raise InputError(f"The prompt names {len(tags)} LoRAs; at most {MAX_REQUEST_LORAS} per picture. Leave some "
                         "out.")  # fmt: skip
    if not tags:
        return prompt, []
    clean = _EMPTY_ITEMS.sub(", ", _TAG.sub("", prompt))  # no empty items left between commas
    clean = _SPACES.sub(" ", _SPACE_COMMA.sub(",", clean))
    return clean.strip(" ,"), [(name, unet, te) for name, (unet, te) in tags.items()]
