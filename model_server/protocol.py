"""KServe v2 inference request/response encoding, with Triton's binary tensor extension.

Transport-free: bytes in, typed objects out, and back. Every malformed input raises
``InvalidInput`` with a message naming the field that was wrong.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from model_server.config import (
    DATATYPES,
    MAX_DIMS,
    MAX_JSON_BYTES,
    TensorSpec,
    ascii_uint,
    json_problem,
    refuse_constant,
)
from model_server.errors import InvalidInput, ModelNotFound, PayloadTooLarge, shown

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_TENSORS = 1024  # inputs, or outputs asked for, in one request (a model has a few)
# numpy's largest array of 8-byte items (INT64, FP64, a BYTES tensor's objects): it refuses a
# shape whose bytes would pass 2**63-1, even one with a dimension of 0 that holds none
MAX_ELEMENTS = 2**60 - 1
# Binary BYTES elements in one request, every input's together: each is cut into a Python object
# on the event loop, about 0.6 us (a 64 MiB body of empty ones, 16 M, held every endpoint 9 s).
# (JSON ones are bounded by the JSON part: 4 MiB holds 1.3 M, parsed and made in 0.15 s.)
MAX_STRINGS = 65536


@dataclass
class InferInput:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    pixels: int = 0  # what its images declare, once the model has checked them (check_pixels)

    @property
    def nbytes(self) -> int:
        """The tensor's bytes; a BYTES tensor's, its elements' lengths."""
        if self.data.dtype == object:
            return sum(len(x) for x in self.data.reshape(-1))
        return int(self.data.nbytes)


@dataclass
class InferRequest:
    inputs: list[InferInput]
    outputs: dict[str, bool] | None  # requested output -> binary; None means all
    id: str | None = None
    binary_output_default: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)
    classification: dict[str, int] = field(default_factory=dict)  # output -> top classes asked


def _num_elements(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def _parse_bytes_tensor(buf: memoryview, count: int, where: str, before: int = 0) -> np.ndarray:
    """Triton's BYTES serialization: each element a 4-byte little-endian length, then bytes.
    ``before``: the binary BYTES elements of the request's inputs before this one (together at
    most MAX_STRINGS, refused before any is made)."""
    if count * 4 > len(buf):  # every element has a 4-byte length: refuse before allocating
        raise InvalidInput(f"{where}: {len(buf)} bytes cannot hold {count} BYTES elements")
    if before + count > MAX_STRINGS:
        raise InvalidInput(
            f"{where}: {count} binary BYTES elements ({before + count} in the request with the inputs "
            f"before it), over the limit of {MAX_STRINGS} per request"
        )
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(buf):
            raise InvalidInput(f"{where}: binary BYTES data ends before element {i} of {count}")
        (n,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if pos + n > len(buf):
            raise InvalidInput(f"{where}: binary BYTES element {i} claims {n} bytes past the end")
        out[i] = bytes(buf[pos : pos + n])
        pos += n
    if pos != len(buf):
        raise InvalidInput(f"{where}: {len(buf) - pos} trailing bytes after {count} BYTES elements")
    return out


def serialize_bytes_tensor(arr: np.ndarray) -> bytes:
    parts = []
    for item in arr.reshape(-1):
        b = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    if not data or not isinstance(data[0], list):
        return data
    out: list[Any] = []
    stack = [data]
    # Iterative flatten keeps deep nesting from hitting the recursion limit.
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
    return out


def _past_range(flat: list[Any], arr: np.ndarray, datatype: str, where: str, written: Callable[[int], str]) -> None:
    """Refuse a JSON number past the range of ``arr``'s float datatype (read as inf: JSON has no
    Infinity, so an inf is a number past it, 1e400 as Python's float reads it). A number too
    small for it is read as IEEE rounds it (0, or a subnormal), as Triton reads it.
    ``written(i)``: element ``i`` as the client wrote it (an infinite one, which ``flat`` lost)."""
    finite = np.isfinite(arr)
    if finite.all():
        return
    i = int(np.argmin(finite))
    try:
        text = repr(flat[i]) if math.isfinite(flat[i]) else written(i)
    except RecursionError:  # (read again a few frames deeper than the body was: "inf" it is)
        text = repr(flat[i])
    raise InvalidInput(
        f"{where}: element {i} ({text if len(text) <= 40 else repr(text[:40] + '...')}) is past {_range(datatype)}"
    )


def _range(datatype: str) -> str:
    """A numeric datatype's range, as a number past it is refused: "the range of FP16 (its
    largest magnitude is 65504)", "the range of INT8 (-128 to 127)"."""
    dtype = np.dtype(DATATYPES[datatype])
    if dtype.kind == "f":
        return f"the range of {datatype} (its largest magnitude is {np.finfo(dtype).max:g})"
    info = np.iinfo(dtype)
    return f"the range of {datatype} ({info.min} to {info.max})"


def _infinite_as_written(text: str) -> Any:
    """``json.loads``'s parse_float for ``_written``: a number past float64's range kept as its text."""
    value = float(text)
    return value if math.isfinite(value) else text


def _written(key: bytes, index: int, element: int) -> str:
    """Element ``element`` of input ``index``'s data in the JSON ``key`` (parsed already, so
    well formed) as written: parsed again to keep what float reads as inf (a refusal's only)."""
    header = json.loads(key.decode(), parse_float=_infinite_as_written)
    return str(_flatten(header["inputs"][index]["data"])[element])


# A hex literal (0x10, -0X1F, 0x1.8p3: C's forms, no JSON number), where json.loads read its
# "0" and stopped at its "x"; a number in a form JSON has not (01, +1, .5, 1.: C's and
# JavaScript's); and, before it, what is not a bracket (a string whole). Each run of digits is
# possessive: a client's 0x111...1g is not split again and again (linear).
HEX_LITERAL = re.compile(
    r"-?0[xX](?:[0-9a-fA-F]++(?:\.[0-9a-fA-F]*+)?|\.[0-9a-fA-F]++)(?:[pP][+-]?[0-9]++)?(?![^\]},\s])"
)
LOOSE_NUMBER = re.compile(r"[+-]?+(?:[0-9]++(?:\.[0-9]*+)?|\.[0-9]++)(?:[eE][+-]?[0-9]++)?(?![^\]},\s])")
LOOSE_PARTS = re.compile(r"([+-]?)([0-9]*+)(\.?)([0-9]*+)(.*)", re.DOTALL)  # sign, digits, point, digits, exponent
NOT_BRACKETS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[^\[\]{}"]+')
NUMBER_MARK = "-0.0E-0000000000"  # the number's stand-in: a number no client writes
DATA_LIST = re.compile(r'"data"\s*+:\s*+(\[)(\s*+\[)?')  # a "data" member that is a list (of lists?)
DATA_LIST_REVERSED = re.compile(r'\[\s*+:\s*+"atad"')  # its start, in a text reversed: the last one first
EMPTY_LIST = re.compile(r"\[\s*+\]")
PLAIN_STRING = re.compile(r'"[^"\\]*+"')  # a string with no escape in it
# A "data" member whose list holds numbers, true/false/null and lists of them alone, to
# MAX_DIMS levels (no string, no object): its list, as an earlier input's is read again, empty.
# Every run possessive, a match stopped at the first quote or brace: linear.
_NUMBERS_LIST = r'\[[^\[\]"{}]*+\]'
for _ in range(MAX_DIMS - 1):
    _NUMBERS_LIST = r'\[(?:[^\[\]"{}]++|' + _NUMBERS_LIST + r")*+\]"
NUMBERS_DATA = re.compile(r'"data"\s*+:\s*+' + _NUMBERS_LIST)


def _non_json_number(text: str, pos: int) -> tuple[int, str, str, tuple[str, str | None] | None] | None:
    """The number json.loads stopped in at ``pos`` where it is in a form JSON has not: where it
    starts, what is wrong with it, and the forms JSON writes it in (as it was written, and as
    an integer where its fraction is zeros; None for a hex literal: ``_hex_advice``); else
    None. json.loads stops at a hex literal's "x" or a leading zero's next digit (it read the
    "0"), at a leading "+" or ".", and at a point with no digit after it (it read the digits
    before)."""
    at = text[pos : pos + 1]
    if at and at in "xX0123456789" and text[pos - 1 : pos] == "0":
        start = pos - 1 - (text[pos - 2 : pos - 1] == "-")
    elif (
        at == "+" or (at == "-" and text[pos + 1 : pos + 2] == ".") or (at == "." and not text[pos - 1 : pos].isdigit())
    ):
        start = pos
    elif at == ".":
        start = len(text[:pos].rstrip("0123456789"))
        start -= text[start - 1 : start] == "-"
    else:
        return None
    if start and text[start - 1] not in "[,: \t\n\r":
        return None
    if at in "xX":
        hex_literal = HEX_LITERAL.match(text, start)
        return (start, hex_literal[0], "is a hex literal, which JSON has not", None) if hex_literal else None
    number = LOOSE_NUMBER.match(text, start)
    if number is None:
        return None
    parts = LOOSE_PARTS.fullmatch(number[0])
    assert parts is not None  # (every loose number is one)
    sign, digits, point, fraction, exponent = parts.groups()
    if sign == "+":
        what = "a leading plus"
    elif len(digits) > 1 and digits[0] == "0":
        what = "a leading zero"
    elif point and not digits:
        what = "no digit before its point"
    elif point and not fraction:
        what = "no digit after its point"
    else:
        return None
    integral = sign.strip("+") + (digits.lstrip("0") or "0")
    written = integral + (f".{fraction or 0}" if point else "") + exponent
    whole = integral if not exponent and not fraction.strip("0") else None
    return start, number[0], f"is a number with {what}, which JSON has not", (written, whole)


def _hex_advice(literal: str, datatype: Any) -> str:
    """How a hex literal in an input of ``datatype`` (as its JSON said it, if it did) is to be
    written: only a form that datatype takes ("" where the datatype is not known). Its exact
    value (``hex_value``; float.fromhex rounds to a double: 0x1.00000000000001p0, 1 + 2**-56,
    is 1.0 there) is judged as its decimal would be: one past the datatype's range is told so,
    in the words that decimal is refused with (no decimal is taken); a float datatype that
    cannot hold it says what it rounds it to (as the server reads that decimal: a double, then
    the datatype), the number to write to be read as sent; one whose exact decimal is longer
    than any double's (2**-1074's, the least) is told to write that number."""
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        return ""
    if datatype in ("BOOL", "BYTES"):
        return f": {datatype} data must be {'true/false' if datatype == 'BOOL' else 'JSON strings'}"
    negative = literal.startswith("-")
    value = hex_value(literal.lstrip("-")[2:].lower())
    if value is None:  # 0
        return ": write it in decimal"
    significand, power = value
    top = significand.bit_length() - 1 + power  # 2**top <= its magnitude < 2**(top + 1)
    if datatype.startswith(("INT", "UINT")):
        if power < 0:  # (an odd significand: 0x1.4 is 1.25, in decimal no integer either)
            return f": {datatype} data must be integers"
        info = np.iinfo(np.dtype(DATATYPES[datatype]))
        integer = None if top > 64 else (-1 if negative else 1) * (significand << power)
        if integer is None or not info.min <= integer <= info.max:
            return f": it is past {_range(datatype)}"
        return ": write it in decimal"
    try:  # (its exponent far past a double's range or under it: not given to float.fromhex)
        double = math.copysign(0.0, -negative) if top < -1100 else float.fromhex(literal) if top <= 1100 else math.inf
    except OverflowError:  # (its value, or the double it rounds to, 2**1024 or more)
        double = math.inf
    with np.errstate(over="ignore"):
        held = float(np.asarray(double, dtype=DATATYPES[datatype]))  # (as a decimal is read: a double, then it)
    if not math.isfinite(held):
        return f": it is past {_range(datatype)}"
    if hex_value(abs(held).hex()[2:]) == value:  # (its exact value: 0.0's is None)
        return ": write it in decimal"
    if power < -1074:  # (its decimal has -power digits after the point: 10**21 for 0x1p-99...9)
        return (
            f": write it as {held!r}, the value {datatype} rounds it to (its exact decimal is longer than any double's)"
        )
    return f": write it in decimal ({datatype} rounds it to {held!r})"


def hex_value(written: str) -> tuple[int, int] | None:
    """A hex float's value (its text after "0x", lowercase, unsigned: "1.8p3"), exactly and in
    linear time: an odd significand and the power of two that multiplies it; None for 0. An
    exponent of more than 20 digits is taken as 10**21 (or -10**21): past every type's range,
    or under it, its digits not read."""
    mantissa, _, exponent = written.partition("p")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    kept = digits.rstrip("0")
    if not kept:
        return None
    magnitude = exponent.lstrip("+-").lstrip("0")
    scale = int(magnitude or "0") if len(magnitude) <= 20 else 10**21
    significand = int(kept, 16)  # (a power-of-two base: int() reads any number of digits)
    power = (-scale if exponent.startswith("-") else scale) - 4 * len(fraction) + 4 * (len(digits) - len(kept))
    zero_bits = (significand & -significand).bit_length() - 1
    return significand >> zero_bits, power + zero_bits


def _taken(written: str, datatype: Any) -> bool:
    """Whether an input of ``datatype`` (as its JSON said it, if it did) takes the JSON number
    ``written`` as an element (read as json.loads reads it: an integer past 4300 digits refused)."""
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        return False
    try:
        value = float(written) if written.strip("+-0123456789") else int(written)
        _json_tensor({"data": [value]}, datatype, (1,), "", lambda _: written)
    except (ValueError, InvalidInput):
        return False
    return True


def _number_element(text: str, pos: int) -> str | None:
    """Why json.loads refused ``text`` at ``pos``, where that is in a number of a form JSON has
    not (``_non_json_number``: a hex literal, 01, +1, .5, 1.) and the number is an element of
    an input's data: that input, the element and the number, as a number past its range is
    named; else None (its place in the body is named, "char N"). The JSON before the number
    is well formed: it is read again (once, that far), closed after a stand-in."""
    found = _non_json_number(text, pos)
    if found is None:
        return None
    start, literal, why, forms = found
    head, before = text[:start], 0
    counted = _elements_before(text, start)
    if counted is not None:  # the JSON before the list read again, closed after [stand-in]
        head, before = text[: counted[0] + 1], counted[1]
    # Earlier inputs' data read again as empty lists, where numbers and lists alone: none of them
    # is in the refusal's words (a 4 MiB earlier input parsed again cost twice the body's parse).
    # A list closed before the number only: the one that holds it is not (in ``head``, whole).
    head = NUMBERS_DATA.sub('"data": []', head)  # (no group in it: each match not a Python call)
    opened = []
    for bracket in NOT_BRACKETS.sub("", head):
        if bracket in "[{":
            opened.append("]" if bracket == "[" else "}")
        elif opened:
            opened.pop()
    stand_in = object()
    stood: list[object] = []

    def number(written: str) -> Any:
        if written == NUMBER_MARK:
            stood.append(stand_in)
            return stand_in
        return float(written)

    try:
        header = json.loads(head + NUMBER_MARK + "".join(reversed(opened)), parse_float=number)
    except (ValueError, RecursionError):
        return None
    inputs = header.get("inputs") if isinstance(header, dict) else None
    if not isinstance(inputs, list) or not inputs or not isinstance(inputs[-1], dict) or "data" not in inputs[-1]:
        return None
    flat = _flatten(inputs[-1]["data"])
    if len(stood) != 1 or not flat or flat[-1] is not stand_in:
        return None
    name = inputs[-1].get("name")
    where = f"input '{shown(name)}'" if isinstance(name, str) else f"inputs[{len(inputs) - 1}]"  # (a name after it)
    datatype = inputs[-1].get("datatype")  # (None where it comes after the data)
    if forms is None:  # a hex literal
        why += _hex_advice(literal, datatype)
    else:  # the form its datatype takes (an integer one's: no point), where one does
        written = forms[1] if isinstance(datatype, str) and datatype.startswith(("INT", "UINT")) else forms[0]
        why += f": write it as {shown(written)}" if written is not None and _taken(written, datatype) else ""
    return f"{where}: element {before + len(flat) - 1} ({shown(literal)}) {why}"


def _elements_before(text: str, start: int) -> tuple[int, int] | None:
    """Where the list that holds the number at ``start`` opens, and the elements ``_flatten``
    reads in it before the number, where that list is a "data" member's value (an input's) and
    holds nothing but numbers, true/false/null, strings with no escape in them and lists of
    them (no object): counted, not parsed (a 4 MiB body's data parsed again cost twice its first
    parse): the commas less the empty lists (each list closed holds one element more than its
    commas, unless empty, and is itself an element of its list), each string one element, what
    it holds not read. Else None (the JSON before it read again whole)."""
    # The last before the number, in one search of the text before it reversed (strings "data"
    # in the data skipped as any other text). ("data" in quotes: a "data" key, or a key ending in
    # \"data: the parse of the JSON before the list then names it only if it is inputs[-1]["data"].)
    last = DATA_LIST_REVERSED.search(text[:start][::-1])
    value = None if last is None else DATA_LIST.match(text, start - last.end())
    if value is None:
        return None
    data = text[value.start(1) : start]
    if '"' in data:  # strings: each one element, what it holds not read (as "0")
        data = PLAIN_STRING.sub("0", data) if "\\" not in data else data
        if '"' in data:  # (an escape in one)
            return None
    # Past the list (a member after it, or an object in it), or no value's place (the last: as
    # "[1 .5", not parsed again, and then refused): read again whole.
    if ":" in data or "{" in data or "}" in data or data.rstrip()[-1] not in "[,":
        return None
    if not value[2] and "[" in data[1:]:  # (a list whose first element is no list: _flatten leaves it)
        return None
    return value.start(1), data.count(",") - len(EMPTY_LIST.findall(data))


def _json_tensor(
    raw: dict[str, Any], datatype: str, shape: tuple[int, ...], where: str, written: Callable[[int], str]
) -> np.ndarray:
    if not isinstance(raw["data"], list):  # (as Triton: '"data": 1' is no tensor's data, [1] is)
        raise InvalidInput(f"{where}: Unable to parse 'data': attempt to access JSON non-array as array")
    flat = _flatten(raw["data"])
    expected = _num_elements(shape)
    if len(flat) != expected:
        raise InvalidInput(f"{where}: shape {list(shape)} needs {expected} elements, data has {len(flat)}")
    if datatype == "BYTES":
        b64 = (raw.get("parameters") or {}).get("content_type") == "base64"
        out = np.empty(expected, dtype=object)
        for i, item in enumerate(flat):
            if not isinstance(item, str):
                raise InvalidInput(f"{where}: BYTES element {i} must be a string, got {type(item).__name__}")
            if b64:
                try:
                    out[i] = base64.b64decode(item, validate=True)
                except (binascii.Error, ValueError):
                    raise InvalidInput(f"{where}: BYTES element {i} is not valid base64") from None
            else:
                try:
                    out[i] = item.encode("utf-8")
                except UnicodeEncodeError:
                    raise InvalidInput(f"{where}: BYTES element {i} is not valid Unicode (a lone surrogate)") from None
        return out.reshape(shape)
    if datatype == "BOOL":
        if not all(isinstance(x, bool) for x in flat):
            raise InvalidInput(f"{where}: BOOL data must be true/false")
    elif not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in flat):
        bad = next(x for x in flat if not isinstance(x, (int, float)) or isinstance(x, bool))
        raise InvalidInput(f"{where}: {datatype} data must be numbers, found {shown(repr(bad))}")
    dtype = np.dtype(DATATYPES[datatype]).newbyteorder("=")
    floating = dtype.kind == "f"
    try:
        # A float datatype: a number past its range read as inf, refused by ``_past_range``.
        with np.errstate(over="ignore" if floating else "raise", invalid="raise"):
            arr = np.asarray(flat, dtype=dtype)
    except (OverflowError, FloatingPointError, ValueError, TypeError) as exc:
        if dtype.kind in "iu":  # (numpy's words named neither the element nor the range)
            info = np.iinfo(dtype)
            past = next((k for k, x in enumerate(flat) if not info.min <= x <= info.max), None)
            if past is not None:
                text = shown(repr(flat[past]))
                raise InvalidInput(f"{where}: element {past} ({text}) is past {_range(datatype)}") from None
        raise InvalidInput(f"{where}: data does not fit {datatype}: {exc}") from None
    if floating:
        _past_range(flat, arr, datatype, where, written)
    if datatype.startswith(("INT", "UINT")) and not all(isinstance(x, int) for x in flat):
        raise InvalidInput(f"{where}: {datatype} data must be integers")
    return arr.reshape(shape)


class _Layout(NamedTuple):
    """What a JSON part whose tensors are all binary said, once checked: the same bytes
    (a client sends the same header for every request of a shape) need no second parse."""

    inputs: tuple[tuple[str, str, tuple[int, ...], np.dtype | None, int], ...]  # dtype None: BYTES
    binary_size: int  # every input's binary_data_size together
    outputs: dict[str, bool] | None  # copied per request
    binary_output_default: bool
    parameters: dict[str, str | int | float | bool | None]  # copied per request
    classification: dict[str, int]  # copied per request


LAYOUTS: dict[bytes, _Layout] = {}  # by the JSON part's bytes; emptied when full
MAX_LAYOUTS = 256
MAX_LAYOUT_KEY = 4096  # bytes of a JSON part worth keeping (tritonclient's are a few hundred)


def _from_layout(layout: _Layout, binary: memoryview) -> InferRequest:
    inputs, offset = [], 0
    for name, datatype, shape, dtype, size in layout.inputs:
        chunk = binary[offset : offset + size]
        offset += size
        if dtype is None:
            data = _parse_bytes_tensor(chunk, _num_elements(shape), f"input '{name}'").reshape(shape)
        else:
            data = np.frombuffer(chunk, dtype=dtype).reshape(shape)
        inputs.append(InferInput(name, datatype, shape, data))
    outputs = None if layout.outputs is None else dict(layout.outputs)
    return InferRequest(
        inputs, outputs, None, layout.binary_output_default, dict(layout.parameters), dict(layout.classification)
    )


UINT64_MAX = 2**64 - 1
# Request parameters Triton reads as a uint64 (its HTTP frontend refuses any other value, for
# every model): what each must be, as a message says it.
UINT64_PARAMETERS = {"priority": "a non-negative integer", "timeout": f"an integer of microseconds in 0..{UINT64_MAX}"}


def _is_uint64(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= UINT64_MAX


def _finite_parameters(where: str, params: dict[str, Any]) -> None:
    """Refuse a number no double holds (1e400, read as inf) among ``params``' values, or in a list
    or an object one holds, as Triton's JSON parser refuses it anywhere; ``where``: "" for the
    request's own, else "input 'x': " and the like. (The body is parsed already, its depth bounded.)"""
    for key, value in params.items():
        if isinstance(value, float) and not math.isfinite(value):
            said = "is a number"
        elif isinstance(value, list | dict) and not _finite(value):
            said = "holds a number"
        else:
            continue
        raise InvalidInput(
            f"{where}parameter '{shown(str(key))}' {said} past a double's range "
            f"(its largest magnitude is {np.finfo(np.float64).max:g})"
        )


def _finite(value: Any) -> bool:
    """Whether no float in ``value`` (a JSON value: lists and objects looked into) is infinite."""
    left = [value]
    while left:
        item = left.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, list):
            left.extend(item)
        elif isinstance(item, dict):
            left.extend(item.values())
    return True


def uint64_parameter(parameters: dict[str, Any], name: str) -> int | None:
    """The request's ``parameters[name]`` (``UINT64_PARAMETERS``) when given; InvalidInput
    unless it is an integer in Triton's uint64 (a JSON integer has no bound; null is none)."""
    if name not in parameters:
        return None
    raw = parameters[name]
    if not _is_uint64(raw):
        over = isinstance(raw, int) and not isinstance(raw, bool) and raw > UINT64_MAX
        raise InvalidInput(
            f"parameters.{name} must be {UINT64_PARAMETERS[name]}, got {shown(repr(raw))}"
            + (f" (over {UINT64_MAX}, Triton's uint64)" if over else "")
        )
    return raw


# The request parameters Triton's HTTP frontend reads itself; any other goes to the model.
TRITON_PARAMETERS = frozenset(
    {"sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "binary_data_output"}
)


def _request_parameters(params: dict[str, Any]) -> None:
    """Refuse the request parameters Triton's HTTP frontend refuses, whatever the model."""
    for name in UINT64_PARAMETERS:
        uint64_parameter(params, name)
    sequence_id = params.get("sequence_id", "")  # (a model without sequence batching ignores these)
    if not isinstance(sequence_id, str) and not _is_uint64(sequence_id):
        raise InvalidInput(f"Unable to parse 'sequence_id': a uint64 or a string, got {shown(repr(sequence_id))}")
    for flag in ("sequence_start", "sequence_end"):
        if not isinstance(params.get(flag, False), bool):
            raise InvalidInput(f"Unable to parse '{flag}': must be true or false, got {shown(repr(params[flag]))}")
    if any(isinstance(key, str) and key.startswith("triton_") for key in params):
        raise InvalidInput(
            "parameter keys starting with 'triton_' are reserved for Triton usage and should not be specified."
        )
    for key, value in params.items():  # the model's own: a string, an integer, a boolean or a double
        if key not in TRITON_PARAMETERS and (value is None or isinstance(value, list | dict)):
            raise InvalidInput(
                f"parameter '{shown(key)}' has invalid type. It should be either 'int', 'bool', or 'string'."
            )
    _finite_parameters("", params)


def _no_shared_memory(where: str, params: dict[str, Any]) -> None:
    """Refuse a tensor in a shared memory region (Triton's shared memory extension, which this
    server does not implement: no region can be registered): an output asked there was answered
    in the body, where its client does not read it. A region named is not found (404), as Triton
    answers a region not registered."""
    region = params.get("shared_memory_region")
    if region is None:
        return
    if not isinstance(region, str):
        raise InvalidInput(f"{where}: Unable to parse 'shared_memory_region': a {type(region).__name__}, not a name")
    raise ModelNotFound(
        f"{where}: Unable to find shared memory region: '{shown(region[:80])}': shared memory is not supported by "
        "this server; send tensors in the request body"
    )


def is_raw_request(header_length: str | None) -> bool:
    """Whether a request is Triton's raw binary request: ``Inference-Header-Content-Length: 0``."""
    return header_length is not None and ascii_uint(header_length.strip()) == 0


def decode_raw_request(body: bytes, inputs: tuple[TensorSpec, ...], batched: bool) -> InferRequest:
    """Triton's raw binary request (its binary data extension): the body is the data of the
    model's one input, without a JSON part; its shape is deduced from the config's dims (here
    they hold the batch dimension: a batch of one where the model batches) as Triton's
    InferenceRequest::Normalize deduces it: at most one variable dimension, a BYTES input one
    element (the whole body). Every output is answered, in binary."""
    if len(inputs) != 1:
        raise InvalidInput(
            f"Raw request must only have 1 input to be deduced but got {len(inputs)} inputs in the model configuration"
        )
    spec = inputs[0]
    dims = spec.dims[1:] if batched else spec.dims
    variable = [i for i, d in enumerate(dims) if d == -1]
    if len(variable) > 1:
        raise InvalidInput(
            f"The shape of the raw input '{spec.name}' can not be deduced because there are more than one "
            "variable-sized dimension"
        )
    known = math.prod(d for d in dims if d != -1)
    if spec.datatype == "BYTES":
        if variable or known != 1:
            raise InvalidInput(f"For BYTE datatype raw input '{spec.name}', the model must have input shape [1]")
        shape = (1, *dims) if batched else dims
        data = np.empty(1, dtype=object)
        data[0] = body
        return InferRequest([InferInput(spec.name, spec.datatype, shape, data.reshape(shape))], None, None, True)
    dtype = np.dtype(DATATYPES[spec.datatype])
    sized = [len(body) // (known * dtype.itemsize) if d == -1 else d for d in dims]
    shape = (1, *sized) if batched else tuple(sized)
    if math.prod(d for d in shape if d) > MAX_ELEMENTS:  # (an empty body: a dimension 0 beside huge ones)
        raise InvalidInput(f"raw input '{spec.name}': shape {list(shape)} has more than 2**60-1 elements")
    if len(body) != math.prod(shape) * dtype.itemsize:
        raise InvalidInput(
            f"raw input '{spec.name}': {len(body)} bytes are not the {math.prod(shape) * dtype.itemsize} bytes of "
            f"shape {list(shape)} of {spec.datatype}"
        )
    data = np.frombuffer(body, dtype=dtype).reshape(shape)
    return InferRequest([InferInput(spec.name, spec.datatype, shape, data)], None, None, True)


def decode_infer_request(body: bytes, header_length: str | None, max_json_bytes: int = MAX_JSON_BYTES) -> InferRequest:
    """Parse a ``POST .../infer`` body (JSON, or JSON header + binary tensors). The JSON part is
    bounded (413 above ``max_json_bytes``): parsing it holds the interpreter, so every other
    request waits on it; binary tensors cost a copy at most. A JSON part seen before with
    binary tensors only is not parsed again (``LAYOUTS``): its tensors are cut from the binary
    part as the first one's were, when the binary part has the same length."""
    if header_length is not None:
        json_len = ascii_uint(header_length.strip())
        if json_len is None:
            raise InvalidInput(f"{HEADER_LENGTH} must be an integer, got {header_length[:40]!r}")
        if not 0 < json_len <= len(body):
            raise InvalidInput(f"{HEADER_LENGTH} is {json_len} but the body has {len(body)} bytes")
    else:
        json_len = len(body)
    if json_len > max_json_bytes:
        raise PayloadTooLarge(
            f"the JSON part of the request is {json_len} bytes, over the limit of {max_json_bytes} bytes; "
            "send large tensors as binary data (the binary tensor extension, tritonclient's default)"
        )
    key = body[:json_len]
    layout = LAYOUTS.get(key) if json_len <= MAX_LAYOUT_KEY else None
    if layout is not None and len(body) - json_len == layout.binary_size:
        return _from_layout(layout, memoryview(body)[json_len:])
    header = parse_json(key, _number_element, THEN_MORE if header_length is None else None)
    if not isinstance(header, dict):
        raise InvalidInput("request body must be a JSON object with an 'inputs' list")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("request must have a non-empty 'inputs' list")
    if len(raw_inputs) > MAX_TENSORS:
        raise InvalidInput(f"request has {len(raw_inputs)} inputs, over the limit of {MAX_TENSORS}")

    binary = memoryview(body)[json_len:]
    offset = 0
    inputs: list[InferInput] = []
    cuts: list[tuple[str, str, tuple[int, ...], np.dtype | None, int]] | None = []  # the layout
    seen: set[str] = set()
    strings = 0  # binary BYTES elements so far
    for i, raw in enumerate(raw_inputs):
        if not isinstance(raw, dict):
            raise InvalidInput(f"inputs[{i}] must be an object")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"inputs[{i}] needs a 'name' string")
        where = f"input '{shown(name)}'"
        if name in seen:
            raise InvalidInput(f"{where} is given more than once")
        seen.add(name)
        datatype = raw.get("datatype")
        if not isinstance(datatype, str) or datatype not in DATATYPES:  # (a list or an object: no key)
            raise InvalidInput(f"{where}: datatype {shown(repr(datatype))} is not one of {sorted(DATATYPES)}")
        shape_raw = raw.get("shape")
        if not isinstance(shape_raw, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape_raw
        ):
            raise InvalidInput(f"{where}: 'shape' must be a list of non-negative integers")
        if len(shape_raw) > MAX_DIMS or math.prod(d for d in shape_raw if d) > MAX_ELEMENTS:
            raise InvalidInput(f"{where}: a shape has at most {MAX_DIMS} dimensions and 2**60-1 elements")
        shape = tuple(shape_raw)
        params = raw.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidInput(f"{where}: 'parameters' must be an object")
        _no_shared_memory(where, params)
        size = params.get("binary_data_size")
        if size is not None:
            if "data" in raw:
                raise InvalidInput(f"{where}: has both 'data' and binary_data_size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidInput(f"{where}: binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise InvalidInput(
                    f"{where}: binary_data_size {size} runs past the end of the binary data "
                    f"({len(binary) - offset} bytes left)"
                    + (
                        ""
                        if header_length is not None
                        else f"; without an {HEADER_LENGTH} header the whole body is JSON"
                    )
                )
            chunk = binary[offset : offset + size]
            offset += size
            count = _num_elements(shape)
            dtype = None
            if datatype == "BYTES":
                data = _parse_bytes_tensor(chunk, count, where, strings).reshape(shape)
                strings += count
            else:
                dtype = np.dtype(DATATYPES[datatype])
                if size != count * dtype.itemsize:
                    raise InvalidInput(
                        f"{where}: shape {list(shape)} of {datatype} needs "
                        f"{count * dtype.itemsize} bytes, binary_data_size is {size}"
                    )
                data = np.frombuffer(chunk, dtype=dtype).reshape(shape)
            if cuts is not None:
                cuts.append((name, datatype, shape, dtype, size))
        elif "data" in raw:
            data = _json_tensor(raw, datatype, shape, where, functools.partial(_written, key, i))
            cuts = None  # the tensor is in the JSON: nothing to keep
        else:
            raise InvalidInput(f"{where}: needs 'data' or parameters.binary_data_size")
        _finite_parameters(f"{where}: ", params)
        inputs.append(InferInput(name, datatype, shape, data))
    if offset != len(binary):
        raise InvalidInput(
            f"{len(binary) - offset} bytes of binary data are not claimed by any input's binary_data_size"
        )

    params = header.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be an object")
    _request_parameters(params)
    binary_default = params.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidInput("parameters.binary_data_output must be true or false")
    outputs: dict[str, bool] | None = None
    classification: dict[str, int] = {}
    raw_outputs = header.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise InvalidInput("'outputs' must be a list")
        if len(raw_outputs) > MAX_TENSORS:
            raise InvalidInput(f"request asks for {len(raw_outputs)} outputs, over the limit of {MAX_TENSORS}")
        outputs = {}
        for i, out in enumerate(raw_outputs):
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise InvalidInput(f"outputs[{i}] needs a 'name' string")
            oparams = out.get("parameters") or {}
            if not isinstance(oparams, dict):
                raise InvalidInput(f"outputs[{i}]: 'parameters' must be an object")
            _no_shared_memory(f"output '{shown(out['name'])}'", oparams)
            count = oparams.get("classification", 0)
            if not _is_uint64(count):  # Triton's words; 2**70 or -1 would otherwise rank every class
                raise InvalidInput(
                    f"outputs[{i}]: Unable to set 'classification': attempt to access JSON non-unsigned-integer "
                    f"as unsigned-integer, got {shown(repr(count)[:40])}"
                )
            binary_data = oparams.get("binary_data", binary_default)
            if not isinstance(binary_data, bool):
                raise InvalidInput(f"outputs[{i}]: 'binary_data' must be true or false")
            _finite_parameters(f"output '{shown(out['name'])}': ", oparams)
            if out["name"] in outputs:  # named twice: the first entry's parameters, as Triton keeps them
                continue
            if count:
                classification[out["name"]] = count
            outputs[out["name"]] = binary_data
        outputs = outputs or None  # none named: every output, as Triton answers an empty list
    req_id = header.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise InvalidInput("'id' must be a string")
    # Kept: binary tensors only, no id (a client naming its requests repeats no JSON part), and
    # its parameters, all plain values (copied per request; nothing of one request shared with another).
    if cuts is not None and req_id is None and json_len <= MAX_LAYOUT_KEY:
        if len(LAYOUTS) >= MAX_LAYOUTS:
            LAYOUTS.clear()
        kept = None if outputs is None else dict(outputs)
        LAYOUTS[key] = _Layout(tuple(cuts), offset, kept, binary_default, dict(params), dict(classification))
    return InferRequest(inputs, outputs, req_id, binary_default, params, classification)


# Triton's classification extension: the types whose values it ranks.
CLASSIFIABLE = frozenset({"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP32", "FP64"})


def top_classes(arr: np.ndarray, datatype: str, count: int, batched: bool, labels: tuple[str, ...] = ()) -> np.ndarray:
    """An output as Triton's classification extension answers it: for each batch item (the whole
    tensor when the model does not batch) its ``count`` highest values, highest first (equal
    values by index, NaN last), each the BYTES string "value:index" (a float as C's %f writes
    it), then ":label" where the output's labels have one for that index; shape [batch,
    min(count, classes)], or [min(count, classes)] without a batch dimension."""
    if datatype not in CLASSIFIABLE:
        raise InvalidInput(f"class result not available for output due to unsupported type '{datatype}'")
    batch = batched and arr.ndim > 0 and arr.shape[0] > 0  # (an empty batch: as Triton, no batch)
    rows = arr.reshape(arr.shape[0], math.prod(arr.shape[1:])) if batch else arr.reshape(1, arr.size)
    k = min(count, rows.shape[1])
    # Ascending on the values negated (ints bitwise: exact at their limits), stable: by index.
    order = np.argsort(-rows if rows.dtype.kind == "f" else ~rows, axis=1, kind="stable")[:, :k]
    values = np.take_along_axis(rows, order, axis=1).tolist()
    number = _c_float if datatype.startswith("FP") else str
    out = np.empty((rows.shape[0], k), dtype=object)
    for b, (picked, vals) in enumerate(zip(order.tolist(), values, strict=True)):
        out[b] = [
            f"{number(v)}:{i}{':' + labels[i] if i < len(labels) and labels[i] else ''}".encode()
            for i, v in zip(picked, vals, strict=True)
        ]
    return out if batch else out.reshape(k)


def _c_float(value: float) -> str:
    """As C++'s std::to_string (printf's %f) writes a float, a negative NaN "-nan" included."""
    if value != value and math.copysign(1.0, value) < 0:
        return "-nan"
    return f"{value:f}"


THEN_MORE = (
    f"the body is JSON followed by other bytes (binary data?): a request with binary tensors "
    f"needs the {HEADER_LENGTH} header, the length of its JSON part"
)


def _json_then_more(text: str, refused: BaseException | None) -> bool:
    """Whether ``text`` is a JSON value followed by other text (a request's binary part sent
    without its JSON part's length), read from its first non-space: asked only of a body
    refused. ``refused``: json.loads's refusal of it (None: it was no UTF-8, and ``text`` is it
    decoded with replacement characters). Where the refusal tells (json.loads read a value whole
    and found more; or it stopped where a parse from the same place stops too, at the same
    fault or integer), it is not parsed again; else it is, once."""
    start = len(text) - len(text.lstrip())
    if isinstance(refused, json.JSONDecodeError):
        if refused.msg == "Extra data":  # (json.loads's words: the value read whole, more after it)
            return bool(text[refused.pos :].strip())
        if start == len(text) - len(text.lstrip(" \t\n\r")):  # json.loads started there too
            return False
    elif isinstance(refused, ValueError) and "integer string conversion" in str(refused):
        return False
    try:  # a NaN (json.loads refused it, raw_decode reads it), nesting, a start after other spaces
        _, end = json.JSONDecoder().raw_decode(text, start)
    except (ValueError, RecursionError):
        return False
    return bool(text[end:].strip())


def parse_json(
    body: bytes | bytearray | memoryview,
    told: Callable[[str, int], str | None] | None = None,
    then_more: str | None = None,
) -> Any:
    """A request body's JSON, as Triton (RapidJSON) reads it: UTF-8 without a byte order mark
    (RFC 8259: JSON between systems is UTF-8, and no BOM is added), no NaN or Infinity.
    ``json.loads`` alone takes UTF-16 and UTF-32 bodies and a UTF-8 BOM, which a check on the
    bytes does not see through; they are refused (400) with what is wrong. ``told(text, pos)``:
    a refusal at ``pos`` in the caller's words (a field it names), or None (the place named).
    ``then_more``: the refusal of a body that is JSON followed by other bytes, before any other
    (None: not told). A refused body is parsed once, and at most once more to explain it."""
    data = bytes(body)
    if data.startswith((b"\xef\xbb\xbf", b"\xfe\xff", b"\xff\xfe")):  # (no JSON value starts so)
        raise InvalidInput("malformed JSON in request body: it starts with a byte order mark; send UTF-8 without one")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if then_more is not None and _json_then_more(data.decode("utf-8", "replace"), None):
            raise InvalidInput(then_more) from None
        raise InvalidInput(
            f"malformed JSON in request body: not UTF-8 (byte {exc.start}); JSON is sent as UTF-8"
        ) from None
    # NaN, Infinity, -Infinity: read on where what follows may be told ("JSON then other bytes"),
    # then refused; else refused where read (a 4 MiB part's early NaN read on cost a whole parse).
    constants: list[str] = []
    try:
        value = json.loads(text, parse_constant=constants.append if then_more is not None else refuse_constant)
    except (ValueError, RecursionError) as exc:
        if then_more is not None and _json_then_more(text, exc):
            raise InvalidInput(then_more) from None
        if not constants:  # (else the first fault in the body is the constant)
            why = told(text, exc.pos) if told is not None and isinstance(exc, json.JSONDecodeError) else None
            raise InvalidInput(why or f"malformed JSON in request body: {json_problem(exc, text)}") from None
    if constants:
        try:
            refuse_constant(constants[0])
        except ValueError as exc:
            raise InvalidInput(f"malformed JSON in request body: {json_problem(exc, text)}") from None
    return value


def _json_data(arr: np.ndarray, datatype: str) -> list[Any]:
    flat = arr.reshape(-1)
    if datatype == "BYTES":
        return [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in flat]
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():  # JSON has no NaN or Infinity: null
        return [x if np.isfinite(x) else None for x in flat.tolist()]
    return flat.tolist()


RESPONSE_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False)  # made once, not per response


def encode_infer_response(
    model: str,
    version: str,
    outputs: list[tuple[str, str, np.ndarray, bool]],
    request_id: str | None = None,
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """Build the response body; returns (body, json_header_length or None when all JSON)."""
    parameters = parameters or {}
    blobs: list[bytes] = []
    sizes = []
    for name, datatype, arr, binary in outputs:
        if not binary:
            break
        blobs.append(_blob(arr, datatype))
        sizes.append((name, datatype, arr.shape, len(blobs[-1])))
    else:
        if outputs:  # (none: a JSON answer)
            head = _binary_head(model, version, request_id, parameters, tuple(sizes))
            return head + b"".join(blobs), len(head)
    outs = [_binary_output(*size) for size in sizes]  # the binary ones before the first JSON one
    for name, datatype, arr, binary in outputs[len(sizes) :]:
        if binary:
            blobs.append(_blob(arr, datatype))
            outs.append(_binary_output(name, datatype, arr.shape, len(blobs[-1])))
        else:
            outs.append(
                {"name": name, "datatype": datatype, "shape": list(arr.shape), "data": _json_data(arr, datatype)}
            )
    head = RESPONSE_JSON.encode(_header(model, version, request_id, parameters, outs)).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def _blob(arr: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return serialize_bytes_tensor(arr)
    return np.ascontiguousarray(arr, dtype=np.dtype(DATATYPES[datatype])).tobytes()


def _binary_output(name: str, datatype: str, shape: tuple[int, ...], size: int | str) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": list(shape), "parameters": {"binary_data_size": size}}


def _header(
    model: str, version: str, request_id: str | None, parameters: dict[str, Any], outputs: list[dict[str, Any]]
) -> dict[str, Any]:
    header: dict[str, Any] = {"model_name": model, "model_version": version}
    if request_id is not None:
        header["id"] = request_id
    if parameters:
        header["parameters"] = parameters
    header["outputs"] = outputs
    return header


# The JSON part of a response with binary outputs, as text around its request id and its
# parameters' values (the feedback token), by what fixes the rest: encoded once, not per response.
HEADS: dict[tuple[Any, ...], list[str]] = {}  # emptied when full
MAX_HEADS = 256
HOLE = "\0"


def _binary_head(
    model: str,
    version: str,
    request_id: str | None,
    parameters: dict[str, Any],
    sizes: tuple[tuple[str, str, tuple[int, ...], int], ...],
) -> bytes:
    def outs() -> list[dict[str, Any]]:
        return [_binary_output(*size) for size in sizes]

    values: list[Any] = list(parameters.values())
    if request_id is not None:
        values.insert(0, request_id)
    # A BYTES output's size follows its values (strings, class results): a hole as well.
    values += [size for _, datatype, _, size in sizes if datatype == "BYTES"]
    fixed = tuple(
        (name, datatype, shape, HOLE if datatype == "BYTES" else size) for name, datatype, shape, size in sizes
    )
    key = (model, version, request_id is not None, *parameters, fixed)
    pieces = HEADS.get(key)
    if pieces is None:
        holes = dict.fromkeys(parameters, HOLE)
        head = _header(model, version, None if request_id is None else HOLE, holes, [_binary_output(*f) for f in fixed])
        text = RESPONSE_JSON.encode(head)
        pieces = text.split(RESPONSE_JSON.encode(HOLE))
        if len(pieces) != len(values) + 1:  # a name that is the hole itself: not kept
            pieces = None
        else:
            if len(HEADS) >= MAX_HEADS:
                HEADS.clear()
            HEADS[key] = pieces
    if pieces is None:
        return RESPONSE_JSON.encode(_header(model, version, request_id, parameters, outs())).encode()
    text = pieces[0]
    for value, piece in zip(values, pieces[1:], strict=True):
        text += RESPONSE_JSON.encode(value) + piece
    return text.encode()
