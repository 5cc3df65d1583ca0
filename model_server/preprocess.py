"""Image preprocessing: encoded PNG/JPEG bytes -> the features a model was trained on."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from model_server.config import ImagePreprocess
from model_server.errors import InvalidInput

# Refuse decompression bombs: 4096 x 4096 is far more than any digit needs.
MAX_PIXELS = 4096 * 4096
FORMATS = ("PNG", "JPEG")


def decode_image(data: bytes, spec: ImagePreprocess, where: str) -> np.ndarray:
    """One encoded image -> float32 array of shape (height, width), grayscale, scaled."""
    if not data:
        raise InvalidInput(f"{where}: empty image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise InvalidInput(
                        f"{where}: image of {img.width}x{img.height} pixels is over the "
                        f"limit of {MAX_PIXELS} pixels"
                    )
                gray = img.convert("L")
                if gray.size != (spec.width, spec.height):
                    gray = gray.resize((spec.width, spec.height), Image.Resampling.BOX)
                pixels = np.asarray(gray, dtype=np.float32)
    except InvalidInput:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInput(f"{where}: not a decodable PNG or JPEG image ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt image data
        raise InvalidInput(f"{where}: corrupt image data ({exc})") from None
    if spec.invert:
        pixels = 255.0 - pixels
    return pixels * np.float32(spec.scale / 255.0)


def images_to_features(images: np.ndarray, spec: ImagePreprocess, input_name: str) -> np.ndarray:
    """A BYTES tensor of encoded images -> a float32 batch for the graph."""
    flat = images.reshape(-1)
    batch = np.empty((flat.shape[0], spec.height, spec.width), dtype=np.float32)
    for i, item in enumerate(flat):
        batch[i] = decode_image(bytes(item), spec, f"input '{input_name}' element {i}")
    if spec.flatten:
        return batch.reshape(flat.shape[0], spec.height * spec.width)
    return batch
