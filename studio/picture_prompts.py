"""The page's picture prompts as request parts: the Image prompt accordion's IP-Adapter (located by family) and the
reference."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from cldm.errors import InputError
from cldm.io import locate
from cldm.pipeline.request import ImagePrompt, ReferenceUnit
from studio.canvas import editor_image
from studio.settings import REFERENCE_PREPROCESSORS, ImagePromptSettings, ReferenceSettings


def image_prompt(
    ip: ImagePromptSettings | None, models_dir: str | None, family: str | None = None
) -> ImagePrompt | None:
    """The accordion's image prompt (None when no picture was given), with the adapter and its image encoder
    located; an adapter of another family than the base's `family` is refused by name before anything loads."""
    img = None if ip is None else editor_image(ip.image)
    if img is None:
        return None
    if ip.adapter not in locate.IP_ADAPTERS:
        raise InputError(f"Unknown IP-Adapter {ip.adapter!r}; choose one of {', '.join(locate.IP_ADAPTERS)}.")
    made_for = locate.ip_adapter_family(ip.adapter)
    if family is not None and made_for != family:
        own = [a for a in locate.IP_ADAPTERS if locate.ip_adapter_family(a) == family]
        raise InputError(f"{ip.adapter} is an IP-Adapter for {made_for} and the base model is {family}: "
                         f"choose {', '.join(own) if own else 'none (no IP-Adapter is published for it)'}.")  # fmt: skip
    adapter = locate.locate_ip_adapter(ip.adapter, models_dir)
    encoder = locate.locate_image_encoder(models_dir, locate.image_encoder_folder(ip.adapter))
    region = editor_image(ip.mask)  # grey as diffusers' mask processor reads a colour picture
    mask = None if region is None else np.asarray(Image.fromarray(region).convert("L"))
    return ImagePrompt(str(adapter), (img,), str(encoder), float(ip.scale), mask=mask)


def image_prompts(
    ips: Sequence[ImagePromptSettings], models_dir: str | None, family: str | None = None
) -> tuple[ImagePrompt, ...]:
    """The slots' image prompts, in order; slots without a picture are left out."""
    return tuple(p for p in (image_prompt(ip, models_dir, family) for ip in ips) if p is not None)


def reference(ref: ReferenceSettings | None) -> ReferenceUnit | None:
    """The accordion's reference (None when no picture was given)."""
    img = None if ref is None else editor_image(ref.image)
    if img is None:
        return None
    if ref.preprocessor not in REFERENCE_PREPROCESSORS:
        raise InputError(
            f"{ref.preprocessor!r} is not a reference preprocessor; choose {', '.join(REFERENCE_PREPROCESSORS)}."
        )
    mode = REFERENCE_PREPROCESSORS[ref.preprocessor]
    return ReferenceUnit(img, mode, float(ref.style_fidelity), float(ref.weight))
