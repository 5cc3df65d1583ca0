"""Image preprocessing: encoded PNG/JPEG bytes -> the features a model was trained on."""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from model_server.config import ImagePreprocess
from model_server.errors import InvalidInput

# Refuse decompression bombs: 4096 x 4096 is far more than any digit needs. Decoding costs
# time in proportion to pixels, so a request's images together get twice that (64 images of
# 16 Mpx held a model 4.2 s; now a request's decoding is bounded like one large image's).
MAX_PIXELS = 4096 * 4096
MAX_REQUEST_PIXELS = 2 * MAX_PIXELS
FORMATS = ("PNG", "JPEG")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_pixels(images: np.ndarray, input_name: str) -> None:
    """Refuse (400) a request whose images hold more than MAX_REQUEST_PIXELS together, from the
    images' headers only: nothing is decoded and the model is never held."""
    total = 0
    for i, item in enumerate(images.reshape(-1)):
        data = bytes(item)
        if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
            width, height = struct.unpack(">II", data[16:24])  # PNG's header, read as PIL would
            total += width * height
        else:
            try:
                with Image.open(io.BytesIO(data), formats=FORMATS) as img:
                    total += img.width * img.height
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                continue  # undecodable: decode_image names it, with its element
        if total > MAX_REQUEST_PIXELS:
            raise InvalidInput(
                f"input '{input_name}': the images up to element {i} hold {total} pixels, over the "
                f"limit of {MAX_REQUEST_PIXELS} pixels per request; send fewer or smaller images"
            )


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
                        f"{where}: image of {img.width}x{img.height} pixels is over the limit of {MAX_PIXELS} pixels"
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
