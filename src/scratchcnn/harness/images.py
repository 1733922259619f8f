"""Turn an arbitrary PNG/JPEG of a handwritten digit into an MNIST-like 28 x 28 image.

The steps follow how MNIST itself was made (LeCun et al.): the digit is cropped to its bounding
box, scaled (keeping its aspect ratio, with antialiasing) to fit a 20 x 20 box, and pasted into a
28 x 28 field so that its centre of mass sits at the centre. Before that the image is converted to
grayscale (transparent pixels count as white paper) and inverted when the digit is dark on a
light background (border brighter than mid-grey), because MNIST digits are light on black.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SIZE = 28
DIGIT_BOX = 20
INK_THRESHOLD = 0.1  # fraction of the brightest pixel that counts as ink when cropping


class ImageError(ValueError):
    """An image file that cannot be read or used; the message names the file."""


def grayscale_on_paper(image: Any) -> np.ndarray:
    """A loaded PIL image as a 2-D uint8 array (0 black .. 255 white), transparent pixels laid
    on white paper first: a digit drawn on a transparent canvas is dark ink on white. 16-bit,
    32-bit and float grayscale are scaled to 8 bits (see ``eight_bit_gray``)."""
    from PIL import Image

    if image.mode == "F" or image.mode.startswith("I"):
        return eight_bit_gray(image)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
        paper = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(paper, image)
    return np.asarray(image.convert("L"), dtype=np.uint8).copy()


_INT_SCALES = (255.0, 65535.0, 2.0**31 - 1)
_FLOAT_SCALES = (1.0, *_INT_SCALES)


def eight_bit_gray(image: Any) -> np.ndarray:
    """A PIL image of mode I;16*, I or F as a 2-D uint8 array, white at the top of its range.

    PIL's own convert("L") clips such values to 0..255 instead of scaling them, so a 16-bit
    PNG's paper and ink (say 60000 and 3000) both come out white. The range is the bit depth the
    mode declares (I;16: 0..65535); modes I and F do not declare one, so it is the narrowest
    usual range that holds the largest value (F: 0..1, then for both 0..255, 0..65535, the
    int32 range): a wider one would make the picture black. Never the image's own min..max,
    which would stretch a faint drawing into a bold one. A tRNS key colour counts as paper."""
    raw = np.asarray(image)
    values = np.nan_to_num(raw.astype(np.float64), nan=0.0)
    if image.mode.startswith("I;16"):
        full = 65535.0
    else:
        highest = values.max(initial=0.0)
        scales = _FLOAT_SCALES if image.mode == "F" else _INT_SCALES
        full = next((scale for scale in scales if highest <= scale), scales[-1])
    gray = np.clip(np.rint(values * (255.0 / full)), 0, 255).astype(np.uint8)
    key = image.info.get("transparency")
    if isinstance(key, (int, float)):
        gray[raw == key] = 255
    return gray


def read_grayscale(path: str | os.PathLike) -> np.ndarray:
    """The image at ``path`` as a 2-D uint8 array (0 black .. 255 white).

    Images above PIL's decompression-bomb limit (2 x ``PIL.Image.MAX_IMAGE_PIXELS``) raise
    ImageError; those between its warning threshold and that limit are read without a warning.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        # PIL's warning would print as a raw Python warning; such an image is only slow to read.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return grayscale_on_paper(image)
    except Image.DecompressionBombError as error:
        # PIL's message gives the image's size and the limit.
        raise ImageError(f"{path}: too large to be a digit: {error} Scale it down.") from None
    except FileNotFoundError:
        raise ImageError(f"{path}: no such image file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageError(
            f"{path}: cannot read the image ({error}); give a PNG or JPEG file"
        ) from None


def light_on_dark(gray: np.ndarray) -> np.ndarray:
    """``gray`` with the digit light on a dark background, inverting when the border is light."""
    border = np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])
    return (255 - gray) if border.mean() > 127 else gray


def center_digit(digit: np.ndarray) -> np.ndarray:
    """Crop to the ink, fit into 20 x 20 keeping the aspect ratio, centre by mass in 28 x 28.

    ``digit``: 2-D uint8, light digit on dark. Returns a (28, 28) uint8 array. A blank image is
    returned as a blank 28 x 28 field.
    """
    from PIL import Image

    ink = digit > INK_THRESHOLD * max(int(digit.max()), 1)
    if not ink.any() or digit.max() == 0:
        return np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    cropped = digit[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = cropped.shape
    scale = DIGIT_BOX / max(height, width)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    fitted = np.asarray(
        Image.fromarray(cropped).resize(new_size, Image.Resampling.LANCZOS), dtype=np.float64
    )
    mass = fitted.sum()
    ys, xs = np.indices(fitted.shape)
    centre_y = (ys * fitted).sum() / mass if mass > 0 else (fitted.shape[0] - 1) / 2
    centre_x = (xs * fitted).sum() / mass if mass > 0 else (fitted.shape[1] - 1) / 2
    middle = IMAGE_SIZE / 2  # MNIST's centres of mass sit at pixel index ~14, not 13.5
    top = int(np.clip(round(middle - centre_y), 0, IMAGE_SIZE - fitted.shape[0]))
    left = int(np.clip(round(middle - centre_x), 0, IMAGE_SIZE - fitted.shape[1]))
    field = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float64)
    field[top : top + fitted.shape[0], left : left + fitted.shape[1]] = fitted
    return np.clip(np.rint(field), 0, 255).astype(np.uint8)


def load_digit(path: str | os.PathLike) -> np.ndarray:
    """An image file as an MNIST-like (1, 28, 28) uint8 array, light digit on black."""
    gray = read_grayscale(path)
    if gray.ndim != 2 or min(gray.shape) < 1:
        raise ImageError(f"{path}: image has shape {gray.shape}; expected a 2-D picture")
    return center_digit(light_on_dark(gray))[np.newaxis]


def load_digits(paths: list[str | os.PathLike]) -> np.ndarray:
    """Several image files as an (N, 1, 28, 28) uint8 batch, in order."""
    return np.stack([load_digit(path) for path in paths])
