"""Per-model configuration: ``<repository>/<model>/config.json``.

A JSON sibling of Triton's ``config.pbtxt``: the tensors clients see, the preprocessing that
maps them to the ONNX graph's inputs, which versions to load (Triton's ``version_policy``),
how many concurrent executions a version gets, and free-form metadata (labels, held-out
accuracy per version) that the server reports but does not interpret.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from model_server.errors import InvalidInput, json_refusal, shown, shown_names, shown_value
from model_server.files import open_regular

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")  # (\Z: "$" matches before a last "\n")
_UINT_RE = re.compile(r"[0-9]{1,18}")
_VERSION_RE = re.compile(r"0*([0-9]{1,19})")
# The widths of Triton's model_config.proto fields: a larger number is no config Triton reads
# (a default_timeout_microseconds past a float's range failed every request with a 500).
INT32_MAX, UINT32_MAX, INT64_MAX, UINT64_MAX = 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1
_WIDTHS = {INT32_MAX: "int32", UINT32_MAX: "uint32", INT64_MAX: "int64", UINT64_MAX: "uint64"}
MAX_DIMS = 32  # a tensor's dimensions, in a request's shape and in a config's dims
# Each instance is a thread running the version's one session at once with the others, its own
# activations held per run: past two a core of a 16-core host they only contend for the cores
# (and the one GPU) and hold memory; a count of 10**9 took a thread per request in flight.
MAX_INSTANCE_COUNT = 32
# The server's limits and choices that its command line offers too: here, where parsing the
# arguments reaches them without the inference stack's imports.
MAX_JSON_BYTES = 4 * 1024 * 1024  # about 0.1 s of parsing here; a JSON tensor of 400k numbers
# How long after it arrived a copy may still wait for idle time (one from Istio's mirror; one
# of this server's own from when it was queued): past it Envoy has given up (a stream's
# timeout), and its record would hold the shadow's watermark (the audit's) back by as long;
# well inside the audit's flush bound, so its record is never late.
MAX_COPY_AGE_S = 30.0
# The longest bound a server may be given (``--shadow-copy-max-age``): the audit's margin for a
# copy stamped in its range and written after it (``vision_rollout.audit.closes``: on top of the
# pods' clocks apart and the flush bound). A copy waiting longer is written after its range closed (late, in no audit),
# and an hour's bound held the shadow's watermark back an hour.
MAX_COPY_AGE_LIMIT_S = 60.0
# To whom ``GET /v2`` says where the prediction log is written (``--show-prediction-log``).
SHOW_LOG = ("admin", "everyone", "nobody")


def copy_age_problem(value: float, given: str | None = None) -> str | None:
    """Why ``value`` is no bound of a shadow copy's age (seconds above 0, at most
    ``MAX_COPY_AGE_LIMIT_S``), naming it as ``given`` (the text it was read from) or itself;
    None when it is one."""
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= MAX_COPY_AGE_LIMIT_S:
        return None
    return (
        f"must be a number of seconds above 0 and at most {MAX_COPY_AGE_LIMIT_S:g} (a copy waiting longer is "
        f"written after the audit's range closed), got {(str(value) if given is None else given)[:40]!r}"
    )


def ascii_uint(text: str) -> int | None:
    """``text`` as a non-negative integer when it is 1 to 18 ASCII digits, else None. (str.isdigit
    takes superscripts, which int() refuses, and other scripts' digits; a path or header is not a number.)"""
    return int(text) if _UINT_RE.fullmatch(text) else None


def refuse_constant(name: str) -> Any:
    """``json.loads``'s parse_constant: NaN, Infinity and -Infinity, which Python's json takes
    and JSON has not, are refused (a NaN passes every range check after it)."""
    raise ValueError(f"{name} is not a JSON value")


def json_problem(exc: ValueError | RecursionError, text: str) -> str:
    """Why ``json.loads`` refused ``text``, in words (``json_refusal``): an integer past Python's
    digit limit was told as Python's advice to its programmer ("use sys.set_int_max_str_digits()");
    it is read again (that failure alone) to tell its size and the limit."""
    if "integer string conversion" not in str(exc):
        return json_refusal(exc)
    limit = sys.get_int_max_str_digits()

    def bounded_int(digits: str) -> int:
        if len(digits.lstrip("-")) > limit:
            raise ValueError(f"an integer of {len(digits.lstrip('-'))} digits: at most {limit} digits are read")
        return 0

    try:
        json.loads(text, parse_int=bounded_int, parse_constant=refuse_constant)
    except (ValueError, RecursionError) as again:
        return json_refusal(again)
    return str(exc)


def int64_version(text: str) -> int | None:
    """``text`` as a version number, as Triton reads one (std::stol, std::stoll): ASCII digits
    within int64, leading zeros too (as the mesh's pinned routes take them); else None."""
    digits = _VERSION_RE.fullmatch(text)
    number = int(digits[1]) if digits else None
    return number if number is not None and number <= INT64_MAX else None


def version_number(text: str) -> int:
    """A version as a path or header gives it, read as Triton's HTTP frontend reads it: ASCII
    digits within int64 (0 too, a version no model has: not found); digits past int64, or other
    text (a header's: in a path it matches no endpoint, ``app.VersionConvertor``), a 400."""
    number = int64_version(text)
    if number is None:
        raise InvalidInput(f"invalid version {shown(repr(text)[:40])}: versions are positive integers")
    return number


# KServe v2 datatype -> numpy dtype string (little-endian on the wire).
DATATYPES: dict[str, str] = {
    "BOOL": "|b1",
    "UINT8": "|u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "|i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
    "BYTES": "O",
}

# ONNX Runtime's type strings -> KServe v2 datatype.
ONNX_TYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

# Keys a load request may override (Triton's load API takes a whole config; we take these).
OVERRIDABLE = ("version_policy", "instance_count", "max_batch_size", "dynamic_batching")

# KServe v2 datatype -> Triton's model configuration DataType (a string tensor is TYPE_STRING).
TRITON_TYPES: dict[str, str] = {dt: "TYPE_STRING" if dt == "BYTES" else f"TYPE_{dt}" for dt in DATATYPES}
# Fields of Triton's model configuration (GET .../config) a load may send but not change: they
# must be the model's own, as that endpoint answers them.
TRITON_FIXED = (
    "name",
    "platform",
    "backend",
    "runtime",
    "input",
    "output",
    "batch_input",
    "batch_output",
    "optimization",
    "default_model_filename",
    "cc_model_filenames",
    "metric_tags",
    "parameters",
    "model_warmup",
)
_ENUM_KEYS = {"data_type", "format", "kind", "priority", "timeout_action"}  # protobuf reads enums in any case


def instance_kind(provider: str) -> tuple[str, tuple[int, ...]]:
    """Triton's instance_group ``kind`` and ``gpus`` of a version ONNX Runtime runs with
    ``provider`` (a GPU provider runs on the first device it sees)."""
    return ("KIND_CPU", ()) if provider == "CPUExecutionProvider" else ("KIND_GPU", (0,))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    dims: tuple[int, ...]
    label_filename: str | None = None  # an output's class labels, one a line (Triton's field)

    def as_metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.dims)}

    def as_triton(self, batched: bool, output: bool) -> dict[str, Any]:
        """Triton's ModelInput or ModelOutput JSON: ``dims`` without the batch dimension where
        the model batches (here the batch dimension is the first of ``dims``)."""
        dims = list(self.dims[1:] if batched else self.dims)
        if output:
            return {
                "name": self.name,
                "data_type": TRITON_TYPES[self.datatype],
                "dims": dims,
                "label_filename": self.label_filename or "",
                "is_shape_tensor": False,
                "is_non_linear_format_io": False,
            }
        return {
            "name": self.name,
            "data_type": TRITON_TYPES[self.datatype],
            "format": "FORMAT_NONE",
            "dims": dims,
            "is_shape_tensor": False,
            "allow_ragged_batch": False,
            "optional": False,
            "is_non_linear_format_io": False,
        }


# The most pixels an image has: one a request sends (4096 x 4096 is far more than any digit
# needs), and the size the preprocessing makes of it, which its warm-up decodes.
MAX_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class ImagePreprocess:
    """Encoded PNG/JPEG images -> the float features the graph was trained on."""

    onnx_input: str
    width: int
    height: int
    scale: float  # a white pixel (255) maps to this value
    invert: bool = False
    flatten: bool = True
    exif_orientation: bool = True  # turn an image upright as its EXIF Orientation says


# The requests queued in one version's dynamic batcher, all priority levels together, whatever
# its configuration says (``max_queue_size`` 0 is unbounded in Triton too): a server-wide cap,
# ``--max-queue``, refused 503 as a full queue is.
MAX_QUEUE = 4096

# The open connections served (``--max-connections``, httpserver.py): Envoy's circuit breakers'
# max_connections default. Each runs one request at a time, so it bounds the requests in flight.
MAX_CONNECTIONS = 1024
# The admin port's own (--max-admin-connections): a handful of operators and the rollout.
MAX_ADMIN_CONNECTIONS = 32
# The prediction log writer's flush interval, seconds (0 spun the writer; a rollout waits for it).
MIN_FLUSH_S, MAX_FLUSH_S = 0.01, 60.0


@dataclass(frozen=True)
class QueuePolicy:
    """Triton's ``ModelQueuePolicy``: one priority level's queue. ``max_queue_size`` and
    ``default_timeout_microseconds`` bound it (0: unbounded but for the server's ``MAX_QUEUE``), a request over either refused as
    Triton does (503), or, past its timeout with ``timeout_action`` DELAY, run after the
    requests of its level that did not time out; with ``allow_timeout_override`` a request's
    ``timeout`` parameter may shorten the default."""

    max_queue_size: int = 0
    default_timeout_microseconds: int = 0
    allow_timeout_override: bool = False
    timeout_action: str = "REJECT"  # or DELAY: an expired request runs after its level's others

    def as_config(self) -> dict[str, Any]:
        return {
            "max_queue_size": self.max_queue_size,
            "default_timeout_microseconds": self.default_timeout_microseconds,
            "allow_timeout_override": self.allow_timeout_override,
            "timeout_action": self.timeout_action,
        }


@dataclass(frozen=True)
class DynamicBatching:
    """Triton's ``dynamic_batching``: requests of one version queue and run merged.

    As in Triton, a batch runs at once when it makes a preferred size (any of them), reaches
    ``max_batch_size`` or the largest preferred size, or when the next queued request cannot
    join it; otherwise it waits for more until its oldest request has queued
    ``max_queue_delay_microseconds``, then runs all it holds, up to ``max_batch_size``
    (``model_server.batcher``). ``priority_levels`` (1 the highest) order the queue, one queue
    per level: each level's policy is its ``priority_queue_policy`` entry, else the default
    queue policy (the fields below, Triton's ``default_queue_policy``: ``QueuePolicy``).
    """

    preferred_batch_size: tuple[int, ...] = ()
    max_queue_delay_microseconds: int = 0
    preserve_ordering: bool = False
    priority_levels: int = 0
    default_priority_level: int = 0
    max_queue_size: int = 0
    default_timeout_microseconds: int = 0
    allow_timeout_override: bool = False
    timeout_action: str = "REJECT"
    priority_queue_policy: tuple[tuple[int, QueuePolicy], ...] = ()  # (level, its policy), by level

    @property
    def default_queue_policy(self) -> QueuePolicy:
        return QueuePolicy(
            self.max_queue_size, self.default_timeout_microseconds, self.allow_timeout_override, self.timeout_action
        )

    def as_config(self) -> dict[str, Any]:
        """Triton's JSON form, integers parsed."""
        return {
            "preferred_batch_size": list(self.preferred_batch_size),
            "max_queue_delay_microseconds": self.max_queue_delay_microseconds,
            "preserve_ordering": self.preserve_ordering,
            "priority_levels": self.priority_levels,
            "default_priority_level": self.default_priority_level,
            "default_queue_policy": self.default_queue_policy.as_config(),
            "priority_queue_policy": {str(level): p.as_config() for level, p in self.priority_queue_policy},
        }


_BATCHING_KEYS = {
    "preferred_batch_size",
    "max_queue_delay_microseconds",
    "preserve_ordering",
    "priority_levels",
    "default_priority_level",
    "default_queue_policy",
    "priority_queue_policy",
}
_QUEUE_POLICY_KEYS = {"max_queue_size", "default_timeout_microseconds", "allow_timeout_override", "timeout_action"}
MAX_QUEUE_DELAY_US = 10_000_000  # 10 s: a longer wait is a misconfiguration, not batching


def _queue_policy(where: str, policy: Any) -> QueuePolicy:
    """Triton's ``ModelQueuePolicy`` in its JSON form."""
    if not isinstance(policy, dict) or set(policy) - _QUEUE_POLICY_KEYS:
        raise _fail(where, f"must be an object with fields from {sorted(_QUEUE_POLICY_KEYS)}")
    action = policy.get("timeout_action", "REJECT")
    action = action.upper() if isinstance(action, str) else action  # (Triton reads an enum's name in any case)
    if action not in ("REJECT", "DELAY"):
        raise _fail(f"{where}.timeout_action", f"must be REJECT or DELAY, got {shown(repr(action))}")
    override = policy.get("allow_timeout_override", False)
    if not isinstance(override, bool):
        raise _fail(f"{where}.allow_timeout_override", f"must be true or false, got {shown_value(override)}")
    return QueuePolicy(
        max_queue_size=_positive_int(f"{where}.max_queue_size", policy.get("max_queue_size", 0), 0, UINT32_MAX),
        default_timeout_microseconds=_positive_int(
            f"{where}.default_timeout_microseconds", policy.get("default_timeout_microseconds", 0), 0, UINT64_MAX
        ),
        allow_timeout_override=override,
        timeout_action=action,
    )


def _dynamic_batching(where: str, raw: Any, max_batch_size: int) -> DynamicBatching | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _fail(where, "must be an object (Triton's dynamic_batching)")
    _known(where, raw, _BATCHING_KEYS)
    if max_batch_size < 1:
        raise _fail(where, "needs max_batch_size >= 1: requests are merged along the batch dimension")
    sizes_raw = raw.get("preferred_batch_size", [])
    if not isinstance(sizes_raw, list) or len(sizes_raw) > 64:
        raise _fail(f"{where}.preferred_batch_size", "must be a list of at most 64 integers")
    # None is max_batch_size, as Triton normalizes it (and as the batcher runs either).
    sizes = sorted({_positive_int(f"{where}.preferred_batch_size", s, 1) for s in sizes_raw}) or [max_batch_size]
    if sizes and sizes[-1] > max_batch_size:
        raise _fail(f"{where}.preferred_batch_size", f"{sizes[-1]} is over max_batch_size {max_batch_size}")
    delay = _positive_int(
        f"{where}.max_queue_delay_microseconds", raw.get("max_queue_delay_microseconds", 0), 0, UINT64_MAX
    )
    if delay > MAX_QUEUE_DELAY_US:
        raise _fail(f"{where}.max_queue_delay_microseconds", f"{delay} is over {MAX_QUEUE_DELAY_US}")
    levels = _positive_int(f"{where}.priority_levels", raw.get("priority_levels", 0), 0, UINT64_MAX)
    default_level = _positive_int(
        f"{where}.default_priority_level", raw.get("default_priority_level", 0), 0, UINT64_MAX
    )
    if levels > 1000:
        raise _fail(f"{where}.priority_levels", f"{levels} is over 1000")
    if default_level > levels or (levels and not default_level):
        raise _fail(
            where, f"priority_levels {levels} needs a default_priority_level in 1..{levels}, got {default_level}"
        )
    default = _queue_policy(f"{where}.default_queue_policy", raw.get("default_queue_policy", {}))
    per_level = raw.get("priority_queue_policy", {})
    if not isinstance(per_level, dict) or len(per_level) > 1000:
        raise _fail(
            f"{where}.priority_queue_policy", "must be an object: priority level -> queue policy, at most 1000 levels"
        )
    levels_policy: dict[int, QueuePolicy] = {}
    for key, policy in per_level.items():
        # Protobuf's JSON map keys are strings; as Triton, a level out of 1..priority_levels is refused
        # (with no priority levels the map is not read).
        level = proto_int(key) if isinstance(key, str) else None
        if level is None or not 0 <= level <= UINT64_MAX or (levels and not 1 <= level <= levels):
            raise _fail(
                f"{where}.priority_queue_policy",
                f"priority level {shown(repr(key)[:40])} must be "
                + (f"in range [1, {levels}]" if levels else f"an integer in range [0, {UINT64_MAX}] (uint64)"),
            )
        levels_policy[level] = _queue_policy(f"{where}.priority_queue_policy[{level}]", policy)
    ordering = raw.get("preserve_ordering", False)
    if not isinstance(ordering, bool):
        raise _fail(f"{where}.preserve_ordering", f"must be true or false, got {shown_value(ordering)}")
    if ordering:  # as Triton: ordered responses cannot pass one another by priority or by a delay
        if levels > 1:
            raise _fail(where, "only one priority level is allowed when 'preserve_ordering' is true")
        if any(
            p.default_timeout_microseconds and p.timeout_action == "DELAY" for p in (default, *levels_policy.values())
        ):
            raise _fail(where, "a queue policy can not have DELAY as timeout action when 'preserve_ordering' is true")
    return DynamicBatching(
        preferred_batch_size=tuple(sizes),
        max_queue_delay_microseconds=delay,
        preserve_ordering=ordering,
        priority_levels=levels,
        default_priority_level=default_level,
        max_queue_size=default.max_queue_size,
        default_timeout_microseconds=default.default_timeout_microseconds,
        allow_timeout_override=default.allow_timeout_override,
        timeout_action=default.timeout_action,
        priority_queue_policy=tuple(sorted(levels_policy.items())),
    )


@dataclass(frozen=True)
class ModelConfig:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 0
    instance_count: int = 1
    version_policy: dict[str, Any] = field(default_factory=lambda: {"latest": {"num_versions": 1}})
    preprocess: ImagePreprocess | None = None
    dynamic_batching: DynamicBatching | None = None
    platform: str = "onnxruntime_onnx"
    metadata: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict)  # output -> its label_filename's lines

    def select_versions(self, available: list[int]) -> list[int]:
        """Apply the version policy to the versions on disk (Triton's semantics)."""
        policy = self.version_policy
        available = sorted(available)
        if "all" in policy:
            return available
        if "latest" in policy:
            n = policy["latest"].get("num_versions", 1)
            return available[-n:]
        wanted = [int(v) for v in policy["specific"]["versions"]]
        missing = sorted(set(wanted) - set(available))
        if missing:
            raise InvalidInput(
                f"model '{self.name}': version_policy asks for version(s) {missing} "
                f"that are not in the repository (found {available})"
            )
        return sorted(wanted)

    def as_triton(self, kind: str = "KIND_CPU", gpus: tuple[int, ...] = ()) -> dict[str, Any]:
        """Triton's model configuration JSON (GET .../config), as Triton writes it for this
        model: protobuf's JSON of ModelConfig with every field, 64-bit integers as numbers,
        defaults filled in, ``dims`` without the batch dimension where the model batches. What
        Triton's config has no field for (the image preprocessing, the free-form metadata) is in
        ``parameters``, each a JSON text in a ``string_value``."""
        batched = self.max_batch_size > 0
        extras = {"preprocess": self.raw.get("preprocess"), "metadata": self.metadata or None}
        config: dict[str, Any] = {
            "name": self.name,
            "platform": self.platform,
            "backend": "onnxruntime",
            "runtime": "",
            "version_policy": self.version_policy,
            "max_batch_size": self.max_batch_size,
            "input": [spec.as_triton(batched, output=False) for spec in self.inputs],
            "output": [spec.as_triton(batched, output=True) for spec in self.outputs],
            "batch_input": [],
            "batch_output": [],
            "optimization": {
                "priority": "PRIORITY_DEFAULT",
                "input_pinned_memory": {"enable": True},
                "output_pinned_memory": {"enable": True},
                "gather_kernel_buffer_threshold": 0,
                "eager_batching": False,
            },
        }
        if self.dynamic_batching is not None:
            config["dynamic_batching"] = self.dynamic_batching.as_config()
        config["instance_group"] = [
            {
                "name": self.name,
                "kind": kind,
                "count": self.instance_count,
                "gpus": list(gpus),
                "secondary_devices": [],
                "profile": [],
                "passive": False,
                "host_policy": "",
            }
        ]
        config["default_model_filename"] = "model.onnx"
        config["cc_model_filenames"] = {}
        config["metric_tags"] = {}
        config["parameters"] = {k: {"string_value": json.dumps(v)} for k, v in extras.items() if v is not None}
        config["model_warmup"] = []
        return config


def _is_int(value: Any) -> bool:
    """An integer in JSON: true and false are Python ints, not JSON's."""
    return isinstance(value, int) and not isinstance(value, bool)


def _fail(where: str, msg: str) -> InvalidInput:
    return InvalidInput(f"{where}: {msg}")


_CONFIG_KEYS = {
    "name",
    "platform",
    "input",
    "output",
    "preprocess",
    "max_batch_size",
    "instance_count",
    "version_policy",
    "dynamic_batching",
    "metadata",
}
_TENSOR_KEYS = {"name", "datatype", "dims", "label_filename"}
_PREPROCESS_KEYS = {"kind", "size", "scale", "invert", "flatten", "exif_orientation", "onnx_input"}


def _known(where: str, raw: dict[str, Any], supported: set[str]) -> None:
    """Refuse a field the server does not implement, as Triton refuses a field its config does
    not have: ignored, a Triton ``instance_group`` or a misspelt ``invert`` would load and serve
    otherwise than the config says."""
    unknown = sorted(set(raw) - supported)
    if unknown:
        hint = " (the number of instances is instance_count)" if "instance_group" in unknown else ""
        raise _fail(where, f"unsupported field(s) {shown_names(unknown)}; supported: {sorted(supported)}{hint}")


def _tensor_specs(where: str, items: Any, *, outputs: bool) -> tuple[TensorSpec, ...]:
    if not isinstance(items, list) or not items:
        raise _fail(where, "must be a non-empty list of {name, datatype, dims}")
    specs = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise _fail(f"{where}[{i}]", "must be an object")
        _known(f"{where}[{i}]", item, _TENSOR_KEYS)
        name, dt, dims = item.get("name"), item.get("datatype"), item.get("dims")
        if not isinstance(name, str) or not name:
            raise _fail(f"{where}[{i}].name", "must be a non-empty string")
        if not isinstance(dt, str) or dt not in DATATYPES:  # (a list or an object: no key)
            raise _fail(f"{where}[{i}].datatype", f"{shown(repr(dt))} is not one of {sorted(DATATYPES)}")
        if not isinstance(dims, list) or not dims or not all(_is_int(d) and (d == -1 or d > 0) for d in dims):
            raise _fail(f"{where}[{i}].dims", "must be a non-empty list of positive ints or -1")
        if len(dims) > MAX_DIMS or max(dims) > INT64_MAX:  # (no request could match it)
            raise _fail(f"{where}[{i}].dims", f"has at most {MAX_DIMS} dimensions, each at most {INT64_MAX} (int64)")
        labels = item.get("label_filename")
        if labels is not None and not outputs:  # Triton's ModelInput has no such field
            raise _fail(f"{where}[{i}].label_filename", "only an output has class labels")
        if labels is not None and (
            not isinstance(labels, str) or labels in ("", ".", "..") or any(c in labels for c in "/\\\0")
        ):
            raise _fail(f"{where}[{i}].label_filename", "must be the name of a file in the model's folder")
        specs.append(TensorSpec(name, dt, tuple(dims), labels))
    return tuple(specs)


def _version_policy(where: str, policy: Any) -> dict[str, Any]:
    if not isinstance(policy, dict) or len(policy) != 1:
        raise _fail(
            where,
            "must be one of {'all': {}}, {'latest': {'num_versions': N}}, {'specific': {'versions': [...]}}",
        )
    kind, body = next(iter(policy.items()))
    if kind == "all" and body == {}:
        return policy
    if kind in ("latest", "specific") and isinstance(body, dict):
        _known(f"{where}.{kind}", body, {"latest": {"num_versions"}, "specific": {"versions"}}[kind])
    if kind == "latest" and isinstance(body, dict):
        n = _positive_int(f"{where}.latest.num_versions", body.get("num_versions", 1), 1, UINT32_MAX)
        return {"latest": {"num_versions": n}}
    if kind == "specific" and isinstance(body, dict):
        raw = body.get("versions")
        versions = [proto_int(v) for v in raw] if isinstance(raw, list) and len(raw) <= 10_000 else []
        if versions and all(v is not None and v >= 1 for v in versions):
            if max(v for v in versions if v is not None) > INT64_MAX:
                raise _fail(
                    f"{where}.specific.versions",
                    f"a version is over {INT64_MAX}, the largest Triton's int64 field holds",
                )
            return {"specific": {"versions": sorted({v for v in versions if v is not None})}}
        raise _fail(where, "specific.versions must be a non-empty list of integers >= 1")
    raise _fail(where, f"unknown or malformed policy {shown_value(policy)}")


_PROTO_INT_RE = re.compile(r"-?[0-9]{1,4000}")  # (int() takes at most 4300 digits)


def proto_int(value: Any) -> int | None:
    """An integer as protobuf's JSON mapping writes it: a number, or (64-bit fields, which Triton
    writes so) its decimal string, a sign too, of any length (the field's range is checked by its
    reader); None for anything else (a bool, a fraction, other text)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return int(value) if isinstance(value, str) and _PROTO_INT_RE.fullmatch(value) else None


def _positive_int(where: str, value: Any, minimum: int, maximum: int = INT32_MAX) -> int:
    number = proto_int(value)
    if number is None or number < minimum:
        raise _fail(where, f"must be an integer >= {minimum}, got {str(value)[:40]!r}")
    if number > maximum:
        raise _fail(where, f"{str(value)[:40]} is over {maximum}, the largest Triton's {_WIDTHS[maximum]} field holds")
    return number


def _instances(where: str, value: Any) -> int:
    count = _positive_int(where, value, 1)
    if count > MAX_INSTANCE_COUNT:
        raise _fail(where, f"{count} is over {MAX_INSTANCE_COUNT}, the most instances this server runs a version with")
    return count


def parse_config(name: str, raw: dict[str, Any], where: str = "config.json") -> ModelConfig:
    if not isinstance(raw, dict):
        raise _fail(where, "must be a JSON object")
    _known(where, raw, _CONFIG_KEYS)
    if raw.get("name", name) != name:
        raise _fail(f"{where}: name", f"{raw['name']!r} does not match the folder name {name!r}")
    platform = raw.get("platform", "onnxruntime_onnx")
    if platform != "onnxruntime_onnx":
        raise _fail(f"{where}: platform", f"{platform!r} is not supported (onnxruntime_onnx)")
    inputs = _tensor_specs(f"{where}: input", raw.get("input"), outputs=False)
    outputs = _tensor_specs(f"{where}: output", raw.get("output"), outputs=True)
    pre = raw.get("preprocess")
    preprocess = None
    if pre is not None:
        if not isinstance(pre, dict) or pre.get("kind") != "image":
            raise _fail(f"{where}: preprocess", "only {'kind': 'image', ...} is supported")
        _known(f"{where}: preprocess", pre, _PREPROCESS_KEYS)
        if len(inputs) != 1 or inputs[0].datatype != "BYTES":
            raise _fail(f"{where}: preprocess", "image preprocessing needs exactly one BYTES input")
        size = pre.get("size")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(s) and s > 0 for s in size)):
            raise _fail(f"{where}: preprocess.size", "must be [width, height]")
        if size[0] * size[1] > MAX_PIXELS:  # (its blank warm-up image alone took W x H bytes first)
            raise _fail(f"{where}: preprocess.size", f"{size[0]}x{size[1]} is over the limit of {MAX_PIXELS} pixels")
        scale = pre.get("scale", 1.0)
        if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:  # (1e400 reads as inf)
            raise _fail(f"{where}: preprocess.scale", "must be a positive number")
        onnx_input = pre.get("onnx_input")
        if not isinstance(onnx_input, str) or not onnx_input:
            raise _fail(f"{where}: preprocess.onnx_input", "must name the graph's input")
        for flag in ("invert", "flatten", "exif_orientation"):
            if not isinstance(pre.get(flag, False), bool):
                raise _fail(f"{where}: preprocess.{flag}", "must be true or false")
        preprocess = ImagePreprocess(
            onnx_input=onnx_input,
            width=size[0],
            height=size[1],
            scale=float(scale),
            invert=pre.get("invert", False),
            flatten=pre.get("flatten", True),
            exif_orientation=pre.get("exif_orientation", True),
        )
    max_batch_size = _positive_int(f"{where}: max_batch_size", raw.get("max_batch_size", 0), 0)
    return ModelConfig(
        name=name,
        inputs=inputs,
        outputs=outputs,
        max_batch_size=max_batch_size,
        instance_count=_instances(f"{where}: instance_count", raw.get("instance_count", 1)),
        version_policy=_version_policy(
            f"{where}: version_policy", raw.get("version_policy", {"latest": {"num_versions": 1}})
        ),
        preprocess=preprocess,
        dynamic_batching=_dynamic_batching(f"{where}: dynamic_batching", raw.get("dynamic_batching"), max_batch_size),
        platform=platform,
        metadata=raw.get("metadata", {}) if isinstance(raw.get("metadata", {}), dict) else {},
        raw=raw,
    )


MAX_CONFIG_BYTES = 1 << 20


def _same(given: Any, mine: Any, key: str = "") -> bool:
    """Whether a field of a Triton model configuration a load sent says what the model's own
    (``ModelConfig.as_triton``) says: the fields it gives, in any of protobuf's JSON spellings
    (integers as text, enums in any case), equal; those it leaves out are the model's. Inputs
    and outputs are matched by name, each one the model has given once."""
    if isinstance(mine, dict):
        return isinstance(given, dict) and all(k in mine and _same(v, mine[k], k) for k, v in given.items())
    if isinstance(mine, list):
        if not isinstance(given, list) or len(given) != len(mine):
            return False
        if key in ("input", "output"):
            named = {m["name"]: m for m in mine}
            names = [g.get("name") if isinstance(g, dict) and isinstance(g.get("name"), str) else None for g in given]
            return set(names) == set(named) and all(_same(g, named[g["name"]]) for g in given)
        return all(_same(g, m) for g, m in zip(given, mine, strict=True))
    if isinstance(mine, bool) or mine is None:
        return given is mine
    if isinstance(mine, int):
        return proto_int(given) == mine
    if key in _ENUM_KEYS:
        return isinstance(given, str) and given.upper() == mine
    return bool(given == mine)


def _brief(value: Any) -> str:
    """A value a load sent, as its JSON, shortened for a message."""
    try:
        text = json.dumps(value)
    except (RecursionError, ValueError):  # (nested past what the encoder goes)
        text = f"a {type(value).__name__} nested too deep to show"
    return shown(text[:200])


_GROUP_KEYS = {"name", "kind", "count", "gpus", "secondary_devices", "profile", "passive", "host_policy"}


def _instance_count(raw: Any, kind: str, gpus: tuple[int, ...]) -> int:
    """The count of Triton's ``instance_group`` as a load sends it: one group, of the device the
    server runs the model on (or KIND_AUTO), with a count."""
    where = "load config override: instance_group"
    if not isinstance(raw, list) or len(raw) != 1 or not isinstance(raw[0], dict):
        raise _fail(where, "must be a list of one group: every instance of a version runs on the server's one device")
    group = raw[0]
    _known(f"{where}[0]", group, _GROUP_KEYS)
    if "count" not in group:
        raise _fail(f"{where}[0]", "needs a count")
    count = _instances(f"{where}[0].count", group["count"])
    if not _same(group.get("kind", kind), kind, "kind") and not _same(group.get("kind"), "KIND_AUTO", "kind"):
        raise _fail(f"{where}[0].kind", f"{_brief(group.get('kind'))} is not {kind}, where this server runs the model")
    if not isinstance(group.get("name", ""), str):
        raise _fail(f"{where}[0].name", "must be a string")
    fixed = {"gpus": list(gpus), "secondary_devices": [], "profile": [], "passive": False, "host_policy": ""}
    for key, value in fixed.items():
        if key in group and group[key] != [] and not _same(group[key], value):
            raise _fail(f"{where}[0].{key}", f"{_brief(group[key])} is not supported here (this model's: {value!r})")
    return count


def triton_override(override: dict[str, Any], kind: str, gpus: tuple[int, ...]) -> dict[str, Any]:
    """A load's config override, in this server's form or in Triton's (what GET .../config
    answers, whole or in part), as the fields of config.json it changes: Triton's
    ``instance_group`` count is ``instance_count``; a whole configuration (one with the
    model's inputs or outputs) without ``dynamic_batching`` turns it off. Its other Triton
    fields are checked by ``check_fixed`` once the config is made."""
    allowed = [*OVERRIDABLE, "instance_group"]
    unknown = sorted(set(override) - set(allowed) - set(TRITON_FIXED))
    if unknown:
        raise InvalidInput(
            f"load config override: unsupported key(s) {[shown(str(k)) for k in unknown[:10]]}; allowed: {allowed}, "
            "and Triton's other model configuration fields as the model's own (GET .../config)"
        )
    own = {key: override[key] for key in OVERRIDABLE if key in override}
    if "input" in override or "output" in override:
        # A whole model configuration, as Triton's load takes one: without dynamic_batching, the
        # model does not batch requests (config.json's batching left out is turned off).
        own.setdefault("dynamic_batching", None)
    if "instance_group" in override:
        if "instance_count" in override:
            raise InvalidInput("load config override: give instance_group or instance_count, not both")
        own["instance_count"] = _instance_count(override["instance_group"], kind, gpus)
    return own


def check_fixed(config: ModelConfig, override: dict[str, Any], kind: str, gpus: tuple[int, ...]) -> None:
    """InvalidInput unless each field of Triton's model configuration a load sent and may not
    change is the model's own, as the loaded config would answer it."""
    mine = config.as_triton(kind, gpus)
    differ = [key for key in TRITON_FIXED if key in override and not _same(override[key], mine[key], key)]
    if differ:
        sent = "; ".join(f"{key}: sent {_brief(override[key])}" for key in differ)
        dims = (
            " (dims leave out the batch dimension where max_batch_size > 0)"
            if {"input", "output"} & set(differ)
            else ""
        )
        raise InvalidInput(
            f"load config override: unsupported key(s) {differ}: not the model's own ({sent}){dims}; a load changes "
            f"{list(OVERRIDABLE)} and instance_group's count, and sends Triton's other fields as GET .../config answers them"
        )


def load_config(
    model_dir: Path,
    override: dict[str, Any] | None = None,
    device: tuple[str, tuple[int, ...]] = ("KIND_CPU", ()),
) -> ModelConfig:
    """``model_dir``'s config.json, with a load's config override (``triton_override``; ``device``:
    the instance kind and GPUs of the server's, ``instance_kind``)."""
    path = model_dir / "config.json"
    where = f"{model_dir.name}/config.json"
    _confined(model_dir, path, f"model '{model_dir.name}': {where}")
    try:
        with open_regular(path) as f:  # (a FIFO held the load in its open)
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise InvalidInput(f"model '{model_dir.name}': {where} is missing") from None
    except OSError as exc:
        raise InvalidInput(f"model '{model_dir.name}': cannot read {where}: {exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise InvalidInput(f"model '{model_dir.name}': {where} is over {MAX_CONFIG_BYTES >> 20} MiB")
    try:
        raw = json.loads(data.decode(), parse_constant=refuse_constant)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
        problem = json_problem(exc, data.decode(errors="replace"))
        raise InvalidInput(f"model '{model_dir.name}': cannot read {where}: {problem}") from None
    if override:
        raw = {**raw, **triton_override(override, *device)}
        where = f"{where} with load override"
    config = parse_config(model_dir.name, raw, where)
    if override:
        check_fixed(config, override, *device)
    labels = {o.name: _labels(model_dir, o.label_filename) for o in config.outputs if o.label_filename}
    return replace(config, labels=labels) if labels else config


def _confined(model_dir: Path, path: Path, where: str) -> None:
    """Refuse a file of the model's that is a link out of its folder (it would read any file the
    server can, as model.onnx's links are confined: the repository holds its models whole) or
    not a regular file (a FIFO would hold the load until written). A missing one (or a link
    loop, which does not exist either) is left to its reader."""
    try:
        if not path.exists():
            return
        outside = not path.resolve().is_relative_to(model_dir.resolve())
        regular = path.is_file()
    except (OSError, RuntimeError) as exc:  # a name too long, a folder it may not read
        raise InvalidInput(f"{where}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    if outside:
        raise InvalidInput(f"{where} is a link out of the model's folder")
    if not regular:
        raise InvalidInput(f"{where} is not a regular file")


MAX_LABELS_BYTES = 4 << 20


def _labels(model_dir: Path, filename: str) -> tuple[str, ...]:
    """An output's labels file (a regular file in the model's folder, not a link out of it): a
    label a line, lines split at "\\n" only, as Triton reads them."""
    path = model_dir / filename
    where = f"model '{model_dir.name}': label_filename {filename!r}"
    _confined(model_dir, path, where)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_LABELS_BYTES + 1)
    except OSError as exc:  # missing, a link loop
        raise InvalidInput(f"{where}: cannot read it: {exc.strerror or exc}") from None
    if len(data) > MAX_LABELS_BYTES:
        raise InvalidInput(f"{where} is over {MAX_LABELS_BYTES >> 20} MiB")
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        raise InvalidInput(f"{where} is not UTF-8 text") from None
    return tuple(lines[:-1] if lines[-1] == "" else lines)
