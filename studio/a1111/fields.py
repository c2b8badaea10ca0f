"""Reading an A1111 JSON payload one field at a time: typed values within the ranges the app's widgets allow,
base64 pictures and masks, and `PayloadError`, which names the field (A1111's clients show FastAPI's `detail`)."""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
from collections.abc import Collection

import numpy as np
from PIL import Image

from cldm.errors import InputError
from cldm.io.images import MAX_PIXELS, check_shape, encode_png, load_rgb

_DATA_URL = re.compile(r"^data:[\w/+.-]*(?:;[\w=.+-]+)*;base64,", re.IGNORECASE)
MASK_ALPHA_CUT = 128  # A1111 reads a mask's alpha as painted above this value (its create_binary_mask)
MASK_GREY_CUT = 127  # and a grey level as painted where grey / 255 rounds to 1


class PayloadError(InputError):
    """A bad value in an A1111 payload: `field` names it as the client sent it ("width",
    "alwayson_scripts.controlnet.args[0].module"), `message` says what is wrong and what is allowed."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Fields:
    """One JSON object of the payload (the request, or one ControlNet unit), read by name; `prefix` is put before
    each name in the errors ("alwayson_scripts.controlnet.args[1].")."""

    def __init__(self, values: object, prefix: str = "", what: str = "the request"):
        if not isinstance(values, dict):
            raise PayloadError(prefix.rstrip(".") or "body", f"{what} must be a JSON object (got {_kind(values)})")
        self.values = values
        self.prefix = prefix

    def name(self, key: str) -> str:
        return self.prefix + key

    def given(self, key: str) -> bool:
        """Whether the payload holds a value for `key` (null counts as left out, as pydantic's defaults do)."""
        return self.values.get(key) is not None

    def error(self, key: str, message: str) -> PayloadError:
        return PayloadError(self.name(key), message)

    def text(self, key: str, default: str = "") -> str:
        value = self.values.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.error(key, f"must be text (got {_kind(value)})")
        return value

    def number(self, key: str, default: float, low: float, high: float, whole: bool = False) -> float:
        """A number in low..high (a whole one with `whole`); `default` when left out."""
        value = self.values.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.error(key, f"must be a number (got {_kind(value)})")
        if whole and value != int(value):
            raise self.error(key, f"must be a whole number (got {value:g})")
        if not low <= value <= high:
            raise self.error(key, f"must be {low:g}..{high:g} (got {value:g})")
        return int(value) if whole else float(value)

    def loose_number(self, key: str) -> float | None:
        """A number the extension resets to its default when out of range (processor_res, threshold_a/b): None when
        left out; a value that is no number at all is still an error."""
        value = self.values.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.error(key, f"must be a number (got {_kind(value)})")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        """true / false (A1111's pydantic also takes 0 and 1, as some clients send them)."""
        value = self.values.get(key)
        if value is None:
            return default
        if value in (0, 1) and not isinstance(value, float):
            return bool(value)
        raise self.error(key, f"must be true or false (got {_kind(value)})")

    def only(self, key: str, allowed: Collection[object], why: str) -> None:
        """Refuse a field this server cannot honour unless it holds one of the `allowed` values (its defaults)."""
        value = self.values.get(key)
        if value is not None and value not in allowed:
            raise self.error(key, why)

    def picture(self, key: str, value: object = None) -> np.ndarray:
        """A base64 picture (with or without a data: URL prefix) -> HxWx3 uint8; transparent areas become white."""
        return load(self.name(key), self.values.get(key) if value is None else value)

    def mask(self, key: str, value: object = None) -> np.ndarray:
        """A base64 mask -> HxW uint8, 255 where to repaint, read as A1111 reads img2img's mask: the alpha channel of
        a picture with transparency, else its grey levels."""
        return mask(self.name(key), self.values.get(key) if value is None else value)


def _kind(value: object) -> str:
    return "null" if value is None else repr(value) if isinstance(value, (bool, int, float)) else type(value).__name__


def picture_bytes(field: str, value: object) -> bytes:
    """The bytes of a base64 picture; http(s) addresses are refused (this server fetches nothing)."""
    if not isinstance(value, str) or not value.strip():
        raise PayloadError(field, f"must be a base64-encoded picture (got {_kind(value)})")
    text = value.strip()
    if text.lower().startswith(("http://", "https://")):
        raise PayloadError(field, "this server fetches no addresses: send the picture itself, base64-encoded")
    text = re.sub(r"\s+", "", _DATA_URL.sub("", text))
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise PayloadError(
            field, f"is not valid base64 ({e}); send the PNG or JPEG file's bytes, base64-encoded"
        ) from e


def load(field: str, value: object) -> np.ndarray:
    """A base64 picture -> HxWx3 uint8, or PayloadError naming `field` with what is wrong with it."""
    try:
        return load_rgb(picture_bytes(field, value))
    except PayloadError:
        raise
    except InputError as e:
        raise PayloadError(field, str(e)) from e


def mask(field: str, value: object) -> np.ndarray:
    """A base64 mask -> HxW uint8, 255 = repaint (A1111's rule: the alpha channel when the picture has transparency,
    above 128; else the grey level, rounded as A1111 rounds its 0..1 mask)."""
    data = picture_bytes(field, value)
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_PIXELS:
                raise InputError(f"the mask is {img.width}x{img.height} px: too large")
            check_shape(img.width, img.height, "The mask")
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                alpha = np.asarray(img.convert("RGBA").getchannel("A"))
                if alpha.min() < 255:
                    return np.where(alpha > MASK_ALPHA_CUT, 255, 0).astype(np.uint8)
            grey = np.asarray(img.convert("L"))
    except InputError as e:
        raise PayloadError(field, str(e)) from e
    except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise PayloadError(
            field, f"cannot be read as a picture ({type(e).__name__}); send a PNG, base64-encoded"
        ) from e
    return np.where(grey > MASK_GREY_CUT, 255, 0).astype(np.uint8)


def base64_text(data: bytes) -> str:
    """A file's bytes as A1111 sends a picture: base64, no data: prefix."""
    return base64.b64encode(data).decode("ascii")


def png_base64(picture: np.ndarray) -> str:
    """A picture as a PNG (no text chunks), base64."""
    return base64_text(encode_png(np.ascontiguousarray(picture)))
