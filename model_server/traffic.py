"""The traffic policy: who gets which version, and what is mirrored to a shadow.

The one description of a traffic split: ordered header rules, a
weighted default route, an optional mirror. The model server's router executes it here;
include/ renders the same object to an Istio VirtualService. Pure: no I/O in this module
except ``PolicyStore``, which persists policies and watches the optional policy file.

Sticky assignment: a user's key (``X-User-ID``, else the client address) hashes into one of
10,000 buckets; destinations own consecutive bucket ranges in ascending version order, so
the highest version's range only grows while its weight grows and its users stay on it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import re2

from model_server.config import int64_version
from model_server.errors import PolicyError, StateNotSaved, json_refusal, shown_names, shown_value
from model_server.files import write_private, write_state

log = logging.getLogger(__name__)

BUCKETS = 10_000
MIN_MIRROR_PERCENT = 100 / BUCKETS  # the mirror samples request ids one bucket at a time
MATCH_KINDS = ("exact", "prefix", "regex")
NON_EMPTY_MATCH_KINDS = ("prefix", "regex")  # Istio's validation refuses them empty
RE2_MAX_PROGRAM_SIZE = 32768  # re2.max_program_size.error_level in Istio's Envoy bootstrap
MAX_VALUE_CHARS = 1024  # a rule's value to match: exact, prefix or regex (Istio's bound on a regex)
MAX_REGEX_CHARS = MAX_VALUE_CHARS
MAX_RULES = 256  # header rules a policy: each compiled once and tried in order on every routed request
MAX_RULE_HEADERS = 64  # headers a rule matches, all of them
# A rule's name labels its requests in the log and the metrics, beside these routes of the server's own.
RULE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
RESERVED_ROUTES = frozenset({"route", "version", "mirror", "probe"})
PINNED_PREFIX = "pinned-v"  # the VirtualService's routes of requests naming their version: no rule's name
BUCKET_HEADER = "x-rollout-bucket"  # the user's bucket, written by the mesh's proxies (vision_rollout.mesh)
UNRULED_HEADERS = {  # headers a rule may not match on: the server and Istio would route them apart
    "host": "Envoy holds the Host header as :authority, so Istio's header match on it never matches",
    BUCKET_HEADER: "the mesh's proxies write it (the user's bucket) over what the client sent",
    "x-model-version": (
        "it names the version a request wants, served ahead of every rule (a value that is no version is "
        "refused), while Istio pins only the deployed versions' numbers and lets other values reach the rules"
    ),
}
# A header name Istio's webhook takes (letters, digits, '-', '_'): of HTTP's field names, those a
# rule may match in the mesh as on this server.
HEADER_NAME_RE = re.compile(r"[-_0-9A-Za-z]{1,256}")
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # the error goes into the PolicyError, not to stderr


def bucket(key: str) -> int:
    """A stable bucket in [0, 10000) for a user key (the same on every process and restart)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % BUCKETS


def compile_rule_regex(value: str, where: str) -> Any:
    """A header rule's regex as Istio takes it: RE2 syntax (no look-around, no back-references),
    a program no larger than Istio's Envoy accepts, matched in time linear in the header."""
    if len(value) > MAX_REGEX_CHARS:
        raise PolicyError(f"{where} is {len(value)} characters long; at most {MAX_REGEX_CHARS}")
    try:
        pattern = re2.compile(value, _RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
        raise PolicyError(
            f"{where} {value!r} is not a regular expression Istio accepts (RE2 syntax): {reason}"
        ) from None
    if pattern.programsize > RE2_MAX_PROGRAM_SIZE:
        raise PolicyError(
            f"{where} {value!r} compiles to an RE2 program of size {pattern.programsize}; Istio's Envoy "
            f"refuses more than {RE2_MAX_PROGRAM_SIZE} (re2.max_program_size.error_level)"
        )
    return pattern


@dataclass(frozen=True)
class HeaderMatch:
    kind: str  # exact | prefix | regex
    value: str
    pattern: Any = None  # a compiled RE2 pattern (compile_rule_regex)

    def matches(self, actual: str | None) -> bool:
        if actual is None:
            return False
        if self.kind == "exact":
            return actual == self.value
        if self.kind == "prefix":
            return actual.startswith(self.value)
        assert self.pattern is not None
        return self.pattern.fullmatch(actual) is not None  # Istio's regex matches the whole value


@dataclass(frozen=True)
class Destination:
    version: str
    weight: int


@dataclass(frozen=True)
class Rule:
    headers: tuple[tuple[str, HeaderMatch], ...]
    route: tuple[Destination, ...]
    name: str | None = None

    def matches(self, headers: Mapping[str, str]) -> bool:
        return all(m.matches(headers.get(name)) for name, m in self.headers)


@dataclass(frozen=True)
class Mirror:
    version: str
    percent: float


def _pick(route: tuple[Destination, ...], b: int) -> str:
    edge = 0
    for d in route:  # ascending versions; weights sum to 100
        edge += d.weight * (BUCKETS // 100)
        if b < edge:
            return d.version
    return route[-1].version


@dataclass(frozen=True)
class TrafficPolicy:
    route: tuple[Destination, ...]
    rules: tuple[Rule, ...] = ()
    mirror: Mirror | None = None

    # -- parsing -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: Any) -> TrafficPolicy:
        if not isinstance(raw, dict):
            raise PolicyError("policy must be a JSON object with a 'route' list")
        unknown = sorted(set(raw) - {"rules", "route", "mirror"})
        if unknown:
            raise PolicyError(f"unknown policy field(s) {shown_names(unknown)}; allowed: rules, route, mirror")
        route = _parse_route(raw.get("route"), "route")
        rules_raw = raw.get("rules", [])
        if not isinstance(rules_raw, list):
            raise PolicyError("rules must be a list")
        if len(rules_raw) > MAX_RULES:
            raise PolicyError(f"rules: {len(rules_raw)} rules; at most {MAX_RULES} a policy")
        rules = tuple(_parse_rule(r, f"rules[{i}]") for i, r in enumerate(rules_raw))
        mirror = None
        if raw.get("mirror") is not None:
            mirror = _parse_mirror(raw["mirror"])
            if len(route) == 1 and route[0].version == mirror.version:
                raise PolicyError(
                    f"mirror: version {mirror.version} is the primary (it takes 100% of the default "
                    "route); mirror to a version that is not serving all traffic"
                )
        return cls(route=route, rules=rules, mirror=mirror)

    @staticmethod
    def json_schema() -> dict[str, Any]:
        """The policy's JSON form as JSON schema (structure only; ``from_dict`` also checks that
        weights sum to 100, versions are unique, regexes compile, the mirror is not the primary)."""
        version = {"type": "string", "pattern": "^[1-9][0-9]*$", "description": "model version"}
        route = {
            "type": "array",
            "minItems": 1,
            "description": "weighted destinations, weights summing to 100",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["version"],
                "properties": {"version": version, "weight": {"type": "integer", "minimum": 0, "maximum": 100}},
            },
        }
        match = {
            "type": "object",
            "minProperties": 1,
            "maxProperties": 1,
            "properties": {
                k: {"type": "string", **({"minLength": 1} if k in NON_EMPTY_MATCH_KINDS else {})} for k in MATCH_KINDS
            },
            "additionalProperties": False,
        }
        return {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "TrafficPolicy",
            "type": "object",
            "additionalProperties": False,
            "required": ["route"],
            "properties": {
                "rules": {
                    "type": "array",
                    "maxItems": MAX_RULES,
                    "description": "tried in order before route",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["match", "route"],
                        "properties": {
                            "name": {"type": "string"},
                            "route": route,
                            "match": {
                                "type": "object",
                                "required": ["headers"],
                                "additionalProperties": False,
                                "properties": {
                                    "headers": {
                                        "type": "object",
                                        "minProperties": 1,
                                        "maxProperties": MAX_RULE_HEADERS,
                                        "propertyNames": {"pattern": "^" + HEADER_NAME_RE.pattern + "$"},
                                        "additionalProperties": match,
                                    }
                                },
                            },
                        },
                    },
                },
                "route": route,
                "mirror": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["version"],
                    "properties": {"version": version, "percent": {"type": "number", "minimum": 0, "maximum": 100}},
                },
            },
        }

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.rules:
            out["rules"] = [
                {
                    **({"name": r.name} if r.name else {}),
                    "match": {"headers": {h: {m.kind: m.value} for h, m in r.headers}},
                    "route": [{"version": d.version, "weight": d.weight} for d in r.route],
                }
                for r in self.rules
            ]
        out["route"] = [{"version": d.version, "weight": d.weight} for d in self.route]
        if self.mirror is not None:
            out["mirror"] = {"version": self.mirror.version, "percent": self.mirror.percent}
        return out

    # -- use -----------------------------------------------------------------------------

    def versions(self) -> set[str]:
        out = {d.version for d in self.route} | {d.version for r in self.rules for d in r.route}
        if self.mirror is not None:
            out.add(self.mirror.version)
        return out

    def check_loaded(self, loaded: Iterable[int]) -> None:
        have = {str(v) for v in loaded}
        missing = sorted(self.versions() - have, key=int)
        if missing:
            raise PolicyError(f"version(s) {missing} are not loaded (loaded: {sorted(have, key=int)})")

    def choose(self, headers: Mapping[str, str], user_key: str) -> tuple[str, str]:
        """(version, what decided it: a rule name or index, or 'route')."""
        b = bucket(user_key)
        for i, rule in enumerate(self.rules):
            if rule.matches(headers):
                return _pick(rule.route, b), rule.name or f"rules[{i}]"
        return _pick(self.route, b), "route"

    def mirror_for(self, primary: str, request_key: str) -> str | None:
        """The shadow version for this request, or None (not sampled, or it is the primary)."""
        m = self.mirror
        if m is None or m.version == primary:
            return None
        if m.percent >= 100 or bucket("mirror:" + request_key) < m.percent * (BUCKETS / 100):
            return m.version
        return None


def mirror_percent_problem(percent: float) -> str:
    """Why a mirror share under the sampling's step is refused (it would mirror a whole step)."""
    return (
        f"mirror percent {percent:g} is under {MIN_MIRROR_PERCENT:g}: the mirror samples request ids in steps "
        f"of {MIN_MIRROR_PERCENT:g}% and would copy {MIN_MIRROR_PERCENT:g}%; give 0 or at least {MIN_MIRROR_PERCENT:g}"
    )


def _version(raw: Any, where: str) -> str:
    v = str(raw) if isinstance(raw, int) and not isinstance(raw, bool) else raw
    n = int64_version(v) if isinstance(v, str) else None
    if n is None or n < 1:
        raise PolicyError(f"{where}: version must be a positive integer (as a string), got {shown_value(raw)}")
    return str(n)


def _parse_route(raw: Any, where: str) -> tuple[Destination, ...]:
    if not isinstance(raw, list) or not raw:
        raise PolicyError(f"{where} must be a non-empty list of {{version, weight}}")
    dests = []
    for i, d in enumerate(raw):
        if not isinstance(d, dict):
            raise PolicyError(f"{where}[{i}] must be an object with version and weight")
        if unknown := sorted(set(d) - {"version", "weight"}):
            raise PolicyError(f"{where}[{i}]: unknown field(s) {shown_names(unknown)}; allowed: version, weight")
        weight = d.get("weight", 100 if len(raw) == 1 else None)
        if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 100:
            raise PolicyError(f"{where}[{i}].weight must be an integer 0..100, got {shown_value(weight)}")
        dests.append(Destination(_version(d.get("version"), f"{where}[{i}]"), weight))
    versions = [d.version for d in dests]
    if len(set(versions)) != len(versions):
        repeated = [v for v, n in Counter(versions).items() if n > 1]
        raise PolicyError(f"{where}: a version appears more than once ({shown_names(repeated)})")
    total = sum(d.weight for d in dests)
    if total != 100:
        raise PolicyError(f"{where}: weights sum to {total}, not 100")
    return tuple(sorted(dests, key=lambda d: int(d.version)))


def _text_problem(text: str) -> str | None:
    """Why ``text`` cannot be a rule's value or name (no request carries it, and a lone
    surrogate, which JSON can write, is no text RE2 or YAML can take), or None."""
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        return "is not Unicode text (it holds a lone surrogate)"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        return "holds a control character, which no request carries"
    return None


def _parse_rule(raw: Any, where: str) -> Rule:
    if not isinstance(raw, dict):
        raise PolicyError(f"{where} must be an object with match and route")
    unknown = sorted(set(raw) - {"name", "match", "route"})
    if unknown:
        raise PolicyError(f"{where}: unknown field(s) {shown_names(unknown)}")
    match = raw.get("match")
    if not isinstance(match, dict) or set(match) != {"headers"} or not isinstance(match["headers"], dict):
        raise PolicyError(f"{where}.match must be {{'headers': {{name: {{exact|prefix|regex: value}}}}}}")
    if not match["headers"]:
        raise PolicyError(f"{where}.match.headers is empty: a rule must match something")
    if len(match["headers"]) > MAX_RULE_HEADERS:
        raise PolicyError(f"{where}.match.headers: {len(match['headers'])} headers; at most {MAX_RULE_HEADERS} a rule")
    headers: list[tuple[str, HeaderMatch]] = []
    named: dict[str, str] = {}  # lower case -> as written
    for name, spec in match["headers"].items():
        if not HEADER_NAME_RE.fullmatch(name):
            raise PolicyError(
                f"{where}.match.headers: {name[:40]!r} is not a header name a rule may match (1 to 256 "
                "letters, digits, '-' and '_': Istio refuses the other characters HTTP allows)"
            )
        w = f"{where}.match.headers.{name}"
        if name.lower() in named:  # Istio's VirtualService would keep one of the two conditions
            raise PolicyError(
                f"{w}: the header {named[name.lower()]!r} is named twice (header names compare without case); "
                "give each header once"
            )
        named[name.lower()] = name
        if name.lower() in UNRULED_HEADERS:
            raise PolicyError(f"{w}: {UNRULED_HEADERS[name.lower()]}; route by another header")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in MATCH_KINDS:
            raise PolicyError(f"{w} must be one of {{exact|prefix|regex: value}}")
        kind, value = next(iter(spec.items()))
        if not isinstance(value, str):
            raise PolicyError(f"{w}.{kind} must be a string")
        if len(value) > MAX_VALUE_CHARS:
            raise PolicyError(f"{w}.{kind} is {len(value)} characters long; at most {MAX_VALUE_CHARS}")
        if (problem := _text_problem(value)) is not None:
            raise PolicyError(f"{w}.{kind} {problem}")
        if not value and kind in NON_EMPTY_MATCH_KINDS:
            raise PolicyError(
                f"{w}.{kind} is empty, which Istio refuses (and Envoy, for a prefix); to match any non-empty "
                "value give regex '.+'"
            )
        pattern = None
        if kind == "regex":
            pattern = compile_rule_regex(value, f"{w}.regex")
        headers.append((name.lower(), HeaderMatch(kind, value, pattern)))
    name = raw.get("name")
    if name is not None and not (isinstance(name, str) and RULE_NAME_RE.fullmatch(name)):
        raise PolicyError(
            f"{where}.name must be 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    if name in RESERVED_ROUTES:
        raise PolicyError(f"{where}.name {name!r} is reserved: the log and the metrics name a request's route by it")
    if name is not None and name.startswith(PINNED_PREFIX):
        raise PolicyError(f"{where}.name {name!r}: names starting with {PINNED_PREFIX!r} are reserved")
    return Rule(tuple(headers), _parse_route(raw.get("route"), f"{where}.route"), name)


def _parse_mirror(raw: Any) -> Mirror:
    if not isinstance(raw, dict):
        raise PolicyError("mirror must be an object {version, percent}")
    if unknown := sorted(set(raw) - {"version", "percent"}):
        raise PolicyError(f"mirror: unknown field(s) {shown_names(unknown)}; allowed: version, percent")
    percent = raw.get("percent", 100)
    if not isinstance(percent, (int, float)) or isinstance(percent, bool) or not 0 <= percent <= 100:
        raise PolicyError(f"mirror.percent must be a number 0..100, got {shown_value(percent)}")
    if 0 < percent < MIN_MIRROR_PERCENT:
        raise PolicyError(mirror_percent_problem(percent))
    return Mirror(_version(raw.get("version"), "mirror"), float(percent))


def default_policy(loaded: Iterable[int]) -> TrafficPolicy:
    """Without a policy the highest loaded version takes everything (Triton's default)."""
    return TrafficPolicy(route=(Destination(str(max(loaded)), 100),))


class PolicyStore:
    """Policies per model: applied atomically, persisted, restored, and fed by a watched file.

    ``apply(model, policy)`` persists first (write, fsync, rename) and swaps the in-memory
    reference second: a policy that cannot be persisted is not applied. A persisted policy that
    cannot be read back at the start (a newer server refusing what an older one took, a file
    edited by hand) leaves its model ``unreadable`` until a policy is applied or removed: its
    routed requests are refused, never sent to whichever version would serve without a policy.
    """

    def __init__(self, state_dir: Path | None, on_change: Callable[[str, TrafficPolicy | None], None]):
        self.state_dir = state_dir
        self._policies: dict[str, TrafficPolicy] = {}
        self.unreadable: dict[str, str] = {}  # model -> why its persisted policy was not restored
        self._lock = threading.Lock()
        self._on_change = on_change

    def get(self, model: str) -> TrafficPolicy | None:
        return self._policies.get(model)

    def versions(self, model: str) -> set[str]:
        """The versions the model's policy routes or mirrors to (none without a policy)."""
        policy = self._policies.get(model)
        return policy.versions() if policy is not None else set()

    def apply(self, model: str, policy: TrafficPolicy) -> None:
        """StateNotSaved, the policy not applied, if its file cannot be written (the file put
        back as it was: review s54-3, a write failing after its rename left the refused policy
        for a restart)."""
        with self._lock:
            self._save({model: policy})
            self._policies = {**self._policies, model: policy}
            self.unreadable.pop(model, None)
        self._on_change(model, policy)

    def apply_all(self, wanted: dict[str, TrafficPolicy]) -> list[str]:
        """Several models' policies applied all or none (a traffic file's): each changed one's
        state file written (``_save``), then the policies swapped. Returns the models changed."""
        with self._lock:
            changed = {m: p for m, p in wanted.items() if self._policies.get(m) != p or m in self.unreadable}
            self._save(changed)
            self._policies = {**self._policies, **changed}
            for model in changed:
                self.unreadable.pop(model, None)
        for model, policy in changed.items():
            self._on_change(model, policy)
        return list(changed)

    def _save(self, policies: dict[str, TrafficPolicy]) -> None:
        """Each policy's state file written, all or none: StateNotSaved where one cannot be (a
        full or read-only volume), those the writes touched put back as they were, byte for byte
        (an unreadable policy's too: its model stays refused); with self._lock held."""
        if self.state_dir is None:
            return
        written: list[tuple[Path, bytes | None]] = []  # (a file and its bytes before)
        try:
            for model, policy in policies.items():
                path = self.state_dir / f"{model}.json"
                try:
                    before = path.read_bytes() if path.is_file() else None
                except OSError as exc:
                    raise StateNotSaved.writing(path, exc) from None
                written.append((path, before))  # (before the write: it may fail after its rename)
                write_state(path, policy.to_dict())
        except StateNotSaved as exc:
            kept = [path.stem for path, before in reversed(written) if not _put_back(path, before)]
            if kept:
                raise StateNotSaved(
                    f"{exc.message.removesuffix('; nothing changed')}; no policy moved, but the state files of "
                    f"{shown_names(kept)} hold the new policies (a restart would restore them)"
                ) from None
            raise

    def models(self) -> list[str]:
        return sorted(self._policies)

    def remove(self, model: str) -> None:
        with self._lock:
            if self.state_dir is not None:
                path = self.state_dir / f"{model}.json"
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    raise StateNotSaved.writing(path, exc) from None
            self._policies = {m: p for m, p in self._policies.items() if m != model}
            self.unreadable.pop(model, None)
        self._on_change(model, None)

    def restore(self) -> list[str]:
        """Load persisted policies; an unreadable one is logged and its model ``unreadable``."""
        restored: list[str] = []
        if self.state_dir is None or not self.state_dir.is_dir():
            return restored
        for path in sorted(self.state_dir.glob("*.json")):
            try:
                policy = TrafficPolicy.from_dict(json.loads(path.read_text()))
            except (OSError, ValueError, RecursionError) as exc:
                # (the reason a client is told names no file and no value of the policy's: a folder's
                # path and a rule's header values are no client's business; the log has them)
                if isinstance(exc, OSError):
                    why = exc.strerror or type(exc).__name__
                else:
                    why = (
                        "not JSON"
                        if isinstance(exc, json.JSONDecodeError | UnicodeDecodeError)
                        else "JSON nested too deep"
                        if isinstance(exc, RecursionError)
                        else "a policy this server does not take"
                    )
                reason = f"its persisted traffic policy could not be read back ({why})"
                log.error(
                    "model '%s': %s: %s (%s); its routed requests are refused until a policy is put",
                    path.stem,
                    reason,
                    json_refusal(exc)[:300],
                    path,
                )
                self.unreadable[path.stem] = reason
                continue
            self._policies = {**self._policies, path.stem: policy}
            self._on_change(path.stem, policy)
            restored.append(path.stem)
        return restored


def _put_back(path: Path, before: bytes | None) -> bool:
    """A state file as it was (``before``: its bytes; None: none); False where it does not hold
    them (a write that failed after its rename, in its folder's sync, holds them all the same)."""

    def held() -> bool:
        try:
            return (path.read_bytes() if path.is_file() else None) == before
        except OSError:
            return False

    if held():  # (its own write failed before its rename)
        return True
    try:
        if before is None:
            path.unlink(missing_ok=True)
        else:
            write_private(path, before)
    except OSError:
        return held()
    return True


def read_traffic_file(path: Path) -> dict[str, TrafficPolicy]:
    """``{"models": {"<model>": <policy>, ...}}``; raises PolicyError naming the model."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise PolicyError(f"traffic file {path}: {json_refusal(exc)}") from None
    models = raw.get("models") if isinstance(raw, dict) else None
    if not isinstance(models, dict):
        raise PolicyError(f"traffic file {path}: expected {{'models': {{<model>: <policy>}}}}")
    out = {}
    for model, policy in models.items():
        try:
            out[model] = TrafficPolicy.from_dict(policy)
        except PolicyError as exc:
            raise PolicyError(f"traffic file {path}, model '{model}': {exc}") from None
    return out
