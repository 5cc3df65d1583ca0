"""Image preprocessing: encoded PNG/JPEG bytes -> the features a model was trained on."""

from __future__ import annotations

import io
import re
import struct
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from model_server.config import MAX_PIXELS, ImagePreprocess
from model_server.errors import InvalidInput, shown

# Refuse decompression bombs: an image of MAX_PIXELS at most. Decoding costs time in proportion
# to pixels, so a request's images together get twice that (64 images of 16 Mpx held a model
# 4.2 s; now a request's decoding is bounded like one large image's).
MAX_REQUEST_PIXELS = 2 * MAX_PIXELS
FORMATS = ("PNG", "JPEG")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Structure Pillow walks in Python, or libjpeg once per scan over the whole image: bounded before
# an image is opened. 16 MB of empty JPEG comments held the event loop 6.6 s in Image.open; a
# 16 kB JPEG of 478 scans over 4096x4096 pixels took 4.5 s to decode; 12 MB of empty PNG chunks,
# 4 s. Encoders write a few dozen header markers, at most 10 to 20 scans, IDAT chunks of 8 kB up.
MAX_JPEG_MARKERS = 1024  # before the first scan
MAX_JPEG_STRAY = 4096  # bytes between them that are no marker (Pillow skips them one at a time)
MAX_JPEG_SCANS = 64  # about what decoding a large photograph costs, at the pixel limit
MAX_PNG_CHUNKS = 16384
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})  # markers without a length
_JPEG_TO_MARKER = re.compile(rb"[^\xff]*\xff+")  # stray bytes, then fill bytes, before a marker's code
# EXIF's Orientation (tag 274) -> what turns the stored pixels upright, as a viewer shows them.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def structure_problem(data: bytes) -> str | None:
    """What makes a PNG or JPEG cost far more to open or decode than its size or its pixels
    (too many chunks, header segments or scans, stray bytes); None when nothing does. Bounded:
    at most MAX_PNG_CHUNKS or MAX_JPEG_MARKERS steps, the rest searched by bytes."""
    if data[:8] == _PNG_SIGNATURE:
        pos, chunks = 8, 0
        while pos + 8 <= len(data):
            chunks += 1
            if chunks > MAX_PNG_CHUNKS:
                return f"a PNG of over {MAX_PNG_CHUNKS} chunks"
            length, kind = struct.unpack_from(">I4s", data, pos)
            if kind == b"IEND":
                break
            pos += 12 + length
        return None
    if data[:2] != b"\xff\xd8":
        return None
    pos, markers, stray = 2, 0, 0
    while pos < len(data):
        found = _JPEG_TO_MARKER.match(data, pos)
        if found is None or found.end() == len(data):  # no marker after them: cut short
            stray += len(data) - pos
            break
        stray += found.end() - pos - 1  # all but the marker's own 0xFF
        marker, pos = data[found.end()], found.end() + 1
        if marker == 0xDA:  # the first scan: what follows is libjpeg's, which counts the scans
            scans = data.count(b"\xff\xda", pos - 2)
            if scans > MAX_JPEG_SCANS:
                return f"a JPEG of {scans} scans, over the limit of {MAX_JPEG_SCANS}"
            break
        if marker == 0xD9:
            break
        if marker == 0x00:  # a stuffed 0xFF: stray
            stray += 2
        else:
            markers += 1
            if markers > MAX_JPEG_MARKERS:
                return f"a JPEG of over {MAX_JPEG_MARKERS} markers before its first scan"
            if marker not in _JPEG_STANDALONE:
                pos += int.from_bytes(data[pos : pos + 2], "big")
        if stray > MAX_JPEG_STRAY:
            break
    if stray > MAX_JPEG_STRAY:
        return f"a JPEG with over {MAX_JPEG_STRAY} stray bytes between its header's markers"
    return None


def exif_orientation(exif: bytes) -> int:
    """The Orientation an image's EXIF block (as Pillow keeps it in ``info["exif"]``) records in
    its first directory: 1 (upright) when it records none or a value outside 1-8. Reads at most
    that directory's entries, each where its count says, and never raises."""
    data = exif[6:] if exif.startswith(b"Exif\0\0") else exif
    order = {b"II*\0": "<", b"MM\0*": ">"}.get(data[:4])
    if order is None or len(data) < 8:
        return 1
    (first,) = struct.unpack_from(order + "I", data, 4)
    if first + 2 > len(data):
        return 1
    (count,) = struct.unpack_from(order + "H", data, first)
    for entry in range(first + 2, min(first + 2 + 12 * count, len(data) - 11), 12):
        tag, kind, n = struct.unpack_from(order + "HHI", data, entry)
        if tag == 274:
            value = struct.unpack_from(order + "H", data, entry + 8)[0] if kind == 3 and n == 1 else 1
            return value if 1 <= value <= 8 else 1
    return 1


def declared_size(data: bytes) -> tuple[int, int] | None:
    """An image's width and height as its header declares them, nothing decoded; None where no
    PNG or JPEG header can be read. Pillow's DecompressionBombError (a header declaring far
    more pixels than it takes) passes through."""
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])  # PNG's header, read as PIL would
        return width, height
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as img:
                return img.width, img.height
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def image_problem(data: bytes) -> str | None:
    """Why the server would refuse an encoded image before decoding it (a structure that costs
    far more than its pixels, more than MAX_PIXELS declared); None when nothing does, bytes
    that are no PNG or JPEG included (decoding them says so)."""
    problem = structure_problem(data)
    if problem is not None:
        return problem
    try:
        size = declared_size(data)
    except Image.DecompressionBombError as exc:
        return f"not a decodable PNG or JPEG image ({shown(str(exc))})"
    if size is not None and size[0] * size[1] > MAX_PIXELS:
        return f"image of {size[0]}x{size[1]} pixels is over the limit of {MAX_PIXELS} pixels"
    return None


def check_pixels(images: np.ndarray, input_name: str) -> int:
    """The pixels the images declare together; refuse (400) a request whose images hold more
    than MAX_REQUEST_PIXELS, or one whose structure costs far more than its pixels
    (``structure_problem``), from the images' headers only: nothing is decoded and the model is
    never held."""
    total = 0
    for i, item in enumerate(images.reshape(-1)):
        data = bytes(item)
        problem = structure_problem(data)
        if problem is not None:
            raise InvalidInput(f"input '{input_name}' element {i}: {problem}")
        try:
            size = declared_size(data)
        except Image.DecompressionBombError:
            size = None  # decode_image names it, with its element
        if size is None:
            continue  # undecodable: decode_image names it, with its element
        total += size[0] * size[1]
        if total > MAX_REQUEST_PIXELS:
            raise InvalidInput(
                f"input '{input_name}': the images up to element {i} hold {total} pixels, over the "
                f"limit of {MAX_REQUEST_PIXELS} pixels per request; send fewer or smaller images"
            )
    return total


def decode_image(data: bytes, spec: ImagePreprocess, where: str) -> np.ndarray:
    """One encoded image -> float32 array of shape (height, width), grayscale, turned upright
    as its EXIF orientation says (unless the config says not to), scaled."""
    if not data:
        raise InvalidInput(f"{where}: empty image bytes")
    problem = structure_problem(data)
    if problem is not None:
        raise InvalidInput(f"{where}: {problem}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise InvalidInput(
                        f"{where}: image of {img.width}x{img.height} pixels is over the limit of {MAX_PIXELS} pixels"
                    )
                gray = img.convert("L")  # (a PNG's EXIF may follow its pixels: read after them)
                turn = _UPRIGHT.get(exif_orientation(img.info.get("exif", b""))) if spec.exif_orientation else None
                if turn is not None:  # (FLIP_LEFT_RIGHT is 0)
                    gray = gray.transpose(turn)
                if gray.size != (spec.width, spec.height):
                    gray = gray.resize((spec.width, spec.height), Image.Resampling.BOX)
                pixels = np.asarray(gray, dtype=np.float32)
    except InvalidInput:
        raise
    except UnidentifiedImageError:  # (its message names the buffer's address)
        raise InvalidInput(f"{where}: not a decodable PNG or JPEG image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInput(f"{where}: not a decodable PNG or JPEG image ({shown(str(exc))})") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt image data
        raise InvalidInput(f"{where}: corrupt image data ({shown(str(exc))})") from None
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
