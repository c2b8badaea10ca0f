"""The condition table: one frozen row per ControlNet 1.1 SD1.5 model, plus the ControlNets of the other families
for the same condition. The app builds every tab from it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The ControlNet 1.1 apps' defaults (gradio_*.py in ControlNet-v1-1-nightly).
ADDED_PROMPT = "best quality"
NEGATIVE_PROMPT = "lowres, bad anatomy, bad hands, cropped, worst quality"
PREPROCESSOR_NONE = "none"
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "assets" / "examples"  # drawn by assets/make_examples.py


@dataclass(frozen=True)
class Condition:
    """One ControlNet: where its weights are, which preprocessors make its hint, and its special rules."""

    key: str
    label: str
    model_file: str  # file name in lllyasviel/ControlNet-v1-1 (and in --models-dir)
    diffusers_repo: str  # the same weights as a diffusers folder (safetensors)
    preprocessors: tuple[str, ...]  # registry names; the first is the default; "none" = my image is the hint
    sketch: bool = False  # offer a drawing canvas
    clip_skip: int = 1
    global_average_pooling: bool = False  # shuffle: residuals pooled, ControlNet on the conditional half only
    img2img: bool = False  # tile: the input is also the init image, with a denoising slider
    inpaint: bool = False  # paint a mask; masked hint pixels are -1; unmasked area kept
    prompt_hint: str = ""
    example: tuple[str, str, str] = ("house.png", "none", "")  # picture in assets/examples, preprocessor, prompt

    @property
    def stem(self) -> str:
        return self.model_file.rsplit(".", 1)[0]

    def weights(self, family: str) -> FamilyWeights | None:
        """Where this condition's ControlNet for a base of `family` is (None: no known one for that family)."""
        if family == "SD1.5":
            return FamilyWeights(self.stem, self.diffusers_repo)
        if family == "SDXL" and (repo := SDXL_CONTROLNETS.get(self.key)):
            return FamilyWeights(repo.split("/")[1], repo)
        if family == "SD2.x" and (file := SD21_CONTROLNETS.get(self.key)):
            return FamilyWeights(file.rsplit(".", 1)[0], SD21_REPO, file)
        return None


@dataclass(frozen=True)
class FamilyWeights:
    """One ControlNet's weights: `stem` names it in the models folder (`<stem>.safetensors` or a `<stem>/` diffusers
    folder); from the hub it is `repo` (a diffusers folder) or the file `file` of `repo` (original layout)."""

    stem: str
    repo: str
    file: str = ""


# The SDXL ControlNets users run, in diffusers' layout (config.json + diffusion_pytorch_model.safetensors): diffusers'
# own and xinsir's. Conditions without one here have no SDXL ControlNet we know of: put one in the models folder.
SDXL_CONTROLNETS = {
    "canny": "diffusers/controlnet-canny-sdxl-1.0",
    "depth": "diffusers/controlnet-depth-sdxl-1.0",
    "openpose": "xinsir/controlnet-openpose-sdxl-1.0",
    "scribble": "xinsir/controlnet-scribble-sdxl-1.0",
    "tile": "xinsir/controlnet-tile-sdxl-1.0",
}
# The SD2.1 ControlNets (original layout, one file each) of thibaud/controlnet-sd21.
SD21_REPO = "thibaud/controlnet-sd21"
SD21_CONTROLNETS = {
    "canny": "control_v11p_sd21_canny.safetensors",
    "depth": "control_v11p_sd21_depth.safetensors",
    "softedge": "control_v11p_sd21_hed.safetensors",
    "openpose": "control_v11p_sd21_openpose.safetensors",
    "scribble": "control_v11p_sd21_scribble.safetensors",
    "lineart": "control_v11p_sd21_lineart.safetensors",
    "normalbae": "control_v11p_sd21_normalbae.safetensors",
    "seg": "control_v11p_sd21_ade20k.safetensors",
}


CONDITIONS: tuple[Condition, ...] = (
    Condition(
        "canny", "Canny", "control_v11p_sd15_canny.pth", "lllyasviel/control_v11p_sd15_canny", ("canny", "none", "invert"),
        example=("house.png", "canny", "a cozy cottage in a meadow, sunny day"),
    ),
    Condition(
        "mlsd", "MLSD lines", "control_v11p_sd15_mlsd.pth", "lllyasviel/control_v11p_sd15_mlsd", ("mlsd", "none"),
        example=("house.png", "mlsd", "a modern house, architecture photo"),
    ),
    Condition(
        "depth", "Depth", "control_v11f1p_sd15_depth.pth", "lllyasviel/control_v11f1p_sd15_depth",
        ("depth_midas", "depth_zoe", "depth_leres", "depth_anything_v2", "depth_anything_v2_base", "depth_anything_v2_large",
         "none"), example=("house.png", "depth_midas", "a stone house in a garden"),
    ),
    Condition(
        "normalbae", "Normal (BAE)", "control_v11p_sd15_normalbae.pth", "lllyasviel/control_v11p_sd15_normalbae",
        ("normal_bae", "none"), example=("house.png", "normal_bae", "a wooden cabin, warm light"),
    ),
    Condition(
        "seg", "Segmentation", "control_v11p_sd15_seg.pth", "lllyasviel/control_v11p_sd15_seg", ("seg_ade20k", "none"),
        example=("house.png", "seg_ade20k", "a farmhouse under a blue sky"),
    ),
    Condition(
        "openpose", "OpenPose", "control_v11p_sd15_openpose.pth", "lllyasviel/control_v11p_sd15_openpose",
        ("openpose", "openpose_hand", "openpose_face", "openpose_full", "dw_openpose_full", "dw_openpose", "dw_openpose_hand",
         "dw_openpose_face", "none"),
        example=("pose.png", "none", "a dancer on a stage, spotlight"),
    ),
    Condition(
        "scribble", "Scribble", "control_v11p_sd15_scribble.pth", "lllyasviel/control_v11p_sd15_scribble",
        ("scribble_sketch", "scribble_hed", "scribble_pidinet", "none", "invert"), sketch=True,
        example=("house_sketch.png", "scribble_sketch", "a house by a lake, watercolor"),
    ),
    Condition(
        "softedge", "Soft edge", "control_v11p_sd15_softedge.pth", "lllyasviel/control_v11p_sd15_softedge",
        ("softedge_pidinet", "softedge_pidisafe", "softedge_hed", "softedge_hedsafe", "softedge_teed", "softedge_anyline",
         "none"),
        example=("house.png", "softedge_pidinet", "a cottage in autumn"),
    ),
    Condition(
        "lineart", "Lineart", "control_v11p_sd15_lineart.pth", "lllyasviel/control_v11p_sd15_lineart",
        ("lineart", "lineart_coarse", "softedge_anyline", "none", "invert"),
        example=("house_sketch.png", "invert", "a house, detailed ink illustration"),
    ),
    Condition(
        "lineart_anime", "Lineart (anime)", "control_v11p_sd15s2_lineart_anime.pth",
        "lllyasviel/control_v11p_sd15s2_lineart_anime", ("lineart_anime", "none", "invert"), clip_skip=2,
        prompt_hint="Trained with clip skip 2 on anime models; an anime base model gives the best results.",
        example=("house_sketch.png", "invert", "anime style house, clear sky"),
    ),
    Condition(
        "shuffle", "Shuffle", "control_v11e_sd15_shuffle.pth", "lllyasviel/control_v11e_sd15_shuffle", ("shuffle", "none"),
        global_average_pooling=True, example=("house.png", "shuffle", "a house in winter"),
    ),
    Condition(
        "ip2p", "Instruct pix2pix", "control_v11e_sd15_ip2p.pth", "lllyasviel/control_v11e_sd15_ip2p", ("none",),
        prompt_hint='Write an instruction, e.g. "make it winter".', example=("house.png", "none", "make it winter"),
    ),
    Condition(
        "tile", "Tile", "control_v11f1e_sd15_tile.pth", "lllyasviel/control_v11f1e_sd15_tile", ("none",), img2img=True,
        example=("house.png", "none", "a house, highly detailed"),
    ),
    Condition(
        "inpaint", "Inpaint", "control_v11p_sd15_inpaint.pth", "lllyasviel/control_v11p_sd15_inpaint", ("none",),
        inpaint=True, example=("house.png", "none", "a red sports car"),
    ),
)  # fmt: skip

BY_KEY = {c.key: c for c in CONDITIONS}
