"""Finding weights: a local models folder first, then the Hugging Face hub (its standard cache), never silently.

Only locates files; reading them is `checkpoints.py`'s job.
"""

from __future__ import annotations

import glob
import http.client
import logging
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from cldm.errors import InputError, MissingWeightsError
from cldm.models.family import SD2, SD15, SDXL

log = logging.getLogger(__name__)

DEFAULT_BASE_REPO = SD15.base_repo
BASE_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "tokenizer_2/*",  # SDXL's second text encoder
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]
CONTROLNET_PATTERNS = ["config.json", "diffusion_pytorch_model.safetensors"]
LOCAL_SUFFIXES = (".safetensors", ".pth", ".ckpt", ".bin")


# One look at the hub at start-up: long enough for a slow link to answer, short enough that nobody waits for it.
HUB_PROBE_SECONDS = 2.5


def offline() -> bool:
    """Whether weights are looked up on this machine only: HF_HUB_OFFLINE, set by the user or by `detect_offline`
    at start-up. huggingface_hub reads that variable once, when it is imported, so every lookup here also passes
    `local_files_only` itself."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the hub (HF_ENDPOINT, for a mirror) answers one HEAD request within `timeout` seconds, name lookup
    included: the request runs in a thread that is not waited for longer (a broken DNS can block far longer than
    the socket's own time-out)."""
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    answer: dict[str, bool] = {}

    def look() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as r:
                answer["up"] = r.status < 500
        except urllib.error.HTTPError as e:  # it answered: a redirect or a refusal still means it is there
            answer["up"] = e.code < 500
        except (OSError, http.client.HTTPException, ValueError) as e:  # no name, no route, refused, TLS, time-out
            log.info("the hub at %s did not answer: %s", url, e)

    probe = threading.Thread(target=look, daemon=True, name="hub-probe")
    probe.start()
    probe.join(timeout)
    return answer.get("up", False)


def detect_offline(probe: Callable[[], bool] = hub_reachable) -> bool:
    """Decide once, at start-up, whether this process works offline: HF_HUB_OFFLINE is set (then nothing is
    probed), or the hub does not answer one quick `probe`. Offline, HF_HUB_OFFLINE is set for the rest of the
    process and the processes it starts, so every later weight lookup stays on this machine and a missing file is
    said at once instead of after the network's time-outs."""
    if offline():
        return True
    if probe():
        return False
    log.warning("the Hugging Face hub cannot be reached: working offline (only weights on this machine are used)")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import constants

    # huggingface_hub read the variable when it was imported (gradio imports it first): its own requests (its
    # user-agent registry, transformers' lookups) ask this constant, the one switch it has after import
    constants.HF_HUB_OFFLINE = True
    return True


def _download(repo: str, patterns: list[str], what: str, where_to_put: str) -> Path:
    from huggingface_hub import snapshot_download

    local_only = offline()
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=local_only))
    except Exception as e:  # offline, no such repo, network error: all mean "not here"
        how = "this app works offline, so nothing is downloaded" if local_only else "connect to the internet and retry"
        raise MissingWeightsError(
            f"The {what} weights are not on this machine and could not be downloaded from the Hugging Face hub "
            f"({repo}: {type(e).__name__}). Put them in {where_to_put}, or {how}."
        ) from e


def _local_controlnet(stem: str, models_dir: str | os.PathLike | None) -> Path | None:
    """`models_dir/<stem>.{safetensors,pth,...}` or the diffusers folder `models_dir/<stem>/`, if there."""
    if models_dir:
        base = Path(models_dir)
        for suffix in LOCAL_SUFFIXES:
            if (base / f"{stem}{suffix}").is_file():
                return base / f"{stem}{suffix}"
        if (base / stem / "config.json").is_file():
            return base / stem
    return None


def controlnet_on_disk(stem: str, diffusers_repo: str, models_dir: str | os.PathLike | None, file: str = "") -> bool:
    """Whether `locate_controlnet` finds this ControlNet without the network: in the models folder or in the hub
    cache (every file it would download)."""
    if _local_controlnet(stem, models_dir) is not None:
        return True
    from huggingface_hub import try_to_load_from_cache

    names = [file] if file else CONTROLNET_PATTERNS
    return all(isinstance(try_to_load_from_cache(diffusers_repo, name), str) for name in names)


def locate_controlnet(stem: str, diffusers_repo: str, models_dir: str | os.PathLike | None, file: str = "") -> Path:
    """`models_dir/<stem>.{safetensors,pth,...}` or `models_dir/<stem>/` (diffusers), else the hub: the diffusers
    repo, or one original-layout `file` of it (SD2.1's)."""
    local = _local_controlnet(stem, models_dir)
    if local is not None:
        return local
    if file:
        where = f"{Path(models_dir or 'models') / file} (from {diffusers_repo})"
        return _download(diffusers_repo, [file], f"ControlNet {stem}", where) / file
    where = f"{Path(models_dir or 'models') / (stem + '.safetensors')} (or .pth from {SD15.controlnet_repo})"
    if not diffusers_repo.startswith("lllyasviel/"):
        where = f"{Path(models_dir or 'models') / stem}/ (a diffusers folder: {diffusers_repo})"
    return _download(diffusers_repo, CONTROLNET_PATTERNS, f"ControlNet {stem}", where)


CONTROL_FOLDERS = ("", "ControlNet")  # the models folder itself (ours), and A1111's models/ControlNet
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # a model folder's


def list_control_models(models_dir: str | os.PathLike | None) -> list[str]:
    """The control model files a unit may name (ControlNets, T2I-Adapters, Unions, Control-LoRAs), by file name:
    weight files and diffusers model folders in the models folder and its `ControlNet/`, sorted. Told by name only
    (the kind is read from the content when the file is used), leaving out the published IP-Adapters' names."""
    names = set()
    for folder in CONTROL_FOLDERS:
        d = Path(models_dir or "models") / folder
        if not d.is_dir():
            continue
        for p in d.iterdir():
            weights = p.is_file() and p.suffix in LOCAL_SUFFIXES and p.stem not in IP_ADAPTERS
            if weights or (p.is_dir() and any((p / w).is_file() for w in DIFFUSERS_WEIGHTS)):
                names.add(p.name)
    return sorted(names)


def locate_control_model(name: str, models_dir: str | os.PathLike | None) -> Path:
    """A control model chosen by its name in `list_control_models` (the models folder's first, then `ControlNet/`).
    These are the user's own files: there is nothing to download."""
    _plain_name(name, "Control model")
    for folder in CONTROL_FOLDERS:
        path = Path(models_dir or "models") / folder / name
        if path.is_file() or (path / "config.json").is_file():
            return path
    raise MissingWeightsError(
        f"Control model {name!r} is not in the models folder: put it in {Path(models_dir or 'models')}/ and press "
        "Refresh, or choose another."
    )


def locate_base(base: str) -> Path:
    """A local file or folder as given, else a hub repo id (downloaded once into the hub cache)."""
    path = Path(base)
    if path.exists():
        return path
    if base.count("/") == 1 and not base.startswith((".", "/")):
        return _download(base, BASE_PATTERNS, "base model", "a local folder or .safetensors file passed with --base")
    raise MissingWeightsError(
        f"Base model not found: {base}. Pass a .safetensors file, a diffusers folder or a hub id."
    )


def base_available(base: str, timeout: float = 5.0) -> bool:
    """Whether `base` is a local path, a hub repo already in the cache, or a hub repo that can be reached now."""
    if Path(base).exists():
        return True
    if base.count("/") != 1 or base.startswith((".", "/")):
        return False
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(base, allow_patterns=["model_index.json"], local_files_only=True)
        return True
    except Exception:
        if offline():
            return False
    try:  # one quick look, so that an unreachable hub does not cost each request a long time-out
        from huggingface_hub import HfApi

        HfApi().model_info(base, timeout=timeout)
        return True
    except Exception as e:
        log.warning("the hub cannot be reached for %s (%s)", base, type(e).__name__)
        return False


IP_ADAPTER_REPO = SD15.ip_adapter_repo  # h94/IP-Adapter: models/ (SD1.5) and sdxl_models/ (SDXL)
IP_ADAPTERS = (*SD15.ip_adapters, *SDXL.ip_adapters)  # every family's published IP-Adapters, by stem
IMAGE_ENCODER = "image_encoder"
VIT_H_FOLDER = "models/image_encoder"  # OpenCLIP ViT-H/14: every SD1.5 adapter and SDXL's "_vit-h" ones
VIT_BIGG_FOLDER = "sdxl_models/image_encoder"  # OpenCLIP ViT-bigG/14: ip-adapter_sdxl


def ip_adapter_family(stem: str) -> str | None:
    """The family a published IP-Adapter (by stem) is made for, None for another name."""
    return next((f.name for f in (SD15, SDXL) if stem in f.ip_adapters), None)


def image_encoder_folder(stem: str) -> str:
    """The h94/IP-Adapter folder of the image encoder a published IP-Adapter reads (its file names say it: the SDXL
    adapters marked "_vit-h" and all SD1.5 ones read ViT-H, plain ip-adapter_sdxl reads bigG)."""
    return VIT_BIGG_FOLDER if stem in SDXL.ip_adapters and not stem.endswith("_vit-h") else VIT_H_FOLDER


def locate_ip_adapter(stem: str, models_dir: str | os.PathLike | None) -> Path:
    """`models_dir/<stem>.{safetensors,bin}`, else `<folder>/<stem>.safetensors` of h94/IP-Adapter from the hub
    (`models/` for SD1.5, `sdxl_models/` for SDXL)."""
    if models_dir:
        for suffix in (".safetensors", ".bin"):
            if (Path(models_dir) / f"{stem}{suffix}").is_file():
                return Path(models_dir) / f"{stem}{suffix}"
    hub = "sdxl_models" if stem in SDXL.ip_adapters else "models"
    where = f"{Path(models_dir or 'models') / (stem + '.safetensors')} (from {IP_ADAPTER_REPO}, folder {hub}/)"
    folder = _download(IP_ADAPTER_REPO, [f"{hub}/{stem}.safetensors"], f"IP-Adapter {stem}", where)
    return folder / hub / f"{stem}.safetensors"


def locate_image_encoder(models_dir: str | os.PathLike | None, hub_folder: str = VIT_H_FOLDER) -> Path:
    """The image encoder in `hub_folder` of h94/IP-Adapter: locally `models_dir/image_encoder/` for ViT-H and
    `models_dir/sdxl_models/image_encoder/` for bigG (config.json + weights), else from the hub."""
    local = IMAGE_ENCODER if hub_folder == VIT_H_FOLDER else hub_folder
    if models_dir and (Path(models_dir) / local / "config.json").is_file():
        return Path(models_dir) / local
    where = f"{Path(models_dir or 'models') / local}/ ({hub_folder} of {IP_ADAPTER_REPO})"
    patterns = [f"{hub_folder}/config.json", f"{hub_folder}/model.safetensors"]
    return _download(IP_ADAPTER_REPO, patterns, "IP-Adapter image encoder", where) / hub_folder


STYLE_ENCODER_REPO = "openai/clip-vit-large-patch14"  # the CLIP vision model the T2I style adapter was trained on
STYLE_ENCODER_FOLDER = "clip-vit-large-patch14"
A1111_STYLE_ENCODER = "clip_vision/clip_vitl.pth"  # the A1111 extension's copy of the same weights


def locate_style_encoder(models_dir: str | os.PathLike | None) -> Path:
    """CLIP ViT-L/14 for the T2I style adapter: `models_dir/clip-vit-large-patch14/` (the hub repo's config.json and
    weights), or the A1111 extension's `models_dir/clip_vision/clip_vitl.pth`, else the hub repo."""
    if models_dir:
        folder, file = Path(models_dir) / STYLE_ENCODER_FOLDER, Path(models_dir) / A1111_STYLE_ENCODER
        if (folder / "config.json").is_file():
            return folder
        if file.is_file():
            return file
    where = (f"{Path(models_dir or 'models') / STYLE_ENCODER_FOLDER}/ (config.json and model.safetensors of "
             f"{STYLE_ENCODER_REPO})")  # fmt: skip
    patterns = ["config.json", "model.safetensors"]
    return _download(STYLE_ENCODER_REPO, patterns, "CLIP ViT-L/14 (T2I style adapter)", where)


LORA_FOLDERS = ("loras", "Lora")  # models_dir/loras (ours), models_dir/Lora (A1111's models/Lora)
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")


def _plain_name(name: str, what: str) -> None:
    """A name picked from a models-folder list (or sent through the API): a file name, never a path."""
    if "/" in name or "\\" in name or name.startswith("."):
        raise InputError(f"{what} name {name!r}: give the file's name without folders.")


def list_loras(models_dir: str | os.PathLike | None) -> list[str]:
    """The LoRA names (file stems) in the models folder's LoRA folders, sorted."""
    names = set()
    for folder in LORA_FOLDERS:
        d = Path(models_dir or "models") / folder
        if d.is_dir():  # subfolders too, as A1111 looks for them
            names |= {p.stem for p in d.rglob("*") if p.suffix in LORA_SUFFIXES and p.is_file()}
    return sorted(names)


def locate_lora(name: str, models_dir: str | os.PathLike | None) -> Path:
    """A `<lora:name:w>` tag's file: `models_dir/loras/<name>.safetensors` (or .pt/.ckpt, or A1111's `Lora/`
    folder). LoRAs are the user's own files: there is nothing to download."""
    _plain_name(name, "LoRA")
    for folder in LORA_FOLDERS:
        for suffix in LORA_SUFFIXES:
            d = Path(models_dir or "models") / folder
            path = d / f"{name}{suffix}"
            if path.is_file():
                return path
            if d.is_dir():  # in a subfolder (the first one in sorted order)
                found = sorted(p for p in d.rglob(glob.escape(f"{name}{suffix}")) if p.is_file())
                if found:
                    return found[0]
    known = list_loras(models_dir)
    raise MissingWeightsError(
        f"LoRA {name!r} not found: put {name}.safetensors in {Path(models_dir or 'models') / LORA_FOLDERS[0]}/"
        + (f" (found: {', '.join(known[:10])})" if known else "")
    )


VAE_FOLDER = "vae"  # models_dir/vae: VAE files (A1111's models/VAE)
VAE_FROM_CHECKPOINT = "From the checkpoint"


def list_vaes(models_dir: str | os.PathLike | None) -> list[str]:
    """The VAE file names in `models_dir/vae/` (A1111's `models/VAE/` too), sorted."""
    names = set()
    for folder in (VAE_FOLDER, "VAE"):
        d = Path(models_dir or "models") / folder
        if d.is_dir():
            names |= {p.name for p in d.iterdir() if p.suffix in (*LOCAL_SUFFIXES, ".pt") and p.is_file()}
    return sorted(names)


def locate_vae(name: str, models_dir: str | os.PathLike | None) -> Path:
    """A VAE chosen by file name in the models folder's `vae/` (or `VAE/`)."""
    _plain_name(name, "VAE")
    for folder in (VAE_FOLDER, "VAE"):
        path = Path(models_dir or "models") / folder / name
        if path.is_file():
            return path
    raise MissingWeightsError(f"VAE {name!r} not found: put it in {Path(models_dir or 'models') / VAE_FOLDER}/.")


TAESD_FOLDER = "VAE-taesd"  # A1111's models/VAE-taesd, with madebyollin's file names
TAESD_DECODERS = {SD15.name: "taesd_decoder", SD2.name: "taesd_decoder", SDXL.name: "taesdxl_decoder"}


def locate_taesd(family: str, models_dir: str | os.PathLike | None) -> Path | None:
    """The family's TAESD decoder in `models_dir/VAE-taesd/` (.pth or .safetensors; its encoder beside it is taken
    too), or None: the live previews then use the cheap approximation."""
    stem = TAESD_DECODERS.get(family)
    for suffix in (".pth", ".safetensors"):
        path = Path(models_dir or "models") / TAESD_FOLDER / f"{stem}{suffix}"
        if stem is not None and path.is_file():
            return path
    return None


BASE_FOLDERS = ("checkpoints", "Stable-diffusion")  # models_dir/checkpoints (ours), A1111's models/Stable-diffusion


def list_bases(models_dir: str | os.PathLike | None) -> dict[str, str]:
    """Base models in the models folder: name -> file or diffusers folder (`checkpoints/*.safetensors|.ckpt` and
    folders with a model_index.json)."""
    found = {}
    for folder in BASE_FOLDERS:
        d = Path(models_dir or "models") / folder
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if (p.is_file() and p.suffix in (".safetensors", ".ckpt")) or (p / "model_index.json").is_file():
                found.setdefault(p.name, str(p))
    return found
