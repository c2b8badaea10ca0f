"""Pictures in and out: reading any image a user may bring, resizing, tensors, PNG text chunks."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin

from cldm.errors import InputError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PIXELS = 40_000_000  # larger images are refused before they are decoded (decompression bombs)
# Every picture (hint, init, mask, canvas) is refused before any preprocessor or resize works on it when a side is
# outside these bounds or it is too elongated: preprocessors scale the short side up to their resolution, so a
# 60000x8 strip would become a 3.8-gigapixel working picture.
MIN_SIDE, MAX_SIDE, MAX_ASPECT = 1, 16384, 8.0


def check_shape(width: int, height: int, what: str = "The image") -> None:
    """Refuse degenerate picture shapes (tiny, huge or very elongated) with a message saying what is allowed."""
    if min(width, height) >= MIN_SIDE and max(width, height) / min(width, height) > MAX_ASPECT:
        raise InputError(
            f"{what} is {width}x{height} px: at most {MAX_ASPECT:g}:1 between its sides is accepted. Crop it first."
        )
    if min(width, height) < MIN_SIDE or max(width, height) > MAX_SIDE:
        raise InputError(
            f"{what} is {width}x{height} px: each side must be {MIN_SIDE}..{MAX_SIDE} px. Crop or resize it first."
        )


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL image (16-bit, CMYK, RGBA, palette, animated, EXIF-rotated) -> HxWx3 uint8 RGB."""
    try:
        img.seek(0)  # animated: the first frame
    except (EOFError, AttributeError):
        pass
    img = ImageOps.exif_transpose(img)
    # Values mean brightness, never stretched: 16-bit (and 32-bit integer) 0..65535, float 0..1 (clipped).
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise InputError("The image contains NaN or infinite values.")
        top = 1.0 if img.mode == "F" else 65535.0
        img = Image.fromarray((arr / top * 255).round().clip(0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent areas become white
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def load_rgb(source: str | os.PathLike | bytes | Image.Image | np.ndarray) -> np.ndarray:
    """Read an image from a path, bytes, PIL image or array; bad input raises InputError with what to do."""
    if isinstance(source, np.ndarray):
        return array_to_rgb(source)
    if isinstance(source, Image.Image):
        return to_rgb(source)
    try:
        data = io.BytesIO(source) if isinstance(source, bytes) else Path(source)
        with Image.open(data) as img:
            if img.width * img.height > MAX_PIXELS:
                raise InputError(
                    f"The image is {img.width}x{img.height}: too large. Use one under {MAX_PIXELS // 1_000_000} MP."
                )
            check_shape(img.width, img.height)  # from the header, before the pixels are decoded
            img.load()
            return to_rgb(img)
    except InputError:
        raise
    except FileNotFoundError as e:
        raise InputError(f"Image not found: {_name(source)}") from e
    except Image.DecompressionBombError as e:
        raise InputError(f"The image is too large to decode safely (over {MAX_PIXELS // 1_000_000} MP).") from e
    except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        why = str(e).replace(str(source), _name(source)) if not isinstance(source, bytes) else str(e)
        raise InputError(f"Cannot read the image ({type(e).__name__}: {why}). Use a PNG, JPEG or WebP file.") from e


def _name(source) -> str:
    """A file's name only: error messages never show server paths (upload folders, models folders)."""
    return "the uploaded bytes" if isinstance(source, bytes) else Path(str(source)).name


def array_to_rgb(arr: np.ndarray) -> np.ndarray:
    """HxW, HxWx1, HxWx3 or HxWx4 array of any numeric type -> HxWx3 uint8."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InputError(f"Expected an image array HxW(x1/3/4), got shape {arr.shape}.")
    check_shape(arr.shape[1], arr.shape[0])
    if arr.dtype != np.uint8:
        # the type says what the values mean (never their range): float 0..1, 16-bit 0..65535, other integers 0..255
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        elif not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise InputError(f"Expected a numeric image array, got {arr.dtype}.")
        else:
            a = arr.astype(np.float64)
            if not np.isfinite(a).all():
                raise InputError("The image contains NaN or infinite values.")
            top = 1.0 if np.issubdtype(arr.dtype, np.floating) else 65535.0 if arr.dtype == np.uint16 else 255.0
            arr = (a / top * 255).round().clip(0, 255).astype(np.uint8)
    if arr.shape[2] == 4:
        alpha = arr[..., 3:4].astype(np.float32) / 255
        arr = (arr[..., :3] * alpha + 255 * (1 - alpha)).round().astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)


def resize_rgb(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Lanczos resize (what diffusers' image processor does); no-op at the right size."""
    if img.shape[1] == width and img.shape[0] == height:
        return img
    return np.asarray(Image.fromarray(img).resize((width, height), Image.LANCZOS))


def image_to_tensor(img: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> (1, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 255.0  # a writable copy


def mask_values(mask: np.ndarray) -> np.ndarray:
    """HxW (or HxWxC: the largest channel) mask of 0/1 or 0..255 -> HxW float32 in 0..1."""
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m.max(axis=2)
    m = m.astype(np.float32)
    return m / 255.0 if m.max() > 1 else m


def mask_to_tensor(mask: np.ndarray, width: int, height: int) -> torch.Tensor:
    """HxW (or HxWxC) mask, white/1 = repaint -> (1, 1, H, W) float {0, 1} at the picture size."""
    m = mask_values(mask)
    if m.shape != (height, width):
        m = np.asarray(Image.fromarray((m * 255).astype(np.uint8)).resize((width, height), Image.NEAREST)) / 255.0
    return torch.from_numpy((m > 0.5).astype(np.float32))[None, None]


def soft_mask(mask: np.ndarray, blur: float) -> np.ndarray:
    """HxW mask (white/1 = repaint) -> HxW float32 in [0, 1] with its edge blurred by a Gaussian of sigma `blur` px
    (the ControlNet 1.1 inpaint app's "Mask Blur"); 0 leaves it sharp."""
    m = mask_values(mask)
    m = (m > 0.5).astype(np.float32)
    if blur > 0:
        m = cv2.GaussianBlur(m, (0, 0), float(blur))
    return np.clip(m, 0.0, 1.0)


def encode_png(img: np.ndarray, parameters: str | None = None, extra: dict[str, str] | None = None) -> bytes:
    """The PNG file's bytes, with the generation parameters in a `parameters` text chunk (A1111's convention) and
    any `extra` text chunks."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    for key, value in (extra or {}).items():
        info.add_text(key, value)
    out = io.BytesIO()
    Image.fromarray(img).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def write_atomic(data: bytes, path: str | os.PathLike) -> None:
    """Written to a temporary file beside the target and renamed into place, so that a crash never leaves a
    half-written file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.part")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_png(img: np.ndarray, path: str | os.PathLike, parameters: str | None = None) -> None:
    """PNG with the generation parameters (`encode_png`), written atomically (`write_atomic`)."""
    write_atomic(encode_png(img, parameters), path)


def read_parameters(source: str | os.PathLike | bytes) -> str | None:
    """The A1111 `parameters` text a PNG carries (None when it has none); any file that is not a picture is an
    InputError. Only the header and the text chunks before the pixels are read: a PNG is read by Pillow's PNG reader
    itself, without `Image.open`'s check of the size the header claims (it guards decoding the pixels, which never
    happens here), so a picture of any size shows its parameters."""
    try:
        with io.BytesIO(source) if isinstance(source, bytes) else open(Path(source), "rb") as fp:
            is_png = fp.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
            fp.seek(0)
            with PngImagePlugin.PngImageFile(fp) if is_png else Image.open(fp) as img:
                text = img.info.get("parameters")
    except FileNotFoundError as e:
        raise InputError(f"Image not found: {_name(source)}") from e
    except Image.DecompressionBombError as e:  # another format (PNG never gets here): its size is checked on opening
        raise InputError(f"The picture is too large to open ({e}). Drop a PNG made by this app or by A1111.") from e
    except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise InputError(
            f"Cannot read the picture ({type(e).__name__}). Drop a PNG made by this app or by A1111."
        ) from e
    return text if isinstance(text, str) else None
