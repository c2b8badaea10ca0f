"""The user's settings as records: one per panel of the app (a unit, the shared settings, the extras around the
units, the image prompt, the reference), the labels the app shows for their choices, and where the widgets start.

`forms.py` reads the widgets' values into these records; `service.py` turns them into requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cldm.hints.conditions import Condition
from cldm.hints.fitted import pixel_perfect
from cldm.io.model_card import ModelCard
from cldm.models.family import SD15
from cldm.models.family import family as family_named
from cldm.pipeline.request import HiresFix
from cldm.pipeline.vocabulary import ControlMode, InpaintMode, ResizeMode, Upscaler

MAX_SEED = 2**31 - 1  # random seeds are drawn below this
MAX_SEED_INPUT = 2**32 + 63  # a seed typed or sent from a PNG: A1111's 32-bit seeds, plus a batch's seed + i
SD15_SIZE = SD15.native_size
MAX_UI_STEPS = 150  # the steps sliders' top, the same in every tab and the Batch tab (A1111's)


@dataclass(frozen=True)
class UnitSettings:
    """What the user set for one ControlNet: its condition, picture, preprocessor and control sliders."""

    cond: Condition
    image: object  # a file path, an array, or an ImageEditor dict (background, layers, composite)
    preprocessor: str
    resolution: int
    params: dict[str, float] = field(default_factory=dict)  # the chosen preprocessor's sliders
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: ControlMode = ControlMode.BALANCED
    resize_mode: ResizeMode = ResizeMode.CROP  # how the picture becomes the picture size (`cldm.pipeline.fit`)
    pixel_perfect: bool = False  # the preprocessor resolution from the picture and the target size
    model: str | None = None  # a control model file of the models folder by name; None: the condition's own
    region: object = None  # the effective region: a picture, white where the unit acts; None: everywhere

    def detection_resolution(self, img: np.ndarray, size: tuple[int, int]) -> int:
        """The slider's resolution, or with pixel perfect the extension's for a picture of `size` (width, height),
        within the preprocessors' range."""
        if not self.pixel_perfect:
            return int(self.resolution)
        return pixel_perfect(img, *size, self.resize_mode)


# The choices as the app lists them: label -> member, the default first
CONTROL_MODES = {m.value: m for m in ControlMode}
RESIZE_MODES = {m.value: m for m in (ResizeMode.CROP, ResizeMode.JUST, ResizeMode.FILL)}
INPAINT_MODES = {m.value: m for m in InpaintMode}
UPSCALERS = {m.value: m for m in Upscaler}


@dataclass(frozen=True)
class PassSettings:
    """What a tab adds around its units: an init picture (img2img on any tab), the inpaint options, the hires fix,
    one seed per picture and the live preview."""

    init_image: object = None  # a file path or an array; None: text to image (tile and inpaint bring their own)
    mask_blur: float = 0.0  # px (the 1.1 inpaint app's default is 5)
    inpaint_mode: InpaintMode = InpaintMode.ONLY
    hires: bool = False
    hires_scale: float = 2.0
    hires_steps: int = 0
    hires_strength: float = 0.7
    hires_upscaler: Upscaler = Upscaler.LATENT
    seed_per_picture: bool = False  # A1111: picture i is made by seed + i alone
    preview_every: int = 0  # steps between live previews; 0: none
    clip_skip: int = 0  # 0: the condition's own (2 for lineart anime, else 1)
    vae: str = "From the checkpoint"  # or a file name in the models folder's vae/

    @property
    def hires_fix(self) -> HiresFix | None:
        if not self.hires:
            return None
        return HiresFix(float(self.hires_scale), int(self.hires_steps), float(self.hires_strength), self.hires_upscaler)


@dataclass(frozen=True)
class ImagePromptSettings:
    """One image-prompt slot: a picture, which IP-Adapter (a `weights.IP_ADAPTERS` name), its strength and its
    region mask."""

    image: object  # a file path or an array; None: no image prompt
    adapter: str = SD15.ip_adapters[0]
    scale: float = 0.6
    mask: object = None  # a picture, white where the image prompt acts; None: everywhere


@dataclass(frozen=True)
class ReferenceSettings:
    """Reference-only as the A1111 extension's preprocessors name it: reference_only, reference_adain(+attn)."""

    image: object
    preprocessor: str = "reference_only"
    style_fidelity: float = 0.5
    weight: float = 1.0


REFERENCE_PREPROCESSORS = {"reference_only": "only", "reference_adain": "adain", "reference_adain+attn": "adain+attn"}


@dataclass(frozen=True)
class Settings:
    """The generation settings every tab shares."""

    prompt: str = ""
    added_prompt: str = ""
    negative_prompt: str = ""
    batch: int = 1
    width: int = SD15_SIZE
    height: int = SD15_SIZE
    steps: int = 20
    cfg: float = 7.5
    sampler: str = "dpmpp_2m_karras"
    seed: int = 12345
    randomize: bool = True
    denoise: float = 1.0


@dataclass(frozen=True)
class GuidanceSettings:
    """The sampling extras under a tab's Settings; an API call may leave each out (then it is off)."""

    eta: float = 0.0  # DDIM's eta, TCD's gamma
    cfg_rescale: float = 0.0
    freeu: bool = False  # with the base family's published factors
    pag_scale: float = 0.0
    pag_layers: str = "mid"  # diffusers' layer names, comma separated

    def request_fields(self, family: str) -> dict:
        """The GenerationRequest fields for a base of `family` (its name)."""
        layers = tuple(name.strip() for name in str(self.pag_layers or "").split(",") if name.strip())
        return dict(eta=float(self.eta), cfg_rescale=float(self.cfg_rescale), pag_scale=float(self.pag_scale),
                    freeu=family_named(family).freeu if self.freeu else None, pag_layers=layers or ("mid",))  # fmt: skip


@dataclass(frozen=True)
class Defaults:
    """Where the widgets start: the model card's settings for a model that has one, A1111-like ones for SD1.5."""

    size: int = SD15_SIZE
    steps: int = 20
    cfg: float = 7.5
    sampler: str = "dpmpp_2m_karras"
    quality_words: bool = True  # the ControlNet 1.1 apps' added / negative prompt

    @classmethod
    def for_card(cls, card: ModelCard | None) -> Defaults:
        if card is None:
            return cls()
        return cls(card.size, card.steps, card.cfg, card.sampler, quality_words=not card.words)


@dataclass(frozen=True)
class ModelLists:
    """What the models folder holds, as the Refresh button shows it."""

    bases: list[str]
    loras: list[str]
    vaes: list[str]
    embeddings: int  # loaded
    refused_embeddings: dict[str, str]
    control_models: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        parts = [f"{len(self.bases)} base models", f"{len(self.control_models)} control models",
                 f"{len(self.loras)} LoRAs", f"{len(self.vaes)} VAEs", f"{self.embeddings} embeddings"]  # fmt: skip
        refused = "; ".join(f"{n}: {why}" for n, why in self.refused_embeddings.items())
        return ", ".join(parts) + (f" (left out: {refused})" if refused else "")
