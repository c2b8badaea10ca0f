"""TAESD files, told apart by their keys (never the file name):

  * madebyollin's halves (`taesd_decoder.pth` / `.safetensors`, `taesd_encoder.*`, and taesdxl / taesd3 / taef1):
    the keys of an `nn.Sequential`, "1.weight", "3.conv.0.weight"... (the decoder's index 0 is a weightless Clamp,
    so its first conv is "1.weight"; the encoder's is "0.weight"). They load into `cldm.models.taesd` as they are;
    a decoder takes the encoder beside it (`..._encoder.*` for `..._decoder.*`) when there is one.
  * diffusers' AutoencoderTiny (a folder with config.json + diffusion_pytorch_model.safetensors, or that file):
    "decoder.layers.N.*" is our decoder's N + 1 (diffusers applies the Clamp outside its Sequential),
    "encoder.layers.N.*" our encoder's N.
A half's stages are read from its keys (Blocks have "conv.0.weight", the convs between stages have no bias), so
the fit to a base (latent channels, scale) is checked before anything is built.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path

import torch

from cldm.errors import CheckpointError
from cldm.io.assemble import build
from cldm.io.files import read_file
from cldm.models.taesd import TinyAutoencoder, TinyConfig, TinyDecoder, TinyEncoder

StateDict = dict[str, torch.Tensor]

_SEQUENTIAL_KEY = re.compile(r"^\d+\.(weight|bias|conv\.[024]\.(weight|bias)|skip\.weight|pool\.\d+\.(weight|bias))$")
DIFFUSERS_PREFIXES = {"decoder.layers.": 1, "encoder.layers.": 0}  # diffusers' prefix -> index offset in ours
# TAESDs for other latent spaces, by their latent channels (what to tell a user who picked one for SD)
OTHER_LATENTS = {16: "SD3 or FLUX.1 (taesd3, taef1)", 32: "FLUX.2 or Sana (taef2, taesana)"}


class TAESDLayout(enum.Enum):
    """How a TAESD state dict is laid out; the value is how messages name it."""

    DECODER = "a TAESD decoder"
    ENCODER = "a TAESD encoder"
    DIFFUSERS = "a diffusers AutoencoderTiny"


def taesd_layout(state: StateDict) -> TAESDLayout | None:
    """Which TAESD layout `state` has, from its keys; None for anything else."""
    keys = list(state)
    if not keys:
        return None
    if all(k.startswith(tuple(DIFFUSERS_PREFIXES)) for k in keys):
        return TAESDLayout.DIFFUSERS
    if not all(_SEQUENTIAL_KEY.match(k) for k in keys) or not any(k.endswith(".conv.0.weight") for k in keys):
        return None
    first = min(int(k.split(".", 1)[0]) for k in keys)
    return TAESDLayout.ENCODER if first == 0 else TAESDLayout.DECODER


def from_diffusers(state: StateDict) -> tuple[StateDict, StateDict]:
    """AutoencoderTiny's keys -> (decoder, encoder) in madebyollin's Sequential keys (an absent half: empty)."""
    halves: dict[str, StateDict] = {p: {} for p in DIFFUSERS_PREFIXES}
    for key, value in state.items():
        for prefix, offset in DIFFUSERS_PREFIXES.items():
            if key.startswith(prefix):
                index, rest = key[len(prefix) :].split(".", 1)
                halves[prefix][f"{int(index) + offset}.{rest}"] = value
    return halves["decoder.layers."], halves["encoder.layers."]


def half_config(state: StateDict, name: str, decoder: bool) -> TinyConfig:
    """A half's shape from its keys: its first and last convs give the widths, each bias-less conv between them
    starts a stage, each "N.conv.0.weight" is a Block of the current stage."""
    indices = sorted({int(k.split(".", 1)[0]) for k in state})
    first, last = state.get(f"{indices[0]}.weight"), state.get(f"{indices[-1]}.weight")
    if first is None or last is None or first.ndim != 4 or last.ndim != 4:
        raise CheckpointError(f"{name} has TAESD keys but no first or last conv: a damaged or unknown TAESD file.")
    blocks = [0]
    for i in indices[1:-1]:
        if f"{i}.conv.0.weight" in state:
            blocks[-1] += 1
        elif f"{i}.weight" in state and f"{i}.bias" not in state:
            blocks.append(0)
    latent = first.shape[1] if decoder else last.shape[0]
    return TinyConfig(latent_channels=int(latent), channels=int(first.shape[0]), blocks=tuple(blocks))


def _check_fit(cfg: TinyConfig, name: str, latent_channels: int, factor: int) -> None:
    if cfg.latent_channels != latent_channels:
        made_for = OTHER_LATENTS.get(cfg.latent_channels, f"{cfg.latent_channels}-channel latents")
        raise CheckpointError(
            f"{name} is a TAESD for {made_for}, but this base model's latents have {latent_channels} channels: use "
            "the TAESD of its family (taesd_decoder.pth for SD1.x / SD2.x, taesdxl_decoder.pth for SDXL)."
        )
    if cfg.factor != factor:
        raise CheckpointError(
            f"{name} is a TAESD that scales pictures by {cfg.factor} per side, this base model's VAE by {factor}: "
            "it is not made for this model."
        )


def _half(cls: type, state: StateDict, name: str, latent_channels: int, factor: int, dtype: torch.dtype):
    cfg = half_config(state, name, decoder=cls is TinyDecoder)
    _check_fit(cfg, name, latent_channels, factor)
    return build(cls, cfg, state, f"TAESD {'decoder' if cls is TinyDecoder else 'encoder'} ({name})", dtype)


def _encoder_beside(path: Path) -> tuple[str, StateDict] | None:
    """The encoder file published beside a decoder file (`taesd_encoder.pth` for `taesd_decoder.pth`, in either
    format), if there."""
    head, sep, tail = path.stem.rpartition("decoder")
    candidates = (path.with_name(f"{head}encoder{tail}{s}") for s in (path.suffix, ".safetensors", ".pth"))
    other = next((p for p in candidates if p.is_file()), None) if sep else None
    if other is None:
        return None
    state = read_file(other)
    if taesd_layout(state) is not TAESDLayout.ENCODER:
        raise CheckpointError(f"{other.name}, beside {path.name}, is not a TAESD encoder: move or replace it.")
    return other.name, state


def load_taesd(
    path: Path, state: StateDict, latent_channels: int, factor: int, dtype: torch.dtype = torch.float32
) -> TinyAutoencoder:
    """A TAESD from a file or folder already read into `state` (its layout told by `taesd_layout`), for a base
    whose latents have `latent_channels` channels and `factor` pixels per latent pixel; one for another latent
    space (taesd3, taef1: 16 channels) is refused before it is built."""
    layout = taesd_layout(state)
    name = path.name
    if layout is TAESDLayout.ENCODER:
        raise CheckpointError(
            f"{name} is a TAESD encoder alone: choose its decoder file (e.g. taesd_decoder.pth); the encoder "
            "beside it is taken with it."
        )
    if layout is TAESDLayout.DIFFUSERS:
        dec_state, enc_state = from_diffusers(state)
        if not dec_state:
            raise CheckpointError(f"{name} holds a TAESD encoder but no decoder: use the whole AutoencoderTiny.")
        encoder = (name, enc_state) if enc_state else None
    else:
        dec_state, encoder = state, None if path.is_dir() else _encoder_beside(path)
    decoder = _half(TinyDecoder, dec_state, name, latent_channels, factor, dtype)
    enc = None if encoder is None else _half(TinyEncoder, encoder[1], encoder[0], latent_channels, factor, dtype)
    taesd = TinyAutoencoder(decoder, enc)
    taesd.source = name
    return taesd
