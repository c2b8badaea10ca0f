"""A1111's "parameters" text: `parameters()` writes it into our PNGs, `parse_parameters()` reads it back (the
prompts, every "Key: value" field and the ControlNet units), from our PNGs and from AUTOMATIC1111's webui with its
ControlNet extension, which writes the same layout:

    prompt (any number of lines)
    Negative prompt: negative prompt (any number of lines)
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, ControlNet 0: "Module: canny, Weight: 1, ..."

`parse_parameters` turns it into an Infotext whose typed fields speak our vocabulary (sampler keys, ResizeMode,
ControlMode: `cldm.pipeline.vocabulary`), so a tab can take them back. Whatever cannot be read stays, as text, in `fields` and
in each unit's `raw`; only a text without the key-value line at all is an InputError.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from cldm.adapters.emphasis import MAX_PROMPT_CHARS
from cldm.errors import InputError
from cldm.pipeline import key_values
from cldm.pipeline.guidance_parameters import guidance_fields, read_guidance
from cldm.pipeline.key_values import finite_number
from cldm.pipeline.prompts import embeddings_used
from cldm.pipeline.request import ControlUnit, GenerationRequest, stem
from cldm.pipeline.vocabulary import Choice, ControlMode, InpaintMode, ResizeMode, Sampler

# Characters of a parameters text that are read: what this app writes at most (two prompts at their limit, LoRA
# tags and the fields), with room; A1111's own texts run to a few thousand.
MAX_TEXT = 2 * MAX_PROMPT_CHARS + 10_000
_FLAT_KEY = re.compile(r"ControlNet-(\d{1,3}) (.+)", re.IGNORECASE)
NO_PARAMETERS = "This picture carries no generation parameters (a PNG written by this app or by A1111 has them)"
MIN_FIELDS = 3  # A1111's rule: the last line is the key-value line only with at least this many "Key: value"s

# A unit's key: "ControlNet 0", "ControlNet-1", or "ControlNet" alone (unit 0) from old extension versions.
_UNIT_KEY = re.compile(r"ControlNet(?:[ -]([0-9]{1,3}))?", re.IGNORECASE)
_SIZE = re.compile(r"([0-9]{1,6})\s*x\s*([0-9]{1,6})")
# "control_v11p_sd15_canny [d14c016b]": the model's short hash (a match starts only where a run of spaces does)
_HASH = re.compile(r"(?<!\s)\s*\[[0-9A-Za-z]+\]$")


@dataclass(frozen=True)
class UnitInfo:
    """One ControlNet unit as the text describes it, in our names; `raw` holds its "Key: value"s as written."""

    index: int
    module: str = ""  # the preprocessor ("canny", "depth_midas", "none"); "" when not written
    model: str = ""  # without the " [hash]" A1111 appends
    scale: float = 1.0  # A1111's "Weight"
    start: float = 0.0
    end: float = 1.0
    resize_mode: ResizeMode = ResizeMode.CROP
    pixel_perfect: bool = False
    control_mode: ControlMode = ControlMode.BALANCED
    processor_res: int | None = None
    threshold_a: float | None = None
    threshold_b: float | None = None
    raw: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Infotext:
    """A parsed "parameters" text. `fields` holds every "Key: value" of the key-value line, values unquoted; the
    properties read the common ones (None when a field is missing or is not a number)."""

    prompt: str
    negative_prompt: str
    fields: dict[str, str]
    units: tuple[UnitInfo, ...] = ()

    @property
    def steps(self) -> int | None:
        return _int(self.fields.get("Steps"))

    @property
    def sampler_label(self) -> str | None:
        """The sampler as written ("DPM++ 2M Karras", or "DPM++ 2M" with a separate "Schedule type")."""
        return self.fields.get("Sampler")

    @property
    def sampler(self) -> str | None:
        """Our sampler key ("ddim", "euler_a", "dpmpp_2m_karras"); None for a sampler this app does not have."""
        label = self.fields.get("Sampler")
        if label is None:
            return None
        try:
            return Sampler.from_a1111(label, self.fields.get("Schedule type")).key
        except ValueError:
            return None

    @property
    def cfg_scale(self) -> float | None:
        return finite_number(self.fields.get("CFG scale"))

    @property
    def seed(self) -> int | None:
        return _int(self.fields.get("Seed"))

    @property
    def width(self) -> int | None:
        return _size(self.fields.get("Size"))[0]

    @property
    def height(self) -> int | None:
        return _size(self.fields.get("Size"))[1]

    @property
    def denoising_strength(self) -> float | None:
        return finite_number(self.fields.get("Denoising strength"))

    @property
    def clip_skip(self) -> int | None:
        """1 when the text does not say (A1111 and this app leave the default out); None when it is unreadable."""
        return _int(self.fields["Clip skip"]) if "Clip skip" in self.fields else 1

    @property
    def model(self) -> str | None:
        return self.fields.get("Model")

    @property
    def resize_mode(self) -> ResizeMode:
        """How img2img's picture was fitted; CROP when the text does not say."""
        return _choice(ResizeMode, self.fields.get("Resize mode"), ResizeMode.CROP)

    @property
    def guidance(self) -> dict:
        """CFG rescale, FreeU and PAG as GenerationRequest fields (off where the text does not say)."""
        return read_guidance(self.fields)


def parse_parameters(text: str) -> Infotext:
    """Read a "parameters" text by A1111's rules; InputError when it has no key-value line."""
    if not isinstance(text, str):
        raise InputError(f"The generation parameters must be text (got {type(text).__name__})")
    if len(text) > MAX_TEXT:
        raise InputError(f"The parameters text is {len(text)} characters long; at most {MAX_TEXT} are read (this app "
                         "and A1111 write far less). Use a PNG made by this app or by A1111.")  # fmt: skip
    if not text.strip():
        raise InputError(NO_PARAMETERS)
    *lines, last = text.replace("\r\n", "\n").replace("\r", "\n").strip().split("\n")
    pairs = key_values.line_pairs(last)
    if len(pairs) < MIN_FIELDS:  # A1111: no key-value line, so it is all prompt
        lines, pairs = [*lines, last], []
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    fields = {key.strip(): _unquote(value) for key, value in pairs}
    units: dict[int, UnitInfo] = {}
    flat: dict[int, list[str]] = {}  # the extension's first format: "ControlNet-0 Module: canny, ControlNet-0 ..."
    for key, value in fields.items():
        if m := _FLAT_KEY.fullmatch(key):
            flat.setdefault(int(m.group(1)), []).append(f"{m.group(2)}: {value}")
            continue
        m = _UNIT_KEY.fullmatch(key)
        unit = _parse_unit(int(m.group(1) or 0), value) if m else None
        if unit is not None:
            units.setdefault(unit.index, unit)
    for index, items in flat.items():
        if index not in units and (unit := _parse_unit(index, ", ".join(items))) is not None:
            units[index] = unit
    return Infotext("\n".join(prompt), "\n".join(negative), fields, tuple(units[i] for i in sorted(units)))


def _parse_unit(index: int, text: str) -> UnitInfo | None:
    """One unit from its "Key: value, ..." list, current ("Module: canny, Guidance Start: 0") or old ("preprocessor:
    canny, starting/ending: (0, 1), preprocessor params: (512, 100, 200)"); None when it holds no pair at all."""
    raw = {key: _unquote(value) for key, value in key_values.unit_pairs(text)}
    if not raw:
        return None
    low = {key.lower(): value for key, value in raw.items()}
    span = _parts(low.get("starting/ending"))
    params = _parts(low.get("preprocessor params"))
    return UnitInfo(
        index=index,
        module=_first(low.get("module"), low.get("preprocessor"), ""),
        model=_HASH.sub("", low.get("model", "")),
        scale=_first(finite_number(low.get("weight")), 1.0),
        start=_first(finite_number(low.get("guidance start")), finite_number(_at(span, 0)), 0.0),
        end=_first(finite_number(low.get("guidance end")), finite_number(_at(span, 1)), 1.0),
        resize_mode=_choice(ResizeMode, low.get("resize mode"), ResizeMode.CROP),
        pixel_perfect=low.get("pixel perfect", "").lower() == "true",
        control_mode=_choice(ControlMode, low.get("control mode"), ControlMode.BALANCED),
        processor_res=_unset(_first(_int(low.get("processor res")), _int(_at(params, 0)))),
        threshold_a=_unset(_first(finite_number(low.get("threshold a")), finite_number(_at(params, 1)))),
        threshold_b=_unset(_first(finite_number(low.get("threshold b")), finite_number(_at(params, 2)))),
        raw=raw,
    )


def _choice(enum: type[Choice], value: str | None, default: Choice) -> Choice:
    """The member a written value names; `default` when it is missing or names none."""
    try:
        return enum(value) if value is not None else default
    except ValueError:
        return default


def _unquote(value: str) -> str:
    """A value as A1111 meant it: a quoted one is a JSON string (escaped quotes, \\n, \\u00e9)."""
    value = value.strip()
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        return json.loads(value)
    except ValueError:  # not valid JSON (our own writer does not escape): take what is between the quotes
        return value[1:-1].replace('\\"', '"')


def _int(value: str | None) -> int | None:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        x = finite_number(value)
        return int(x) if x is not None and x.is_integer() else None


def _size(value: str | None) -> tuple[int | None, int | None]:
    m = _SIZE.fullmatch((value or "").strip())
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def _parts(value: str | None) -> list[str]:
    """'(512, 100, 200)' -> ['512', '100', '200']."""
    return [p.strip() for p in value.strip().strip("()").split(",")] if value else []


def _at(items: list[str], i: int) -> str | None:
    return items[i] if i < len(items) else None


def _first(*values):
    return next((v for v in values if v is not None), None)


def _unset(value):
    """The extension writes -1 for a slider its preprocessor does not use."""
    return None if value == -1 else value


__all__ = ["NO_PARAMETERS", "Infotext", "UnitInfo", "parse_parameters"]


# ------------------------------------------------------------------------------------------------ writing
def parameters(model, r: GenerationRequest) -> str:
    """The A1111 'parameters' text (its PNG Info tab reads it); a size left at None is the model's native size."""
    r = r.sized(model.native_size)
    # the LoRAs as A1111 keeps them: as tags in the prompt (its PNG Info and ours read them back)
    lines = [" ".join([r.prompt, *(_lora_tag(u) for u in r.loras)])]
    if r.negative_prompt:
        lines.append(f"Negative prompt: {r.negative_prompt}")
    fields_ = [
        f"Steps: {r.steps}", f"Sampler: {Sampler(r.sampler).value}", f"CFG scale: {r.cfg_scale}", f"Seed: {r.seed}",
        f"Size: {r.width}x{r.height}",
        *([f"Model hash: {model.hash}"] if getattr(model, "hash", "") else []),
        f"Model: {stem(model.source)}",  # A1111 names the checkpoint without its extension
    ]  # fmt: skip
    if r.vae is not None:
        vae_hash = getattr(r.vae, "hash", "")
        fields_ += [*([f"VAE hash: {vae_hash}"] if vae_hash else []), f"VAE: {r.vae_label}"]  # A1111's keys
    if r.init_image is not None:
        fields_.append(f"Denoising strength: {r.strength}")
        if r.resize_mode is not ResizeMode.CROP:
            fields_.append(f"Resize mode: {r.resize_mode.value}")
    if r.mask is not None and r.mask_blur > 0:
        fields_.append(f"Mask blur: {r.mask_blur:g}")
    if r.mask is not None and r.inpaint_mode is not InpaintMode.ONLY:
        fields_.append(f"Inpaint mode: {r.inpaint_mode.key}")
    if r.hires is not None:
        h = r.hires  # A1111's keys (its txt2img has no other denoising strength)
        key = "Denoising strength" if r.init_image is None else "Hires denoising strength"
        fields_.append(f"{key}: {h.strength}, Hires upscale: {h.scale:g}, Hires steps: {h.steps}, "
                       f"Hires upscaler: {h.upscaler.value}")  # fmt: skip
    fields_ += guidance_fields(r)
    if r.clip_skip > 1:
        fields_.append(f"Clip skip: {r.clip_skip}")
    if r.guess_mode:
        fields_.append("Guess mode: True")
    if r.reference is not None:
        u = r.reference
        fields_.append(f'Reference: "Mode: {u.mode}, Weight: {u.weight}, Style fidelity: {u.style_fidelity}, '
                       f'Guidance Start: {u.start}, Guidance End: {u.end}"')  # fmt: skip
    prompts = r.all_image_prompts  # one is "IP-Adapter"; several are numbered from 0, as the ControlNets are
    for i, p in enumerate(prompts):
        fields_.append(f'IP-Adapter{"" if len(prompts) == 1 else f" {i}"}: "{_image_prompt_text(p)}"')
    fields_ += _hashes(model, r)
    for i, u in enumerate(r.units):
        fields_.append(f"ControlNet {i}: {json.dumps(_unit_text(u), ensure_ascii=False)}")  # quoted as A1111 does
    lines.append(", ".join(fields_))
    return "\n".join(lines)


def _hashes(model, r: GenerationRequest) -> list[str]:
    """A1111's "Lora hashes" and "TI hashes": name: 12-digit hash of each LoRA and embedding used, so a reader (or
    a model site) knows exactly which files made the picture; names lose ':' and ',' as there."""
    out = []
    loras = [(u.label, getattr(u.model, "hash", "")) for u in r.loras]
    texts = [r.prompt, r.negative_prompt]
    text = getattr(model, "text", None)  # a model without a text encoder (a stand-in) calls no embeddings
    tis = [(e.name, e.hash) for e in embeddings_used(text, texts, r.emphasis)] if text is not None else []
    for key, items in (("Lora hashes", loras), ("TI hashes", tis)):
        named = [f"{name.replace(':', '').replace(',', '')}: {h}" for name, h in items if h]
        if named:
            out.append(f"{key}: {json.dumps(', '.join(named), ensure_ascii=False)}")
    return out


def _lora_tag(u) -> str:
    if u.text_weight is None or u.text_weight == u.weight:
        return f"<lora:{u.label}:{u.weight:g}>"
    return f"<lora:{u.label}:{u.text_weight:g}:{u.weight:g}>"  # A1111's order: text encoder, then UNet


def _image_prompt_text(p) -> str:
    """One image prompt: its adapter, weight (or "per block"), picture count and, with a region mask, "Mask: True"."""
    scale = p.scale if not isinstance(p.scale, dict) else "per block"
    mask = ", Mask: True" if p.mask is not None else ""
    return f"Model: {p.label}, Weight: {scale}, Images: {len(p.images)}{mask}"


def _unit_text(u: ControlUnit) -> str:
    """One unit in A1111's words and order; settings at their defaults are left out (A1111's readers assume them)."""
    parts = [f"Module: {u.preprocessor}"] if u.preprocessor else []
    parts += [f"Model: {u.label}", f"Weight: {u.scale}"]
    if u.resize_mode is not ResizeMode.CROP:
        parts.append(f"Resize Mode: {u.resize_mode.value}")
    if u.processor_res:
        parts.append(f"Processor Res: {u.processor_res}")
    parts += [f"Guidance Start: {u.start}", f"Guidance End: {u.end}"]
    if u.pixel_perfect:
        parts.append("Pixel Perfect: True")
    if u.mode is not ControlMode.BALANCED:
        parts.append(f"Control Mode: {u.mode.value}")
    return ", ".join(parts)
