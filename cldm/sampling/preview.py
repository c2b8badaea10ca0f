"""Live preview: a cheap picture of where sampling is heading, without the VAE decoder.

The UNet's noise estimate gives the predicted clean latent, x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), and a fixed
4 -> 3 linear map turns latents into colours (A1111's "Approx cheap" preview for SD1.x latents). The picture is at
the latent size (1/8 of the picture's side); it costs a few element-wise operations per preview. With a decoder
(a TAESD: A1111's "TAESD" method) the predicted latent is decoded instead, at the picture's size.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cldm.sampling.schedules import alphas_cumprod

# rows: the four SD1.x latent channels; columns: their contribution to R, G, B (A1111's approximation)
LATENT_RGB = torch.tensor(
    [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ]
)
_SCHEDULE = alphas_cumprod()


def predicted_x0(x_in: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The clean latent the UNet's noise estimate points at, from the model's (VP-scaled) input at timestep t."""
    a = _SCHEDULE[int(torch.as_tensor(t).float().round().clamp(0, len(_SCHEDULE) - 1))].item()
    return (x_in.float() - (1 - a) ** 0.5 * eps.float()) / a**0.5


def approx_rgb(latents: torch.Tensor) -> np.ndarray:
    """(b, 4, h, w) scaled SD latents -> (b, h, w, 3) uint8 colours by the fixed linear map (grey levels for a
    model with other latent channels, e.g. a tiny test model)."""
    x = latents.float().cpu()
    if x.shape[1] == LATENT_RGB.shape[0]:
        rgb = torch.einsum("bchw,cr->bhwr", x, LATENT_RGB)
    else:
        rgb = x.mean(dim=1)[..., None].expand(-1, -1, -1, 3)
    return ((rgb + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8).numpy()  # truncated, as A1111 does


def decoded_rgb(decoder: nn.Module, latents: torch.Tensor) -> np.ndarray:
    """(b, C, h, w) scaled latents -> (b, H, W, 3) uint8 through a decoder with the VAE's contract (a TAESD),
    truncated as A1111 does."""
    image = decoder.decode(latents).float()
    return ((image + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def preview_rgb(latents: torch.Tensor, decoder: nn.Module | None = None) -> np.ndarray:
    """The live preview of predicted latents: decoded by `decoder` when there is one, else `approx_rgb`."""
    return approx_rgb(latents) if decoder is None else decoded_rgb(decoder, latents)
