"""From a drawn picture to predictions: decoding, MNIST-like preprocessing, both models.

The page sends the canvas as a PNG (a ``data:`` URL). It is made MNIST-like exactly as
``scratchcnn predict`` makes an image file (``harness/images.py``: grayscale over white paper,
inverted when dark on light, cropped, fitted into 20 x 20, centred by mass in 28 x 28) and
normalised with the checkpoint's mean and std. The NumPy model then runs layer by layer under
``no_grad``, so the output of every ``Conv2d`` can be kept as a feature map on the way; the
PyTorch twin (``reference.torch_models.torch_twin``: the same weights, copied) runs as one call.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import io
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from scratchcnn import nn
from scratchcnn.data import normalize
from scratchcnn.formats.checkpoint import Checkpoint
from scratchcnn.harness.images import (
    IMAGE_SIZE,
    center_digit,
    grayscale_on_paper,
    light_on_dark,
)

MIN_SIDE = IMAGE_SIZE  # a drawing smaller than MNIST's own images is not a drawing
MAX_SIDE = 1024  # the page's canvas is 280 x 280; this bounds the decoded size (no PNG bombs)
_FORMATS = ("PNG", "JPEG")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class InputError(ValueError):
    """A request's image that cannot be used; the message is one line for the user."""


def decode_image(text: Any) -> np.ndarray:
    """A PNG or JPEG given as a ``data:`` URL or bare base64, as a 2-D uint8 array (0 black ..
    255 white; transparent pixels count as white paper). InputError for anything else, or for
    a picture whose sides are outside ``MIN_SIDE``..``MAX_SIDE`` (checked before decoding)."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(text, str):
        raise InputError(f'"image" must be a string (a data: URL of a PNG), got '
                         f"{type(text).__name__}")
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise InputError('"image" is a data: URL without base64 data; send '
                             "canvas.toDataURL('image/png')")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError('"image" is not valid base64') from None
    try:
        with Image.open(io.BytesIO(raw), formats=_FORMATS) as image:
            _check_size(*image.size)
            image.load()
            return grayscale_on_paper(image)
    except InputError:
        raise
    except Image.DecompressionBombError:
        # PIL refuses it in open(), before its size can be asked for; a PNG says it in IHDR.
        if raw.startswith(_PNG_SIGNATURE) and raw[12:16] == b"IHDR" and len(raw) >= 24:
            _check_size(*struct.unpack(">II", raw[16:24]))
        raise InputError(f"the image is too large; each side must be between {MIN_SIDE} and "
                         f"{MAX_SIDE} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InputError('"image" is not a PNG or JPEG picture') from None


def _check_size(width: int, height: int) -> None:
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise InputError(f"the image is {width} x {height} pixels; each side must be between "
                         f"{MIN_SIDE} and {MAX_SIDE}") from None


def mnist_like(gray: np.ndarray) -> np.ndarray:
    """A 2-D uint8 drawing as the (28, 28) uint8 image the model sees (light digit on black)."""
    return center_digit(light_on_dark(gray))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, the maximum subtracted first."""
    shifted = np.asarray(logits, dtype=np.float64)
    shifted = shifted - shifted.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def gray_levels(maps: np.ndarray) -> np.ndarray:
    """(C, H, W) floats as uint8 gray levels, each channel stretched from its own minimum
    (black) to its maximum (white); a constant channel is black."""
    maps = np.asarray(maps, dtype=np.float64)
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    scaled = np.divide(maps - low, span, out=np.zeros_like(maps), where=span > 0)
    return np.rint(scaled * 255).astype(np.uint8)


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=np.uint8).tobytes()).decode()


@dataclass
class FeatureMap:
    layer: str        # the layer's name in the Sequential ("0", "3", ...)
    description: str  # e.g. "Conv2d(1, 16, kernel_size=3, padding=1)"
    output: np.ndarray  # (C, H, W), the layer's output for the one image


class Predictor:
    """A checkpoint's NumPy model (and its PyTorch twin when ``torch`` is True and PyTorch is
    installed), ready to classify drawings. Calls are serialised by a lock: the models are
    shared, and two inferences at once would only compete for the same cores."""

    def __init__(self, checkpoint: Checkpoint, torch: bool = True) -> None:
        self.checkpoint = checkpoint
        self.model = checkpoint.build_model()
        self.model.eval()
        self.twin = None
        self.torch_version: str | None = None
        if torch and importlib.util.find_spec("torch") is not None:
            import torch as torch_module

            from scratchcnn.reference.torch_models import torch_twin

            self.twin = torch_twin(self.model, checkpoint.architecture).eval()
            self.torch_version = torch_module.__version__
        self._lock = threading.Lock()
        # One blank image through both models, so that the first drawing's times are not
        # one-time start-up costs (first calls into BLAS and torch, first allocations).
        self.predict(np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8))

    def info(self) -> dict[str, Any]:
        checkpoint = self.checkpoint
        return {
            "checkpoint": str(checkpoint.path) if checkpoint.path else None,
            "architecture": checkpoint.architecture,
            "dataset": checkpoint.metadata.get("dataset"),
            "epoch": checkpoint.epoch,
            "dtype": str(checkpoint.dtype),
            "classes": list(checkpoint.classes),
            "torch": self.torch_version,
            "layers": [f"{name}: {layer.describe()}"
                       for name, layer in self.model.named_children()],
        }

    def normalized(self, pixels: np.ndarray) -> np.ndarray:
        """(28, 28) uint8 -> the (1, 1, 28, 28) model input in the checkpoint's dtype."""
        return normalize(pixels[np.newaxis, np.newaxis], self.checkpoint.mean,
                         self.checkpoint.std, dtype=self.checkpoint.dtype)

    def run_numpy(self, x: np.ndarray) -> tuple[np.ndarray, list[FeatureMap], float]:
        """Logits of the NumPy model for input ``x``, run layer by layer under ``no_grad``, the
        output of each Conv2d on the way, and the seconds the layers took."""
        maps: list[FeatureMap] = []
        start = time.perf_counter()
        with nn.no_grad():
            for name, layer in self.model.named_children():
                x = layer(x)
                if isinstance(layer, nn.Conv2d):
                    maps.append(FeatureMap(name, layer.describe(), np.array(x[0], copy=True)))
        return np.asarray(x), maps, time.perf_counter() - start

    def run_torch(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(x))
        start = time.perf_counter()
        with torch.no_grad():
            logits = self.twin(tensor)
        seconds = time.perf_counter() - start
        return logits.numpy(), seconds

    def predict(self, pixels: np.ndarray) -> dict[str, Any]:
        """Everything the page shows for one MNIST-like (28, 28) uint8 image."""
        x = self.normalized(pixels)
        with self._lock:
            logits, maps, seconds = self.run_numpy(x)
            torch_result = self.run_torch(x) if self.twin is not None else None
        result: dict[str, Any] = {
            "input": {"height": IMAGE_SIZE, "width": IMAGE_SIZE, "data": _b64(pixels)},
            "numpy": self._answer(logits, seconds),
            "torch": self._answer(*torch_result) if torch_result is not None else None,
            "feature_maps": [
                {"layer": fm.layer, "description": fm.description,
                 "channels": int(fm.output.shape[0]), "height": int(fm.output.shape[1]),
                 "width": int(fm.output.shape[2]), "data": _b64(gray_levels(fm.output))}
                for fm in maps
            ],
        }
        return result

    def _answer(self, logits: np.ndarray, seconds: float) -> dict[str, Any]:
        probabilities = softmax(logits[0])
        index = int(probabilities.argmax())
        return {
            "index": index,
            "label": self.checkpoint.classes[index],
            "probabilities": [float(p) for p in probabilities],
            "milliseconds": seconds * 1e3,
        }
