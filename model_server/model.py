"""One loaded model version: an ONNX Runtime session, its executor, its in-flight count.

Inference runs on the version's own thread pool with ``instance_count`` workers (Triton's
instance group): on a CPU, one instance already uses every core through ORT's intra-op
threads, so more would only fight for them. ONNX Runtime releases the GIL while running.
Small requests of a cheap model run on the event loop instead: for them the thread hop is the
main cost. Which ones is fixed per version at warm-up (its fastest of a few runs on a synthetic
input, preprocessing included, times the batch within ``INLINE_BUDGET_S``, and at most
``INLINE_MAX_BYTES`` of input), never from live timings: a version a little slower than another
must not cross the budget under load more often and pay the hop for it (that turned a 4%
slower digits v2 into a 10-17% slower one on a busy machine, and the gate judges that latency).

Shadow copies run on one thread of their own and do not feed the timings, so the version
they mirror to serves its primaries exactly as the baseline serves its own: never queued
behind a shadow run, never pushed off the event loop by the shadow's slower, contended runs.
Without that, the candidate's live latency arm is measured slower than it is.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime as ort

from model_server.batcher import DynamicBatcher, Outcome, Pending, is_retryable, split
from model_server.config import DATATYPES, MAX_QUEUE, ONNX_TYPES, ModelConfig, TensorSpec
from model_server.errors import (
    InferenceFailed,
    InjectedFault,
    InvalidInput,
    ModelRejectedInput,
    ModelUnavailable,
    OutOfMemory,
    Preempted,
    ServerError,
    shown,
    shown_names,
    shown_value,
)
from model_server.files import open_regular
from model_server.metrics import VersionMetrics
from model_server.preprocess import check_pixels, images_to_features
from model_server.protocol import InferInput, hex_value

log = logging.getLogger(__name__)

ort.set_default_logger_severity(3)

# A request whose calibrated cost is within this runs on the event loop: the hop to a worker
# thread and back costs 0.1-0.2 ms, more than a small model's whole inference.
INLINE_BUDGET_S = 0.0005
INLINE_MAX_BYTES = 16 * 1024  # decoding grows with the bytes: more goes to the executor
INLINE_MAX_PIXELS = 65_536  # and with the pixels (about 5 ns each): 0.3 ms at most inline
WARMUP_RUNS = 10  # timed warm-up runs after the first (which allocates)
MAX_VALID_SIGNATURES = 64  # input signatures (names, datatypes, shapes) that passed, kept per version

# ORT's message when a Cast from a string tensor meets text that is not a number: the C++
# conversion that failed (std::stoll, std::stod, ...). The input's fault, not the model's.
STRING_PARSE_FAILED = re.compile(r"Status Message: (?:std::)?sto(i|l|ll|ul|ull|f|d|ld)\b")
# The number at the start of the text each of those conversions reads (strtol's, base 10, and
# strtod's, decimal or hex: "0x1p2000" is 2**2000, "0x" alone its "0"): a string without one, or
# with one out of the conversion's range, is what it failed on.
NUMBER_START = {
    "int": re.compile(r"[ \t\n\v\f\r]*([+-]?[0-9]+)"),
    "float": re.compile(
        r"[ \t\n\v\f\r]*([+-]?(?:inf|nan|0x(?:[0-9a-f]+\.?[0-9a-f]*|\.[0-9a-f]+)(?:p[+-]?[0-9]+)?"
        r"|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[+-]?[0-9]+)?))",
        re.IGNORECASE | re.ASCII,  # (ASCII: else "i" matches "\u0131" and "\u0130", which strtod does not read)
    ),
}
# Past the largest magnitude each integer conversion reads (stoul and stoull take a sign, as
# strtoul does): out of its range.
NUMBER_RANGE = {"i": 2**31, "l": 2**63, "ll": 2**63, "ul": 2**64, "ull": 2**64}
# Each floating conversion's type: its significand's bits, its largest and least normal binary
# exponents. Its range ends halfway between its largest value and the next power of two, where
# strto* rounds to inf and sets ERANGE (std::stof("3.40282350001e38") is FLT_MAX, not out of range).
FLOAT_TYPES = {"f": (24, 127, -126), "d": (53, 1023, -1022), "ld": (64, 16383, -16382)}
FLOAT_RANGE = {c: Decimal(2 ** (top + 1) - 2 ** (top - bits)) for c, (bits, top, _) in FLOAT_TYPES.items()}
# Below this, a number that is not 0 is tiny for each floating conversion's type and fails too,
# unless its type holds it exactly (glibc's strtod sets ERANGE on an inexact underflow:
# std::stod("1e-400") and std::stod("1e-310") throw out_of_range, as std::stod("1e400") does).
# Tininess is judged after rounding (IEEE 754 lets it be; glibc on x86 does): a number is tiny
# where, rounded to the type's precision with no bound on its exponent, it is under the least
# normal 2**low: under halfway between 2**low and the number of that precision under it
# (2**low - 2**(low-bits)), 2**low - 2**(low-bits-1). From there on it is read as the least normal
# (std::stof("1.17549435e-38") is FLT_MIN); just under, from 2**low - 2**(low-bits), it is the least
# normal too, but with ERANGE. The bound is (2**(bits+1) - 1) * 2**-k with k = bits + 1 - low,
# that is * 5**k / 10**k: written exactly (a Decimal of an int and a digits tuple, no rounding).
NUMBER_TINY = {
    c: Decimal((0, Decimal((2 ** (bits + 1) - 1) * 5 ** (bits + 1 - low)).as_tuple().digits, low - bits - 1))
    for c, (bits, _, low) in FLOAT_TYPES.items()
}
# The type's least subnormal, 2**-k: every subnormal it holds is a multiple of it, so it has k
# decimals at most (2**-k is 5**k / 10**k).
SUBNORMAL_DECIMALS = {c: bits - 1 - low for c, (bits, _, low) in FLOAT_TYPES.items()}
SUBNORMAL_STEP = {c: Fraction(1, 2**k) for c, k in SUBNORMAL_DECIMALS.items()}

# ORT logs a failed run's error to stderr as well as raising it: outside Python logging and
# its masking, and a string the model could not read may be sensitive. Raised, it is answered
# (a warm-up's: the load's error) and logged here; the runs, the warm-up's too, log nothing themselves.
QUIET_RUN = ort.RunOptions()
QUIET_RUN.log_severity_level = 4

OOM_MARKERS = (
    "out of memory",
    "cudaerrormemoryallocation",
    "cuda_error_out_of_memory",
    "cudnn_status_alloc_failed",
    "cublas_status_alloc_failed",
    "failed to allocate memory",
)


def is_out_of_memory(message: str) -> bool:
    """True when an ONNX Runtime error message reports a device allocation failure."""
    m = message.lower()
    return any(marker in m for marker in OOM_MARKERS)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# Protobuf's bound on one message: no ONNX file holds more (a larger model keeps its weights in
# external data, which a version's one model.onnx does not carry).
MAX_MODEL_BYTES = 2**31 - 1


def read_model(path: Path) -> bytes:
    """A model file's bytes, read once: what is hashed is what is loaded (a file replaced between
    a hash and a load by name served bytes no digest described). InvalidInput for a file over
    ``MAX_MODEL_BYTES`` (refused before reading it) or one that cannot be read."""
    try:
        with open_regular(path) as f:  # (a FIFO held the load, or verify-model, in its open)
            size = os.fstat(f.fileno()).st_size
            if size > MAX_MODEL_BYTES:
                raise InvalidInput(
                    f"{path.name} is {size} bytes, over the {MAX_MODEL_BYTES} bytes one ONNX file can hold"
                )
            data = f.read(MAX_MODEL_BYTES + 1)
    except OSError as exc:
        raise InvalidInput(f"{path.name} cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_MODEL_BYTES:  # it grew while read
        raise InvalidInput(f"{path.name} is over the {MAX_MODEL_BYTES} bytes one ONNX file can hold")
    return data


def select_providers(device: str, gpus: int) -> list[str]:
    """CUDA first where a GPU and the CUDA provider both exist, then CPU."""
    available = ort.get_available_providers()
    if device == "cpu" or (device == "auto" and gpus == 0):
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        if device == "cuda":
            raise RuntimeError(f"--device cuda, but this onnxruntime has only {available}")
        return ["CPUExecutionProvider"]
    if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* wheels, when installed
        ort.preload_dlls()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def ort_tensor(inp: InferInput) -> np.ndarray:
    """An input as ONNX Runtime takes it. A BYTES tensor feeds a string tensor, which ORT's
    Python API takes as ``str`` elements (UTF-8 text; it would turn a ``bytes`` element into
    its repr, ``"b'1'"``): decoded here, a 400 for an element that is not UTF-8."""
    data = inp.data
    if data.dtype != object:
        return np.ascontiguousarray(data)
    flat = data.reshape(-1)
    try:
        text = [x.decode() for x in flat]
    except UnicodeDecodeError:
        bad = next(i for i, x in enumerate(flat) if not _is_utf8(x))
        raise InvalidInput(
            f"input '{inp.name}': BYTES element {bad} is not UTF-8 text (the model takes strings)"
        ) from None
    out = np.empty(len(text), dtype=object)
    out[:] = text
    return out.reshape(data.shape)


def unreadable(feeds: dict[str, np.ndarray], strings: set[str], conversion: str) -> str:
    """Which string input and element a failed conversion (std::sto<conversion>) could not read,
    as the start of a message ("input 'x': BYTES element 3 is not a number; "). An input is
    named only when it alone holds an element the conversion fails on (a string input a Cast
    does not read may hold any text); else the inputs that do, or "" where none does."""
    failing = {}
    for name, tensor in feeds.items():
        if name in strings:
            for i, text in enumerate(tensor.reshape(-1)):
                if (fault := _number_fault(text, conversion)) is not None:
                    failing[name] = f"BYTES element {i} {fault}"
                    break
    if len(failing) == 1:
        [(name, fault)] = failing.items()
        return f"input '{shown(name)}': {fault}; "
    if failing:
        return f"inputs {_few(sorted(failing))}: one holds a string that is not a number; "
    return ""


def _number_fault(text: str, conversion: str) -> str | None:
    """Why std::sto<conversion> fails on ``text`` ("is not a number", "is out of range"), or None."""
    floating = conversion in ("f", "d", "ld")
    number = NUMBER_START["float" if floating else "int"].match(text)
    if number is None:
        return "is not a number"
    written = number[1].lower()
    if floating:
        if "inf" in written or "nan" in written:
            return None
        if "x" in written:
            return _hex_fault(written.lstrip("+-")[2:], conversion)
        try:
            exact = Decimal(written)  # (exact: 1e-400 is not 0 here, 3.40282350001e38 is not FLT_MAX)
        except InvalidOperation:  # an exponent of 19 digits or more: past any range, or under it, unless 0
            return "is out of range" if re.search("[1-9]", written.partition("e")[0]) else None
        size = exact.copy_abs()
        if size >= FLOAT_RANGE[conversion]:
            return "is out of range"
        if size and size < NUMBER_TINY[conversion]:
            if size < SUBNORMAL_STEP[conversion]:  # (before Fraction: 1e-999999999 is no small fraction)
                return "is out of range"
            # Before Fraction too, whose cost grows as the square of the digits, from the text (no
            # tuple of its digits): the number is int(kept) * 10**shift, its trailing zeros dropped.
            mantissa, _, exponent = written.lstrip("+-").partition("e")
            whole, _, fraction = mantissa.partition(".")
            kept = (whole + fraction).rstrip("0")
            shift = _integer(exponent) - len(fraction) + len(whole) + len(fraction) - len(kept)
            # Read only where a subnormal holds it exactly, a multiple of 2**-k; but in the top
            # subnormal binade (2**(low-1) up) glibc 2.36's decimal path drops the first bit past the
            # type's precision, 2**(low-1-bits), that is 2**-(k+2), as its hex path does in every
            # binade (round_and_return writes over that round bit): that bit alone does not make it
            # inexact (std::stod of 2**-1023 + 2**-1076, written exactly, reads it with no ERANGE).
            k = SUBNORMAL_DECIMALS[conversion]
            if -shift > k + 2:  # no multiple of 2**-(k+2)
                return "is out of range"
            units = Fraction(Decimal(f"{kept}e{shift}")) * 2 ** (k + 2)  # of 2**-(k+2)
            if units.denominator != 1:
                return "is out of range"
            steps = units.numerator
            if steps >= 2 ** FLOAT_TYPES[conversion][0]:  # 2**(low-1) or more
                steps &= ~1
            return None if steps % 4 == 0 else "is out of range"
        return None
    if len(written.lstrip("+-0")) > 20:  # past any range
        return "is out of range"
    value, limit = _integer(written), NUMBER_RANGE[conversion]
    inside = abs(value) < limit if conversion in ("ul", "ull") else -limit <= value < limit
    return None if inside else "is out of range"


def _hex_fault(written: str, conversion: str) -> str | None:
    """Why std::sto<conversion> fails on a hex float (its text after "0x", lowercase), or None:
    judged as a decimal one is, exactly and in linear time: its value is an odd integer times a
    power of two, compared with the type's bounds (multiples of powers of two too) by shifts."""
    value = hex_value(written)
    if value is None:
        return None  # 0, whatever its exponent
    significand, power = value  # (an exponent of more than 20 digits: past any range, or under it)
    bits, top, low = FLOAT_TYPES[conversion]
    high = significand.bit_length() - 1 + power  # 2**high <= value < 2**(high + 1)
    # Both bounds are (2**(bits+1) - 1) * 2**unit: the range's end (unit top - bits) and the
    # tininess bound (unit low - bits - 1), FLOAT_RANGE's and NUMBER_TINY's.
    bound = 2 ** (bits + 1) - 1
    if high > top or (high == top and _at_least(significand, power, bound, top - bits)):
        return "is out of range"
    if high < low - 1 or (high == low - 1 and not _at_least(significand, power, bound, low - bits - 1)):
        # Tiny: read only where a subnormal holds it exactly, a multiple of 2**-k; but glibc's
        # (2.36, the server image's: Debian bookworm) hex path drops the first bit past the
        # type's precision (2**(high - bits), always under 2**-k here) when it shifts a tiny
        # number to a subnormal (round_and_return writes over that round bit), so that bit
        # alone does not make it inexact: std::stod("0x8aaf09e26e2c04p-1079") reads it, no ERANGE.
        round_bit = high - bits - power
        if round_bit >= 0:
            significand &= ~(1 << round_bit)
        lowest = power + (significand & -significand).bit_length() - 1
        return None if lowest >= -SUBNORMAL_DECIMALS[conversion] else "is out of range"
    return None


def _at_least(significand: int, power: int, bound: int, unit: int) -> bool:
    """Whether significand * 2**power >= bound * 2**unit, exactly (by a shift of one of them)."""
    shift = power - unit
    return significand << shift >= bound if shift >= 0 else significand >= bound << -shift


def _integer(text: str) -> int:
    """An integer's text as int() reads it (0 where empty), its leading zeros dropped first: int()
    reads at most 4300 digits, and "1e-000...0310" or "000...05" may hold more."""
    sign = "-" if text.startswith("-") else ""
    return int(sign + (text.lstrip("+-").lstrip("0") or "0"))


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode()
    except UnicodeDecodeError:
        return False
    return True


def _few(names: list[str], count: int = 10) -> str:
    """Names for an error message: the first ``count``, each as ``shown`` (a request may name a thousand)."""
    text = str([shown(name) for name in names[:count]])
    return text if len(names) <= count else f"{text} and {len(names) - count} more"


def _shape_matches(shape: tuple[int, ...], dims: tuple[int, ...]) -> bool:
    return len(shape) == len(dims) and all(d == -1 or d == s for s, d in zip(shape, dims, strict=True))


class LoadedVersion:
    def __init__(
        self,
        config: ModelConfig,
        version: int,
        path: Path,
        providers: list[str],
        data: bytes | None = None,
        max_queue: int = MAX_QUEUE,
    ):
        """``data``: the bytes of ``path`` already read (``read_model``); else read here, once."""
        self.config = config
        self.name = config.name
        self.version = version
        self.label = str(version)
        self.path = path
        data = read_model(path) if data is None else data
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.size_bytes = len(data)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # Idle intra-op threads would spin on the cores the HTTP loop needs between requests.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        where = f"model '{self.name}' version {version}"
        try:
            self.session: ort.InferenceSession | None = ort.InferenceSession(data, options, providers=providers)
        except Exception as exc:  # ORT raises its own pybind exception types
            raise InvalidInput(f"failed to load {where} from {path.name}: {exc}") from None
        self.provider = self.session.get_providers()[0]
        self._check_signature(where)
        self.executor = ThreadPoolExecutor(config.instance_count, thread_name_prefix=f"{self.name}-v{version}")
        self.shadow_executor = ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-v{version}-shadow")
        self.inflight = 0
        self.retired = False
        self._waiting = 0  # requests handed to the executor that have not started running
        self._waiting_lock = threading.Lock()
        self._seconds_per_item = math.inf  # moving average of preprocessing + execution
        self._warmup_seconds = math.inf  # the estimate until the first real run
        self.metrics = VersionMetrics(self.name, self.label)
        self.shadow_metrics = VersionMetrics(self.name, self.label, "shadow")
        self.fault: Fault | None = None
        self._valid: dict[tuple[Any, ...], list[str]] = {}  # requests' signatures that passed -> outputs
        batching = config.dynamic_batching
        self.batcher = DynamicBatcher(self, batching, max_queue) if batching is not None else None

    def _check_signature(self, where: str) -> None:
        assert self.session is not None
        graph_in = {i.name: i for i in self.session.get_inputs()}
        graph_out = {o.name: o for o in self.session.get_outputs()}
        pre = self.config.preprocess
        if pre is not None:
            if pre.onnx_input not in graph_in:
                raise InvalidInput(
                    f"{where}: preprocess.onnx_input {pre.onnx_input!r} is not a graph input "
                    f"(graph has {sorted(graph_in)})"
                )
        else:
            for spec in self.config.inputs:
                self._check_tensor(where, "input", spec, graph_in, self.config.max_batch_size > 0)
        for spec in self.config.outputs:
            self._check_tensor(where, "output", spec, graph_out, self.config.max_batch_size > 0)
            shape = graph_out[spec.name].shape
            if self.config.dynamic_batching is not None and (not shape or isinstance(shape[0], int)):
                # Its rows could not be split back per request (a reduction over the batch, say).
                raise InvalidInput(
                    f"{where}: dynamic_batching needs every output batched along its first dimension; "
                    f"output {spec.name!r} has shape {shape} in the graph"
                )

    @staticmethod
    def _check_tensor(where: str, kind: str, spec: TensorSpec, graph: dict[str, Any], batched: bool) -> None:
        node = graph.get(spec.name)
        if node is None:
            raise InvalidInput(f"{where}: config {kind} {spec.name!r} is not in the graph ({sorted(graph)})")
        datatype = ONNX_TYPES.get(node.type)
        if datatype != spec.datatype:
            raise InvalidInput(
                f"{where}: {kind} {spec.name!r} is {datatype or node.type} in the graph, {spec.datatype} in config.json"
            )
        # As Triton: the config's shape (the whole shape here, batch dimension included) and the
        # graph's agree in rank and in every dimension both fix (a symbolic one takes any).
        shape = [d if isinstance(d, int) and d > 0 else -1 for d in node.shape] if node.shape is not None else None

        def fits(dims: tuple[int, ...]) -> bool:
            assert shape is not None
            return len(shape) == len(dims) and all(g == c or -1 in (g, c) for g, c in zip(shape, dims, strict=True))

        if shape is not None and not fits(spec.dims):
            # Triton's dims leave the batch dimension out where the model batches: a config
            # written so is refused saying how to write it, never read otherwise.
            whole = (-1, *spec.dims)
            hint = (
                f" (dims here are the whole shape, the batch dimension included, unlike Triton's "
                f"config.pbtxt: write {list(whole)})"
                if batched and fits(whole)
                else ""
            )
            raise InvalidInput(
                f"{where}: {kind} {spec.name!r} has shape {shape} in the graph, dims {list(spec.dims)} in "
                f"config.json{hint}"
            )

    # -- lifecycle --------------------------------------------------------------------------

    def synthetic_feeds(self, batch: int = 1) -> dict[str, np.ndarray]:
        """Inputs of zeros (the text "0" for strings, blank images through the preprocessing) for
        ``batch`` items where the config batches (else as for one): the warm-up's input, and the
        verification's at the largest batch."""
        assert self.session is not None
        pre = self.config.preprocess
        feeds = {}
        for node in self.session.get_inputs():
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in node.shape]
            if shape and self.config.max_batch_size and not (isinstance(node.shape[0], int) and node.shape[0] > 0):
                shape[0] = batch
            datatype = ONNX_TYPES.get(node.type)
            if datatype is None:
                raise InvalidInput(
                    f"model '{self.name}' version {self.version}: cannot warm up input {node.name!r} of {node.type}"
                )
            if datatype == "BYTES":
                # The text "0". (Triton's zero_data for strings is empty elements, but its warm-up
                # is opt-in; this one is not, and a model that reads numbers fails on "".)
                feeds[node.name] = np.full(shape, "0", dtype=object)
            else:
                feeds[node.name] = np.zeros(shape, dtype=np.dtype(DATATYPES[datatype]))
        if pre is not None:
            return {pre.onnx_input: images_to_features(self._blank_images(batch), pre, "warm-up")}
        return feeds

    def _blank_images(self, batch: int) -> np.ndarray:
        pre = self.config.preprocess
        assert pre is not None
        count = batch if self.config.max_batch_size else 1
        return np.array([_blank_png(pre.width, pre.height)] * count, dtype=object)

    def check_outputs(self, results: list[np.ndarray], batch: int | None = None) -> None:
        """InvalidInput unless each output came out with the dims config.json gives it, and, with
        ``batch``, ``batch`` rows where the config batches. A dimension the graph leaves symbolic
        passes its load whatever it holds: a class count other than the config's (and its labels
        file's) reached clients."""
        for spec, value in zip(self.config.outputs, results, strict=True):
            dims = list(spec.dims)
            if batch is not None and self.config.max_batch_size and dims and dims[0] == -1:
                dims[0] = batch
            if not _shape_matches(np.shape(value), tuple(dims)):
                raise InvalidInput(
                    f"model '{self.name}' version {self.version}: output {spec.name!r} came out with shape "
                    f"{list(np.shape(value))}{f' for a batch of {batch}' if batch is not None else ''}, "
                    f"dims {list(spec.dims)} in config.json"
                )

    def warmup(self) -> None:
        """Inferences on a synthetic input: a version that cannot run, or whose outputs are not
        the config's, never takes traffic, and the fastest timed run is its cost per item for the
        inline decision."""
        assert self.session is not None
        pre = self.config.preprocess
        outputs = [o.name for o in self.config.outputs]
        feeds = self.synthetic_feeds()
        image = self._blank_images(1) if pre is not None else None
        times = []
        try:
            for _ in range(WARMUP_RUNS + 1):
                started = time.perf_counter()
                if pre is not None and image is not None:
                    feeds = {pre.onnx_input: images_to_features(image, pre, "warm-up")}
                results = self.session.run(outputs, feeds, QUIET_RUN)
                times.append(time.perf_counter() - started)
        except Exception as exc:
            raise InvalidInput(
                f"model '{self.name}' version {self.version} failed its warm-up inference: {exc}"
            ) from None
        self.check_outputs(results)
        if self.batcher is not None and self.config.max_batch_size > 1:
            self._check_rows(outputs)
        # The fastest run is the version's own cost: a median taken while other processes held the
        # cores (CI's shared machine) sent one version off the loop for good and not the other
        # (+184% in its live arm with two busy loops beside the server).
        self._warmup_seconds = min(times[1:])

    def _check_rows(self, outputs: list[str]) -> None:
        """InvalidInput unless a run of two items gives every output one row an item: the batcher
        splits a merged run's outputs by rows. The graph's check passes any symbolic first
        dimension, one that counts something else (detections, nonzero elements) too, and such a
        count equal to a merged batch answered requests each other's rows."""
        assert self.session is not None
        try:
            results = self.session.run(outputs, self.synthetic_feeds(2), QUIET_RUN)
        except Exception as exc:  # ORT raises its own pybind exception types
            raise InvalidInput(
                f"model '{self.name}' version {self.version} failed its warm-up inference at a batch of 2: {exc}"
            ) from None
        for name, value in zip(outputs, results, strict=True):
            if np.ndim(value) == 0 or np.shape(value)[0] != 2:
                raise InvalidInput(
                    f"model '{self.name}' version {self.version}: dynamic_batching needs every output batched "
                    f"along its first dimension; output {name!r} came out with shape {list(np.shape(value))} "
                    "for a batch of 2"
                )

    def pending_count(self) -> int:
        """Requests accepted and not yet running (Triton's pending requests): those queued in
        the batcher, and those waiting for a free instance."""
        return (self.batcher.queued if self.batcher is not None else 0) + self._waiting

    def _started(self, waiting: list[bool]) -> None:
        """A request handed to the executor no longer waits (it runs, or it never will); once."""
        with self._waiting_lock:
            if waiting[0]:
                waiting[0] = False
                self._waiting -= 1

    def _run_waited(
        self, waiting: list[bool], inputs: list[InferInput], outputs: list[str], submitted: float
    ) -> Outcome:
        self._started(waiting)
        return self._run(inputs, outputs, submitted)

    def runs_inline(self, size: int, batch: int, pixels: int = 0) -> bool:
        """Whether an execution of ``batch`` items in ``size`` bytes, its images declaring
        ``pixels``, runs on the event loop: decided from the warm-up's cost, fixed per version,
        so that load never moves one version's requests off the loop and not another's; and
        from the input's bytes and pixels, which decoding grows with (a 16 KB PNG of 4096x4096
        held every endpoint 75 ms)."""
        if self.fault is not None or self.config.instance_count != 1:
            return False
        return (
            self._warmup_seconds * batch <= INLINE_BUDGET_S and size <= INLINE_MAX_BYTES and pixels <= INLINE_MAX_PIXELS
        )

    def batch_of(self, inputs: list[InferInput]) -> int:
        return inputs[0].shape[0] if self.config.max_batch_size and inputs[0].shape else 1

    def close(self) -> None:
        """Release the session; called once the version is retired and drained."""
        self.session = None
        if self.batcher is not None:
            self.batcher.close()
        self.executor.shutdown(wait=False)
        self.shadow_executor.shutdown(wait=False)

    # -- inference ---------------------------------------------------------------------------

    def validate(self, inputs: list[InferInput], requested: dict[str, bool] | None) -> list[str]:
        """Check inputs against config; return the output names to compute. Inputs of names,
        datatypes and shapes that passed before, with the same outputs requested, pass again
        (their images still checked)."""
        key = (tuple((i.name, i.datatype, i.shape) for i in inputs), None if requested is None else tuple(requested))
        names = self._valid.get(key)
        if names is None:
            names = self._validate(inputs, requested)
            if len(self._valid) >= MAX_VALID_SIGNATURES:
                self._valid.clear()
            self._valid[key] = names
        elif self.config.preprocess is not None:
            name = self.config.inputs[0].name
            images = next(i for i in inputs if i.name == name)
            images.pixels = check_pixels(images.data, name)
        return list(names)

    def _validate(self, inputs: list[InferInput], requested: dict[str, bool] | None) -> list[str]:
        cfg = self.config
        given = {i.name: i for i in inputs}
        expected = {s.name for s in cfg.inputs}
        unknown = sorted(set(given) - expected)
        if unknown:
            raise InvalidInput(f"unknown input(s) {_few(unknown)} for model '{self.name}'; expected {sorted(expected)}")
        for spec in cfg.inputs:
            inp = given.get(spec.name)
            if inp is None:
                raise InvalidInput(f"missing input '{spec.name}' for model '{self.name}'")
            if inp.datatype != spec.datatype:
                raise InvalidInput(
                    f"input '{spec.name}': datatype {inp.datatype} does not match the model's {spec.datatype}"
                )
            if not _shape_matches(inp.shape, spec.dims):
                raise InvalidInput(
                    f"input '{spec.name}': shape {list(inp.shape)} does not match the model's {list(spec.dims)}"
                )
            if cfg.max_batch_size:
                batch = inp.shape[0]
                if batch < 1 or batch > cfg.max_batch_size:
                    raise InvalidInput(f"input '{spec.name}': batch size {batch} is outside 1..{cfg.max_batch_size}")
        batches = {i.shape[0] for i in inputs if i.shape}
        if cfg.max_batch_size and len(batches) > 1:
            raise InvalidInput(f"inputs disagree on the batch size: {sorted(batches)}")
        if cfg.preprocess is not None:
            images = given[cfg.inputs[0].name]
            images.pixels = check_pixels(images.data, images.name)
        names = [o.name for o in cfg.outputs]
        if requested is None:
            return names
        unknown = sorted(set(requested) - set(names))
        if unknown:
            raise InvalidInput(f"unknown output(s) {_few(unknown)} for model '{self.name}'; it has {names}")
        return [n for n in names if n in requested]

    def _feeds(self, inputs: list[InferInput]) -> dict[str, np.ndarray]:
        """A request's inputs as the graph takes them: images decoded and preprocessed, strings
        as text. InvalidInput for an input that cannot be (an undecodable image, text not UTF-8)."""
        pre = self.config.preprocess
        if pre is not None:
            return {pre.onnx_input: images_to_features(inputs[0].data, pre, inputs[0].name)}
        return {i.name: ort_tensor(i) for i in inputs}

    def _run(
        self,
        inputs: list[InferInput],
        outputs: list[str],
        submitted: float,
        run_options: Any = None,
        prepared: tuple[dict[str, np.ndarray], float] | None = None,
    ) -> tuple[list[np.ndarray], int, dict[str, float]]:
        """One execution; a shadow's (``run_options`` given) is not learnt from. ``prepared``:
        the graph's inputs already made from ``inputs`` (``_feeds``), and the seconds that took."""
        started = time.perf_counter()
        session = self.session
        if session is None:  # cannot happen while in flight; guards against misuse
            raise ModelUnavailable(f"model '{self.name}' version {self.version} was unloaded")
        if prepared is None:
            feeds = self._feeds(inputs)
            input_s = time.perf_counter() - started
        else:
            feeds, input_s = prepared
        batch = next(iter(feeds.values())).shape[0] if self.config.max_batch_size else 1
        ran = time.perf_counter()
        if run_options is not None:
            run_options.log_severity_level = QUIET_RUN.log_severity_level
        try:
            result = session.run(outputs, feeds, run_options or QUIET_RUN)
        except Exception as exc:
            message = str(exc)
            if run_options is not None and run_options.terminate:
                raise Preempted(f"model '{self.name}' version {self.version}: run preempted") from None
            if is_out_of_memory(message):
                raise OutOfMemory(
                    f"model '{self.name}' version {self.version} ran out of memory on {self.provider}: {message}"
                ) from None
            if type(exc).__name__ in ("InvalidArgument", "InvalidGraph"):
                raise ModelRejectedInput(f"model '{self.name}' rejected the input: {message}") from None
            parse = STRING_PARSE_FAILED.search(message)
            strings = {i.name for i in session.get_inputs() if i.type == "tensor(string)"}
            if parse and strings:
                raise InvalidInput(
                    f"{unreadable(feeds, strings, parse[1])}model '{self.name}' could not read a string input "
                    f"as a number: {message}"
                ) from None
            raise InferenceFailed(f"model '{self.name}' version {self.version} failed: {message}") from None
        fault = self.fault
        if fault is not None:
            fault.delay()
        done = time.perf_counter()
        if run_options is None:
            self.metrics.executed(batch, input_s, done - ran)  # one per execution, merged or not
            per_item = (input_s + done - ran) / max(batch, 1)
            previous = self._seconds_per_item
            self._seconds_per_item = per_item if previous == math.inf else 0.9 * previous + 0.1 * per_item
        timing = {"queue": started - submitted, "input": input_s, "infer": done - ran, "executed": float(batch)}
        return result, batch, timing

    def _abort(self) -> None:
        """An injected abort, drawn per request (after the work: the run still tells what it costs)."""
        fault = self.fault
        if fault is not None:
            fault.abort(f"model '{self.name}' version {self.version}")

    def run_batch(self, batch: list[Pending]) -> list[Outcome | BaseException]:
        """One merged execution of the batcher's requests, split back per request; on the
        version's thread (or the loop). It computes the outputs any request asked for, each
        request answered its own. A request whose inputs cannot be prepared for the graph
        fails alone before it; a failed merged run is retried request by request."""
        started = time.perf_counter()
        failed: dict[int, ServerError] = {}
        ready: list[tuple[Pending, dict[str, np.ndarray]]] = []
        for pending in batch:
            try:
                ready.append((pending, self._feeds(pending.inputs)))
            except ServerError as exc:
                failed[pending.seq] = exc
        if not ready:
            return [failed[p.seq] for p in batch]
        good = [p for p, _ in ready]
        feeds = ready[0][1] if len(ready) == 1 else {n: np.concatenate([f[n] for _, f in ready]) for n in ready[0][1]}
        asked = {n for p in good for n in p.outputs}
        names = [o.name for o in self.config.outputs if o.name in asked]  # any request's, in the config's order
        input_s = time.perf_counter() - started
        try:
            results, _, timing = self._run(good[0].inputs, names, started, prepared=(feeds, input_s))
            parts = split(results, good) if len(good) > 1 else [results]
        except ServerError as exc:
            if len(good) == 1 or not is_retryable(exc):
                return [failed.get(p.seq, exc) for p in batch]
            parts = None
        if parts is None:  # one by one: a bad request fails alone
            alone = {p.seq: self._run_alone(p, f) for p, f in ready}
            return [failed[p.seq] if p.seq in failed else alone[p.seq] for p in batch]
        outcomes: list[Outcome | BaseException] = []
        rows_of = {p.seq: rows for p, rows in zip(good, parts, strict=True)}
        for pending in batch:
            if pending.seq in failed:
                outcomes.append(failed[pending.seq])
                continue
            rows = dict(zip(names, rows_of[pending.seq], strict=True))
            try:
                self._abort()
                outcomes.append(
                    ([rows[n] for n in pending.outputs], pending.batch, {**timing, "queue": started - pending.enqueued})
                )
            except InjectedFault as exc:
                outcomes.append(exc)
        return outcomes

    def _run_alone(self, pending: Pending, feeds: dict[str, np.ndarray]) -> Outcome | BaseException:
        try:
            outcome = self._run(pending.inputs, pending.outputs, pending.enqueued, prepared=(feeds, 0.0))
            self._abort()
            return outcome
        except ServerError as exc:
            return exc

    def predicted_seconds(self, inputs: list[InferInput]) -> float:
        """Preprocessing plus execution this request should take, from recent runs (or the warm-up)."""
        batch = self.batch_of(inputs)
        estimate = self._seconds_per_item if self._seconds_per_item < math.inf else self._warmup_seconds
        return estimate * batch

    async def infer(
        self,
        inputs: list[InferInput],
        outputs: list[str],
        shadow_run: Any = None,
        parameters: dict[str, Any] | None = None,
    ) -> Outcome:
        """Through the dynamic batcher when the config has one; else run on the event loop when
        cheap enough, else on the version's executor. ``parameters``: the request's (priority,
        timeout), read by the batcher.

        A shadow copy passes ``shadow_run`` (an ``onnxruntime.RunOptions``): it runs alone on the
        shadow's thread, and the caller aborts it by setting ``terminate`` when a primary arrives.
        """
        loop = asyncio.get_running_loop()
        if shadow_run is not None:
            outcome = await loop.run_in_executor(
                self.shadow_executor, self._run, inputs, outputs, time.perf_counter(), shadow_run
            )
        elif self.batcher is not None:
            return await self.batcher.submit(inputs, outputs, parameters or {})
        elif self.runs_inline(sum(i.nbytes for i in inputs), self.batch_of(inputs), sum(i.pixels for i in inputs)):
            outcome = self._run(inputs, outputs, time.perf_counter())
        else:
            waiting = [True]
            with self._waiting_lock:
                self._waiting += 1
            try:
                outcome = await loop.run_in_executor(
                    self.executor, self._run_waited, waiting, inputs, outputs, time.perf_counter()
                )
            finally:  # (a request whose client went away before it ran never runs)
                self._started(waiting)
        self._abort()
        return outcome

    def metadata(self) -> dict[str, Any]:
        return {
            "version": self.label,
            "execution_provider": self.provider,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
        }


def _blank_png(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("L", (width, height)).save(out, format="PNG")
    return out.getvalue()


@dataclass(frozen=True)
class Fault:
    """Injected faults, as Istio's HTTPFaultInjection: a delay and an abort, each on a share.

    The delay is spent inside the execution, holding the instance as a slow model would.
    """

    delay_ms: float = 0.0
    delay_percent: float = 100.0
    abort_percent: float = 0.0

    @classmethod
    def from_dict(cls, raw: Any) -> Fault | None:
        if not isinstance(raw, dict):
            raise InvalidInput("fault must be an object {delay: {ms, percent}, abort: {percent}}")
        unknown = sorted(set(raw) - {"delay", "abort"})
        if unknown:
            raise InvalidInput(f"fault: unknown field(s) {shown_names(unknown)}; allowed: delay, abort")
        delay, abort = raw.get("delay") or {}, raw.get("abort") or {}
        if not isinstance(delay, dict) or not isinstance(abort, dict):
            raise InvalidInput("fault.delay and fault.abort must be objects")
        for name, given, allowed in (("delay", delay, {"ms", "percent"}), ("abort", abort, {"percent"})):
            if set(given) - allowed:
                raise InvalidInput(
                    f"fault.{name}: unknown field(s) {shown_names(set(given) - allowed)}; "
                    f"allowed: {', '.join(sorted(allowed))}"
                )
        values = {
            "delay.ms": delay.get("ms", 0.0),
            "delay.percent": delay.get("percent", 100.0),
            "abort.percent": abort.get("percent", 0.0),
        }
        for key, value in values.items():
            if (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or (isinstance(value, float) and not math.isfinite(value))  # NaN passes every comparison
                or value < 0
            ):
                raise InvalidInput(f"fault.{key} must be a non-negative number, got {shown_value(value)}")
        if values["delay.percent"] > 100 or values["abort.percent"] > 100 or values["delay.ms"] > 60_000:
            raise InvalidInput("fault: percents are 0..100 and delay.ms at most 60000")
        fault = cls(float(values["delay.ms"]), float(values["delay.percent"]), float(values["abort.percent"]))
        return None if fault.delay_ms == 0 and fault.abort_percent == 0 else fault

    def to_dict(self) -> dict[str, Any]:
        return {
            "delay": {"ms": self.delay_ms, "percent": self.delay_percent},
            "abort": {"percent": self.abort_percent},
        }

    def delay(self) -> None:
        """Per execution, holding the instance as a slow model would."""
        if self.delay_ms and random.random() * 100 < self.delay_percent:  # noqa: S311 (sampling, not secrets)
            time.sleep(self.delay_ms / 1000)

    def abort(self, where: str) -> None:
        """Per request: InjectedFault on the configured share."""
        if self.abort_percent and random.random() * 100 < self.abort_percent:  # noqa: S311
            raise InjectedFault(f"{where}: injected fault (abort)")
