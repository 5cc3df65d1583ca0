"""Image preprocessing: EXIF orientation, as a viewer shows a photograph."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import tritonclient.http as httpclient
from PIL import Image

from model_server.config import ImagePreprocess
from model_server.preprocess import decode_image, exif_orientation

# orientation -> how a camera stores an upright picture under it (the inverse of turning it upright)
STORED = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def encoded(image: Image.Image, fmt: str, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    if orientation is None:
        image.save(buf, format=fmt)
    else:
        exif = Image.Exif()
        exif[274] = orientation
        image.save(buf, format=fmt, exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_an_image_stored_turned_is_decoded_upright_as_its_exif_says(orientation):
    upright = Image.fromarray(np.random.default_rng(orientation).integers(0, 256, (24, 32), dtype=np.uint8))
    stored = encoded(upright.transpose(STORED[orientation]), "PNG", orientation)
    spec = ImagePreprocess("input", 32, 24, 1.0, flatten=False)
    expected = decode_image(encoded(upright, "PNG"), spec, "element")
    np.testing.assert_array_equal(decode_image(stored, spec, "element"), expected)
    if orientation != 3:  # (turned half round, a 24x32 picture keeps its size)
        off = ImagePreprocess("input", 32, 24, 1.0, flatten=False, exif_orientation=False)
        assert not np.array_equal(decode_image(stored, off, "element"), expected)


def test_a_sideways_phone_photo_of_a_digit_is_classified_upright(server, digit_images):
    """A JPEG stored sideways with Orientation 6 (a phone held upright) gets the upright answer
    through the server, where its stored pixels alone get another."""
    client = server.client()

    def answer(image: bytes) -> int:
        inp = httpclient.InferInput("image", [1], "BYTES")
        inp.set_data_from_numpy(np.array([image], dtype=object))
        return int(client.infer("digits", [inp]).as_numpy("probabilities")[0].argmax())

    checked = 0
    for png, label in digit_images[:60]:
        upright = Image.open(io.BytesIO(png)).convert("L")
        sideways = upright.transpose(STORED[6])
        if answer(encoded(upright, "JPEG")) != label or answer(encoded(sideways, "JPEG")) == label:
            continue
        assert answer(encoded(sideways, "JPEG", orientation=6)) == label
        checked += 1
    assert checked >= 5
    client.close()


def exif_block(order: str, entries: list[tuple[int, int, int, bytes]], count: int | None = None) -> bytes:
    """A TIFF header and one directory of (tag, type, count, 4 value bytes) entries."""
    head = (b"II*\0" if order == "<" else b"MM\0*") + struct.pack(order + "I", 8)
    body = struct.pack(order + "H", len(entries) if count is None else count)
    for tag, kind, n, value in entries:
        body += struct.pack(order + "HHI", tag, kind, n) + value
    return b"Exif\0\0" + head + body


@pytest.mark.parametrize(
    ("exif", "expected"),
    [
        (exif_block("<", [(271, 2, 4, b"abc\0"), (274, 3, 1, b"\x06\0\0\0")]), 6),
        (exif_block(">", [(274, 3, 1, b"\0\x08\0\0")]), 8),
        (exif_block("<", [(274, 3, 1, b"\x09\0\0\0")]), 1),  # no such orientation
        (exif_block("<", [(274, 4, 1, b"\x06\0\0\0")]), 1),  # not a SHORT
        (exif_block("<", [(274, 3, 2, b"\x06\0\x06\0")]), 1),  # two values
        (exif_block("<", [(274, 3, 1, b"\x06\0\0\0")])[:-3], 1),  # cut inside the entry
        (exif_block("<", [(271, 2, 4, b"abc\0")], count=65535), 1),  # a count past the block
        (b"Exif\0\0II*\0\xff\xff\xff\xff", 1),  # a directory past the block
        (b"Exif\0\0XX*\0", 1),
        (b"", 1),
    ],
)
def test_exif_orientation_reads_its_tag_and_nothing_past_the_block(exif, expected):
    assert exif_orientation(exif) == expected
