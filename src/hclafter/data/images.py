"""Reading images robustly: any colour mode to 8-bit RGB, EXIF orientation, cheap decoding of
huge JPEGs, a pixel budget for the others, and errors that name the file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..core.config import MAX_IMAGE_PIXELS

# Decode JPEGs at no more than this size (the model sees 224-336 px); keeps huge images cheap.
DRAFT_SIZE = (1024, 1024)


class ImageError(ValueError):
    """An image file that cannot be used, with the reason."""


class ImageTooLarge(ImageError):
    """An image of more pixels than the budget, even decoded reduced."""

    def __init__(self, path: Path, width: int, height: int, budget: int) -> None:
        super().__init__(f"{path}: {width}×{height} = {width * height / 1e6:.0f} megapixels to decode, more than "
                         f"data.max_image_pixels={budget}; shrink the image, or raise data.max_image_pixels")
        self.width, self.height = width, height


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: alpha is composited on white, 16-bit and float images are rescaled, CMYK,
    palette and grayscale are converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        if image.mode == "I" and values.max() <= 255:
            top = 255.0
        image = Image.fromarray(np.clip(values / top * 255.0, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str | Path, draft: tuple[int, int] = DRAFT_SIZE,
             max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open, orient and convert an image, a JPEG decoded at reduced size (at least ``draft``). An
    image of more than ``max_pixels`` pixels, even at the reduced size of ``DRAFT_SIZE`` (a PNG
    cannot be reduced), is refused before decoding (ImageTooLarge): decoding a 12000×12000 PNG to
    resize it to 224 would cost 2.6 GB. Raises ImageError naming the file."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: empty file (0 bytes)")
        with Image.open(path) as im:
            im.draft("RGB", DRAFT_SIZE)
            if im.width * im.height > max_pixels:
                raise ImageTooLarge(path, im.width, im.height, max_pixels)
            if draft == DRAFT_SIZE:
                return _decoded(im)
        with Image.open(path) as im:  # a draft only reduces once: open again for a smaller one
            im.draft("RGB", draft)
            return _decoded(im)
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: image too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{path}: cannot decode image ({e})") from None


def _decoded(im: Image.Image) -> Image.Image:
    im.load()
    return to_rgb(ImageOps.exif_transpose(im))
