"""``rolloutctl``: every step of the rollout without Airflow.

  rolloutctl gate --samples FILE [--spec FILE [--stage N --started T (--prometheus URL | --no-hard-guards)
                  [--level L]]] [--latency-from live|replay] [--replay-images N] [--look K --looks N
                  [--information L1/R1/A1,...]] [--set key=value ...] [--json]
                             (--stage takes --replay-images: the DAG's stages replay the validation set;
                  --started, the stage's start: the DAG judges a look on the samples before its time, the
                  last once a whole validation round is in, under the hard guards (a breach fails it);
                  and --information past look 1: the DAG judges a look at its looks' information)
  rolloutctl audit --prediction-log URI --since 1h [--model M] [--out DIR [--overwrite]] [--budget-s 480]
                   [--json]          (no file of the log begun after --budget-s: inconclusive, said)
  rolloutctl mesh render --backend istio|local --policy FILE [--namespace NS --service S --name N]
  rolloutctl mesh get --backend local --url URL --model M [--token-file F]   (the policy in effect, JSON)
  rolloutctl mesh apply --backend local --url URL --model M --policy FILE [--token-file F] [--lock-dir DIR]
                        [--force]          (refused while a rollout holds the model, unless --force)
  rolloutctl mesh apply --backend istio --policy FILE --namespace NS --service S --name N --versions 1,2
                        [--root-namespace istio-system] [--run-dir DIR [--model M]]
                        [--force]          (refused while a DAG run holds the Lease rollout-N, unless --force;
                                            a mirror change recorded in DIR's mirrors/<M>/ for the hourly
                                            audit, refused without --run-dir)
  rolloutctl verify-model PATH [--baseline PATH] [--model-dir DIR] [--json]
  rolloutctl run --spec FILE --url URL --validation DIR --prediction-log URI [--token-file F]
                 (--prometheus URL | --no-hard-guards) [--sha256 HEX] [--state-file F] [--outbox DIR]
                 [--lock-dir DIR]
                                                     (a whole rollout on the model server's router)
  rolloutctl outbox list --outbox DIR [--json]            (the Slack reports waiting there, and
                                                          those set aside, refused for good)
  rolloutctl outbox send --outbox DIR --token-file F [--slack-url URL] [--budget-s 120] [--json]
                         [--retry-refused [NAME ...]]
                                   (each waiting report to Slack; removed once Slack took it;
                                    none started after --budget-s, no Slack call past it,
                                    those left named; one Slack
                                    refuses for good set aside in refused/; --retry-refused: those
                                    set aside sent again too, all or those named; one Slack does
                                    not take now stays set aside)
  rolloutctl outbox drop --outbox DIR NAME ...            (a report removed for good)
  rolloutctl status --model M (--lock-dir DIR | --namespace NS [--name VS]) [--url URL] [--token-file F]
                    [--json]         (the rollout holding the model, its lease, last word and routes)
  rolloutctl prune --run-dir DIR [--model M ...] [--retention-days 30] [--limit 500] [--dry-run] [--json]
                   [--namespace NS [--name VS]]     (kubernetes mode: the runs the Leases name kept)
                   (the audit hours, mirror changes, stage caches, run folders, approval counts
                    and outbox leftovers nobody reads any more)
  rolloutctl abort --spec FILE (--lock-dir DIR --url URL | --namespace NS [--name VS]) [--token-file F]
                   [--reason TEXT]   (the stable version back, the running rollout told to roll back)
  rolloutctl restart-stage --run-dir DIR --model M --run-id R --stage N --reason TEXT
                             (a DAG run's stage tested afresh at its next run, reported as restarted)

Exit codes: 0 pass (or done, or promoted; status: no rollout holds the model), 1 fail (or rolled
back, or aborted; status: a lease that expired, its run not ended), 2 usage error, 3 wait (status:
a rollout holds the model), 4 error (a server, a store or a file could not be used, or the model
was not where a rollout starts, or no rollout to abort: nothing was decided; abort: the run marked
aborted but the stable version not written back, as its line says; outbox send: a report Slack did
not take, left waiting or set aside); run stopped by a signal: 128 + its number (130 Ctrl-C, 143
SIGTERM), after the stable version is put back. Errors go to stderr in one line, results to stdout;
with --json an error is also one JSON object on stdout: {"error": "...", "exit": N}.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from vision_rollout.engine import StageWindow
    from vision_rollout.gates import Information, Verdict
    from vision_rollout.spec import RolloutSpec

log = logging.getLogger(__name__)

EXIT = {"pass": 0, "skip": 0, "fail": 1, "wait": 3, "inconclusive": 3, "warning": 3}
USAGE, ERROR = 2, 4


class UsageError(Exception):
    """A wrong argument or input file: exit 2."""


class CommandError(Exception):
    """What the command needs could not be used, or refused it: exit 4, nothing decided.
    ``result``: what the command could tell all the same, the object ``--json`` prints with the
    error."""

    def __init__(self, message: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.result = result


class _ArgumentsRefused(Exception):
    """argparse's usage error, once its usage line is printed: exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise _ArgumentsRefused(self.prog, _one_line(message))


class Interrupted(KeyboardInterrupt):
    """A signal that stops ``run`` (SIGINT, SIGTERM, SIGHUP): raised where the rollout is, so the
    engine puts the stable version back on its way out. As Ctrl-C's KeyboardInterrupt, not an
    Exception: nothing catches it on the way, and gevent's hub (the replay's HTTP client) hands
    it to the main greenlet as it does Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _value(key: str, text: str) -> Any:
    """A ``--set`` value: JSON where it is (a number, a list), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text
    except RecursionError:
        raise UsageError(f"--set {key[:64]}: nested too deep to read") from None


MAX_AUDIT_BUDGET_S = 86400.0  # rolloutctl audit --budget-s at most: a day
MAX_SINCE = timedelta(days=3660)  # ten years of prediction log: far more than any audit reads


def _since(text: str) -> timedelta:
    m = re.fullmatch(r"(\d{1,12})([smhd])", text)
    if m is None:
        raise UsageError(f"--since takes a duration like 30m, 1h or 2d, not {text[:64]!r}")
    seconds = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if seconds > MAX_SINCE.total_seconds():
        raise UsageError(f"--since takes at most {MAX_SINCE.days}d, not {text!r}")
    return timedelta(seconds=seconds)


def _folder(text: str) -> Any:
    """A folder or an object store URI (``vision_rollout.folders``)."""
    from vision_rollout.folders import Folder

    try:
        return Folder(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _names(text: str) -> list[str]:
    """``--hosts``/``--gateways``: names separated by commas, as the connection's ``istio`` extra
    holds them (``settings._NAMES``: 64 at most, 255 characters each); what Istio would refuse of
    each is ``IstioTarget``'s to say."""
    names = [n.strip() for n in text[: 64 * 257].split(",")]
    if len(text) > 64 * 257 or len(names) > 64 or any(not n or len(n) > 255 for n in names):
        raise argparse.ArgumentTypeError(
            f"not up to 64 names of 1 to 255 characters separated by commas: {text[:80]!r}"
        )
    return names


def _log_uri(text: str) -> str:
    """The prediction log: a folder that exists on this machine, or an object store URI without
    credentials. A mistyped folder read as an empty log: the audit said SKIP and exited 0."""
    from vision_rollout.folders import Folder

    try:
        path = Folder(text).path
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("not a folder", "not a prediction log")) from None
    if path is not None and not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{'not a folder' if path.exists() else 'no such folder'}: {str(path)[:200]!r}"
        )
    return text


def _url(text: str) -> str:
    """A server's base URL, http(s)://host[:port], trailing slash dropped. Credentials in it are
    refused without repeating them: urllib does not send them (the server was "unreachable"),
    and the URL is in every error message, the stage reasons and the Slack report."""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 (raises ValueError on a port that is not one)
    except ValueError:
        raise argparse.ArgumentTypeError("not a URL (http://host:port)") from None
    if "@" in parts.netloc:
        raise argparse.ArgumentTypeError("credentials in the URL are refused (they would be printed): give none")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"not an http(s)://host:port URL: {text[:100]!r}")
    _host_name(parts.hostname)
    if parts.query or parts.fragment:  # where a token goes: not repeated
        raise argparse.ArgumentTypeError("a server's address, http(s)://host:port, without a path, query or fragment")
    if parts.path.strip("/"):
        raise argparse.ArgumentTypeError(f"a server's address, http(s)://host:port, without a path: {text[:100]!r}")
    return f"{parts.scheme}://{parts.netloc}"


def _host_name(host: str) -> None:
    """A URL's host is a name a resolver takes: an argument's bytes in no encoding (as a shell
    hands them over) were "a server it cannot reach", exit 4."""
    try:
        host.encode("idna")
    except UnicodeError:
        raise argparse.ArgumentTypeError(f"not a host name: {host[:100]!r}") from None


def _lock_dir(text: str) -> Path:
    """A lock folder that exists (a mistyped one read as "no rollout holds the model"); the DAG's
    (``<run_dir>/locks``) is made by the first rollout's lock, so a fresh stack has none yet: the
    refusal says so."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"no such folder: {text[:200]!r} (a lock folder is made when a rollout first takes a lock in it: "
            "none has yet, or the folder is mistyped)"
        )
    return path


def _existing_file(text: str) -> Path:
    from model_server.files import file_problem

    if problem := file_problem(text):
        raise argparse.ArgumentTypeError(f"{problem}: {text[:200]!r}")
    return Path(text)


MAX_TOKEN_BYTES = 64 * 1024
MAX_JSON_BYTES = 4 * 1024 * 1024  # a spec or a policy is a few hundred bytes


def _read_text(path: Path, limit: int) -> str:
    """The file's text; ValueError when it holds more than ``limit`` bytes (a wrong file: read
    whole, it filled the memory), NotAFile (an OSError) when it is no regular file (a FIFO held
    the command in its open for ever)."""
    from model_server.files import read_regular

    return read_regular(path, limit).decode()


def _token(path: Path | None) -> str | None:
    """The admin token from its file (never from the command line: ``ps`` shows that)."""
    if path is None:
        return None
    try:
        token = _read_text(path, MAX_TOKEN_BYTES).strip()
    except (OSError, ValueError) as exc:  # (UnicodeDecodeError is a ValueError)
        raise UsageError(f"--token-file {path}: cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    if not token:
        raise UsageError(f"--token-file {path}: is empty")
    return token


def _sha256(text: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise argparse.ArgumentTypeError(f"a sha256 is 64 hexadecimal digits, not {text[:80]!r}")
    return text.lower()


def _model(text: str) -> str:
    from vision_rollout.settings import MODEL_PATTERN

    if len(text) > 128 or not re.fullmatch(MODEL_PATTERN, text):
        raise argparse.ArgumentTypeError(f"not a model name: {text[:80]!r}")
    return text


def _read_samples(path: Path) -> Any:
    import pandas as pd

    from model_server.files import file_problem, open_regular

    if problem := file_problem(path):
        raise UsageError(f"--samples {path}: {problem}")
    if path.suffix not in (".csv", ".parquet"):
        raise UsageError(f"--samples {path}: samples must be .csv or .parquet")
    try:
        with open_regular(path) as f:
            return pd.read_parquet(f) if path.suffix == ".parquet" else pd.read_csv(f)
    except (OSError, ValueError) as exc:  # (pandas' and pyarrow's parse errors are ValueErrors)
        why = getattr(exc, "strerror", None) or exc
        raise UsageError(f"--samples {path}: cannot be read as samples: {why}") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are each given once: Python's reader keeps the last of a key given
    twice, so a spec naming ``candidate_version`` twice rolled out whichever came last."""
    out = dict(pairs)
    if len(out) < len(pairs):
        twice = sorted(k[:64] for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        raise ValueError(f"key(s) given more than once: {', '.join(repr(k) for k in twice[:10])}")
    return out


def _json_file(flag: str, path: Path) -> Any:
    """The JSON of the file argument ``flag``; a usage error naming it when it cannot be read."""
    try:
        return json.loads(_read_text(path, MAX_JSON_BYTES), object_pairs_hook=_unique_keys)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{flag} {path}: {getattr(exc, 'strerror', None) or exc}") from None
    except RecursionError:
        raise UsageError(f"{flag} {path}: nested too deep to read") from None


def _spec(path: Path) -> RolloutSpec:
    """The ``RolloutSpec`` of ``--spec``; a usage error naming it when it is none."""
    from vision_rollout.spec import RolloutSpec, SpecError

    try:
        return RolloutSpec.from_dict(_json_file("--spec", path))
    except SpecError as exc:
        raise UsageError(f"--spec {path}: invalid spec: {exc}") from None


def _policy(path: Path) -> Any:
    from model_server.traffic import PolicyError, TrafficPolicy

    raw = _json_file("--policy", path)
    try:
        return TrafficPolicy.from_dict(raw)
    except PolicyError as exc:
        raise UsageError(f"--policy {path}: invalid policy: {exc}") from None


def _latency_source(source: str | None, samples: Any) -> None:
    """``--latency-from``: a source of ``gates.SOURCES`` (live or replay), of samples whose
    ``source`` column names each row's, as the DAG's stage samples do (``engine.stage_samples``);
    a usage error naming the flag else."""
    from vision_rollout.gates import SOURCES

    if source is None:
        return
    if source not in SOURCES:
        raise UsageError(f"--latency-from takes {' or '.join(SOURCES)}, not {source[:40]!r}")
    if "source" not in samples.columns:
        raise UsageError(
            f"--latency-from {source}: the samples have no source column ({' or '.join(SOURCES)} on each row, as "
            "the DAG's stage samples)"
        )
    other = sorted({str(v) for v in samples["source"].dropna()} - set(SOURCES))
    if other:
        raise UsageError(
            f"--latency-from {source}: a sample's source must be {' or '.join(SOURCES)} (or empty), found "
            f"{', '.join(repr(v[:40]) for v in other[:5])}"
        )


def _information(text: str, look: int, samples: Any, latency_from: str | None) -> tuple[Information, ...]:
    """``--information``: the information of each look before ``look``, per check (the smaller
    arm's latency samples, of the source ``latency_from``, requests and live labels at it:
    ``gates.Information``, the n of a DAG verdict's latency, errors and live accuracy checks),
    and this look's counted in the samples, as the DAG's boundaries read them all."""
    from vision_rollout.gates import Information, look_information

    values = [v.strip() for v in text.split(",")] if text.strip() else []
    if len(values) != look - 1:
        raise UsageError(
            f"--information takes the information of the looks before --look {look}: {look - 1} value(s) "
            f"(this look's is counted in --samples), not {len(values)}"
        )
    bad = [v for v in values if not re.fullmatch(r"[0-9]{1,18}/[0-9]{1,18}/[0-9]{1,18}", v)]
    if bad:
        raise UsageError(
            "--information takes whole numbers per arm, latency samples/requests/live labels of each look, "
            f"e.g. 120/150/0,250/300/0, not {bad[0][:40]!r}"
        )
    seen = (
        *(Information(*(int(n) for n in v.split("/"))) for v in values),
        look_information(samples, latency_from),
    )
    for measure in Information._fields:
        for j, (before, after) in enumerate(pairwise(getattr(s, measure) for s in seen), 1):
            if after < before:
                at = f"look {j + 1}" if j + 1 < look else "this look's samples (--samples)"
                raise UsageError(
                    f"--information must not decrease from look to look (each look's samples hold the earlier "
                    f"ones'): look {j} saw {before:.0f} {measure}, {at} {after:.0f}"
                )
    return seen


def _stage_window(spec: RolloutSpec | None, stage: int | None, latency_from: str | None) -> StageWindow | None:
    """``--stage``: stage ``stage`` (1 for the first) of ``--spec``'s stages, as the DAG judges it
    (``engine.StageWindow``), None without it; a usage error when it is none of them, or when
    ``--latency-from`` names another source than the stage's."""
    from vision_rollout.engine import StageWindow

    if stage is None:
        return None
    if spec is None:
        raise UsageError(f"--stage {stage}: give the rollout's --spec, whose stages it counts")
    if not 1 <= stage <= len(spec.stages):
        stages = ", ".join(f"{w}%" for w in spec.stages)
        raise UsageError(f"--stage takes 1 to {len(spec.stages)} (the spec's stages {stages}), not {stage}")
    window = StageWindow(stage - 1, spec.stages[stage - 1], 0.0)
    if latency_from is not None and latency_from != window.latency_from:
        raise UsageError(
            f"--latency-from {latency_from[:40]}: stage {stage} ({window.weight}%) judges latency on "
            f"{window.latency_from} samples, as the DAG does (leave --latency-from out, or give {window.latency_from})"
        )
    return window


def _replay_images(images: int | None, window: StageWindow | None, stage: int | None) -> int:
    """``--replay-images``: the images of a validation round (``evaluate_gate``'s ``replay_images``,
    0 without it); a usage error when it is below 1, or left out with ``--stage`` (the DAG's stages
    replay the validation set, and judge the paired accuracy check on whole rounds only)."""
    if images is None and window is not None:
        raise UsageError(
            f"--stage {stage}: give --replay-images, the images of a validation round (the stage's validation "
            "set's: its labels.csv's images), as the DAG judges the paired accuracy check on whole rounds only"
        )
    if images is not None and images < 1:
        raise UsageError(f"--replay-images takes 1 or more (the images of a validation round), not {images}")
    return images or 0


def _level(level: float | None, window: StageWindow | None) -> float:
    """``--level``: the share of alpha the stage's window may spend (``attempts.Attempt.level``:
    what its earlier windows left once it moved; the DAG judges it at the spec's alpha times it),
    1 without it; a usage error when it is not in (0, 1], or given without ``--stage``."""
    if level is None:
        return 1.0
    if window is None:
        raise UsageError(f"--level {level:g}: give --spec and --stage, the stage whose window it is the level of")
    if not 0 < level <= 1:
        raise UsageError(f"--level takes 0 < L <= 1 (the share of alpha the stage's window may spend), not {level:g}")
    return level


# The columns gate --stage needs besides gate's (engine.stage_samples exports them, labelled_at too).
_STAGE_COLUMNS = ("time", "source", "pair_id", "correct")

# What gate --stage --no-hard-guards does not judge (as run's ``unguarded``): the guards read from Prometheus.
_UNGUARDED = " (without the P99, shadow-error and restart guards: --no-hard-guards)"


def _stage_guarded(args: argparse.Namespace, window: StageWindow | None) -> StageWindow | None:
    """``--started``, ``--prometheus``, ``--no-hard-guards``: the stage ``window`` begun at
    ``--started``, judged under its hard guards; a usage error naming the flag when one is missing
    with ``--stage``, or given without it."""
    from dataclasses import replace

    if window is None:
        given = [f for f, v in (("--started", args.started), ("--prometheus", args.prometheus)) if v is not None]
        if given or args.no_hard_guards:
            flag = given[0] if given else "--no-hard-guards"
            raise UsageError(f"{flag}: give --spec and --stage, the stage it judges as the DAG did")
        return None
    if args.started is None:
        raise UsageError(
            f"--stage {args.stage}: give --started, the stage's start in unix seconds (its stage record's window "
            "start, its verdict's bake.window), as the DAG judges each look on the samples before its time"
        )
    if not math.isfinite(args.started) or args.started < 0:
        raise UsageError(f"--started takes the stage's start in unix seconds, not {args.started:g}")
    if not args.prometheus and not args.no_hard_guards:
        raise UsageError(
            f"--stage {args.stage}: the P99, shadow-error and restart guards read Prometheus: give --prometheus URL, "
            "or --no-hard-guards to judge the look guarded by the replay's accuracy drop only"
        )
    return replace(window, started=args.started)


def _ahead(seconds: float) -> str:
    """How far ahead of this machine's clock, in whole seconds rounded up (60.4 s ahead is more
    than 60), an absurd value in three digits (1e+300, not its 301)."""
    return f"{math.ceil(seconds)}" if seconds < 1e15 else f"{seconds:.3g}"


def _stage_fits(args: argparse.Namespace, samples: Any) -> None:
    """``--started``: a start the stage's ``samples`` fit, as the DAG's (``engine.stage_samples``:
    those from its start on, read before the present); a usage error naming it when it lies in the
    future (milliseconds?) by more than the workers' clocks may be apart (``locks.CLOCK_SKEW_S``:
    it is stamped on the DAG worker's clock, compared here with this machine's), or after a
    sample."""
    from vision_rollout.locks import CLOCK_SKEW_S

    now = time.time()
    if args.started > now + CLOCK_SKEW_S:
        raise UsageError(
            f"--started {args.started!r}: in the future, {_ahead(args.started - now)} s ahead of this machine's clock "
            f"(now {now:.0f}), more than the {CLOCK_SKEW_S} s two machines' clocks may be apart (NTP): give the "
            "stage's start in unix seconds, not milliseconds (its stage record's window start)"
        )
    if before := int((samples["time"] < args.started).sum()):
        raise UsageError(
            f"--started {args.started!r}: {before:,} of the {len(samples):,} samples lie before it (from "
            f"{samples['time'].min():.3f}), where the DAG's stage samples are those from the stage's start on: is it "
            "the stage's start (its stage record's window start)?"
        )


def _label_times(args: argparse.Namespace, samples: Any) -> str:
    """The samples' ``labelled_at``: when each live label is evidence, unix seconds (NaN without
    one), as ``engine.stage_samples`` exports it; a usage error naming it where a live label has
    none, or a live row's is no time (infinite, negative), lies before ``--started`` (0: kept at
    every look) or in the future (milliseconds?) by more than the workers' clocks may be apart
    (``locks.CLOCK_SKEW_S``, as ``--started``'s): cut at the look's time, such labels would all be dropped or all kept, silently, and the look judged on
    other labels than the DAG's. Without that column (samples exported before it), a warning
    where a live row holds a label: each is judged, those received after the look's time too."""
    import numpy as np

    live = samples["source"].eq("live").to_numpy(dtype=bool, na_value=False)
    labelled = live & samples["correct"].notna()
    if "labelled_at" not in samples.columns:
        return (
            "the samples have no labelled_at (exported before it was): each live label they hold is judged, those "
            f"received after look {args.look}'s time too, where the DAG's look judged those received before it alone: "
            "the verdict may differ from the DAG's"
            if labelled.any()
            else ""
        )
    given = samples["labelled_at"].to_numpy(dtype=float, na_value=np.nan)
    if untold := int((labelled & np.isnan(given)).sum()):
        raise UsageError(
            f"--stage {args.stage}: {untold:,} of the samples' {int(labelled.sum()):,} live labels have no labelled_at: "
            "the DAG's stage samples give each its time (engine.stage_samples)"
        )
    given = given[live & ~np.isnan(given)]  # (the rows the cut reads: a replay's label is never cut)
    untimed = ~np.isfinite(given) | (given < 0)
    if untimed.any():
        raise UsageError(
            f"--stage {args.stage}: {int(untimed.sum()):,} of the samples' {len(given):,} labels have no time in "
            f"labelled_at ({float(given[untimed][0])}): the DAG's stage samples give each its time, unix seconds"
        )
    # (the DAG's poke reads the log from the stage's start on: a label's time is at or after it, the
    # microsecond the read's start is rounded to aside; 0, the epoch, would be kept at every look)
    if early := int((given < args.started - 1e-6).sum()):
        raise UsageError(
            f"--stage {args.stage}: {early:,} of the samples' {len(given):,} live labels lie before --started "
            f"{args.started!r} (labelled_at from {float(given.min())!r}): the DAG's stage samples hold the labels "
            "received from the stage's start on (engine.stage_samples), a re-sent id's label from before it none"
        )
    if given.size:
        _not_ahead(args, "labelled_at", float(given.max()), "each label's time")
    return ""


def _not_ahead(args: argparse.Namespace, column: str, latest: float, what: str) -> None:
    """A usage error naming the samples' ``column`` where its ``latest`` time lies in the future
    by more than the workers' clocks may be apart (``locks.CLOCK_SKEW_S``: stamped on the DAG
    worker's clock, compared with this machine's): milliseconds, likely, not unix seconds."""
    from vision_rollout.locks import CLOCK_SKEW_S

    if latest > (now := time.time()) + CLOCK_SKEW_S:
        raise UsageError(
            f"--stage {args.stage}: the samples' {column} reach {latest!r}, in the future, {_ahead(latest - now)} s "
            f"ahead of this machine's clock (now {now:.0f}), more than the {CLOCK_SKEW_S} s two machines' clocks may "
            f"be apart (NTP): the DAG's stage samples give {what} in unix seconds, not milliseconds"
        )


def _labels_before(samples: Any, at: float) -> Any:
    """``samples`` with the live labels received at or after ``at`` left out (``correct`` and
    ``labelled_by`` emptied), as the DAG's look at ``at`` joined only those received before it
    (``engine._live_labels``), by their ``labelled_at``; a replayed image's label (its validation
    set's) is never cut, whatever its row holds; samples without that column (not
    ``engine.stage_samples``') keep every label they hold."""
    import numpy as np

    if "labelled_at" not in samples.columns or "correct" not in samples.columns:
        return samples
    # (NaN, <NA>: no label, or a replayed image's; as numbers, a nullable column's NA is no mask)
    late = (samples["labelled_at"].to_numpy(dtype=float, na_value=np.nan) >= at) & samples["source"].eq(
        "live"
    ).to_numpy(dtype=bool, na_value=False)
    if not late.any():
        return samples
    emptied = {c: samples[c].mask(late) for c in ("correct", "labelled_by") if c in samples.columns}
    return samples.assign(**emptied)


def _stage_look(
    args: argparse.Namespace, spec: RolloutSpec, window: StageWindow, config: Any, samples: Any, images: int
) -> tuple[Verdict, str]:
    """``--stage``: the look judged as the DAG's poke that first judges it (``engine.judge_stage``),
    with the engine's own functions: on the samples before the look's time (``engine.look_end``:
    the last look's once a whole validation round and each arm's min_samples are in), under the
    hard guards that poke reads (``engine.stage_guards``: the replay's accuracy drop on all the
    samples given, as the poke read them, and with --prometheus those on Prometheus over the
    stage to then, evaluated then, ``engine.guard_inputs``). A guard that tripped fails it, no
    look judged, as the DAG's breach rolls the stage back. Prometheus read in part: a guard read
    tripped or a failing look fails, as the DAG's poke fails the stage on them, anything else is
    a ``CommandError`` (it rests on the guards not read). And a warning, where the samples end
    before the look's time by more than any gap between them and a poke interval (clients gone
    quiet, or an export by a poke before that time, which judged no look: not told apart), where
    they carry live labels without their times (``_label_times``), or where a look failed with
    Prometheus read in part; the first two in the ``CommandError`` too."""
    import numpy as np
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    from vision_rollout.engine import (
        guard_inputs,
        look_end,
        look_verdict,
        poke_interval,
        settle_time,
        stage_guards,
        tripped,
    )
    from vision_rollout.gates import Verdict, guard_checks
    from vision_rollout.locks import CLOCK_SKEW_S
    from vision_rollout.metrics import PrometheusSource

    missing = sorted(set(_STAGE_COLUMNS) - set(samples.columns))
    if missing:
        raise UsageError(
            f"--stage {args.stage}: the samples lack column(s) {missing} (the DAG's stage samples have them: "
            "engine.stage_samples)"
        )
    for column in ("time", "labelled_at"):  # (numbers: True and False are no time)
        if column in samples.columns and (not is_numeric_dtype(samples[column]) or is_bool_dtype(samples[column])):
            raise UsageError(
                f"--stage {args.stage}: the samples' {column} must be unix seconds (the DAG's stage samples')"
            )
    unlabelled = _label_times(args, samples)
    if untimed := int((~np.isfinite(samples["time"])).sum()):
        raise UsageError(
            f"--stage {args.stage}: {untimed:,} of the {len(samples):,} samples have no time "
            f"({samples.loc[~np.isfinite(samples['time']), 'time'].iloc[0]}): the DAG's stage samples each have one "
            "(unix seconds, when it is evidence)"
        )
    _stage_fits(args, samples)
    at = look_end(spec, window, args.look, samples, images)
    if at > (now := time.time()) + CLOCK_SKEW_S:  # (stamped on the worker's clock, as --started)
        raise UsageError(
            f"--look {args.look}: its time ({at:.3f}, {at - window.started:.0f} s into the stage) is in the future, "
            f"{_ahead(at - now)} s ahead of this machine's clock (now {now:.0f}), more than the {CLOCK_SKEW_S} s two "
            "machines' clocks may be apart: no DAG poke can have judged it (its poke, at or after that time, judges "
            "it on the samples before it)"
        )
    if not ((samples["time"] >= window.started) & (samples["time"] < at)).any():
        # (times in milliseconds lie after every look's time, far in the future: said so, naming them)
        _not_ahead(args, "time", float(samples["time"].max()), "each sample's time (when it is evidence)")
        raise UsageError(
            f"--started {args.started!r}: no sample lies between it and look {args.look}'s time "
            f"({at - window.started:.0f} s later); the samples' times are {samples['time'].min():.3f} to "
            f"{samples['time'].max():.3f}: is it the stage's start (its stage record's window start)?"
        )
    times = np.sort(samples["time"].to_numpy())
    # Samples ending well before the look's time (by more than any gap between them) were read by
    # a poke before it, or by the look's poke after the clients went quiet: judged as the look's,
    # and said.
    early = (
        f"the samples end {at - times[-1]:.0f} s before look {args.look}'s time ({at - window.started:.0f} s into "
        "the stage), longer than any gap between them: judged as that look's poke read them (clients gone quiet); "
        "if a poke before that time exported them, it judged no look on them"
        if at - times[-1] > max(poke_interval(spec), np.diff(times).max(initial=0.0))
        else ""
    )
    source = PrometheusSource(args.prometheus) if args.prometheus else None
    # (as the look's poke read them: at its time, the flush interval then)
    read = guard_inputs(source, spec, at + settle_time(source, at=at), since=window.started, past=True)
    # Read in part, a guard it read tripped or a look that fails fails, as the DAG's poke fails the
    # stage on them whatever the guards it did not read (judge_stage); anything else rests on those.
    unread = read.unavailable or read.missing
    said = (
        f"the hard guards could not all be read ({unread}): failed as the DAG's poke fails a stage on a guard it "
        "read tripped or a failing look, whatever the others (its reason may name a guard not read here)"
        if unread
        else ""
    )
    warned = "; ".join(w for w in (early, unlabelled) if w)  # (said with nothing judged too)
    early = "; ".join(w for w in (warned, said) if w)
    guards = stage_guards(read, samples, images)  # (on all the samples the poke read, as judge_stage's)
    if breach := tripped(guards, config):
        checks = tuple(guard_checks(guards, config))
        return Verdict("fail", checks, 0, spec.looks_per_stage, config.alpha, 0.0, config.spending, breach), early
    samples = _labels_before(samples[samples["time"] < at], at)
    seen = _information(args.information or "", args.look, samples, window.latency_from)
    verdict = look_verdict(spec, window, args.look, at, samples, config, guards, images, seen)
    if unread and verdict.decision != "fail":
        # (exit 4 either way, a server that could not be used: a URL to check, or a guard without data)
        why = (
            f"Prometheus cannot be used there ({read.unavailable}): a mistyped URL, or Prometheus down"
            if read.unavailable
            else f"Prometheus answers there but a guard has no data ({read.missing}): is it the DAG's Prometheus?"
        )
        raise CommandError(
            f"--prometheus {args.prometheus}: the hard guards cannot be read, {why}; nothing judged: look "
            f"{args.look} does not fail on the samples and the guards read ({verdict.decision.upper()} on them), and "
            "whether it passes or trips a guard rests on those not read here (a DAG poke that could not read them "
            "either held the stage)" + (f"; warning: {warned}" if warned else "")
        )
    return verdict, early


def cmd_gate(args: argparse.Namespace) -> int:
    from vision_rollout.gates import GateConfig, check_samples, evaluate_gate
    from vision_rollout.spec import MAX_LOOKS

    spec = None if args.spec is None else _spec(args.spec)
    if spec is not None and args.looks not in (None, spec.looks_per_stage):
        raise UsageError(
            f"--looks {args.looks}: the spec's stages plan {spec.looks_per_stage} looks (its looks_per_stage); "
            "leave --looks out"
        )
    looks = args.looks if args.looks is not None else 1 if spec is None else spec.looks_per_stage
    if not 1 <= looks <= MAX_LOOKS:
        raise UsageError(f"--looks takes 1 to {MAX_LOOKS}, not {looks}")
    if not 1 <= args.look <= looks:
        raise UsageError(f"--look takes 1 to --looks ({looks}), not {args.look}")
    window = _stage_window(spec, args.stage, args.latency_from)
    latency_from = args.latency_from if window is None else window.latency_from
    images = _replay_images(args.replay_images, window, args.stage)
    if window is not None and args.look > 1 and args.information is None:
        raise UsageError(
            f"--stage {args.stage} --look {args.look}: give --information, the information of looks 1 to "
            f"{args.look - 1} (the DAG judges a look at the information its looks saw, not at equal increments)"
        )
    level = _level(args.level, window)
    window = _stage_guarded(args, window)
    config = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set takes key=value, not {item!r}")
        config[key] = _value(key, value)
    if spec is not None and level < 1:  # (as the DAG's stage: the spec's alpha times its window's level)
        config["alpha"] = float(config.get("alpha", spec.alpha)) * level
    samples = _read_samples(args.samples)
    if samples.empty:  # (no evidence at all: no look, with --stage or without)
        raise UsageError(
            f"--samples {args.samples}: no samples (its columns alone): a poke that read none judged no look"
        )
    unguarded = _UNGUARDED if args.no_hard_guards else ""
    if unguarded:
        print(f"rolloutctl gate: warning: no Prometheus{unguarded}", file=sys.stderr, flush=True)
    early = ""
    try:
        check_samples(samples)  # (before --information counts this look's)
        _latency_source(latency_from, samples)
        paired = int(samples["pair_id"].nunique()) if "pair_id" in samples.columns else 0
        if images and paired > images:  # (the DAG's pair each image of its validation set)
            raise UsageError(
                f"--replay-images {images}: the samples hold {paired} validation images (pair_id), more than a "
                f"round's {images}"
            )
        cfg = config if spec is None else GateConfig.from_spec(spec, **config)
        if window is None or spec is None:
            seen = (
                None if args.information is None else _information(args.information, args.look, samples, latency_from)
            )
            verdict = evaluate_gate(
                samples, cfg, args.look, looks, latency_from=latency_from, replay_images=images, information=seen
            )
        else:
            verdict, early = _stage_look(args, spec, window, cfg, samples, images)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if early:
        print(f"rolloutctl gate: warning: {early}", file=sys.stderr, flush=True)
    if args.json:  # (--no-hard-guards: the guards not judged said on stdout too, as on the verdict's line)
        said = {"unguarded": unguarded.strip(" ()")} if unguarded else {}
        print(json.dumps({**verdict.to_dict(), **said, **({"warning": early} if early else {})}, indent=2))
    else:
        print(verdict.summary + unguarded)
        for c in verdict.checks:
            print(f"  [{c.decision:4s}] {c.name}: {c.sentence}")
    return EXIT[verdict.decision]


def cmd_audit(args: argparse.Namespace) -> int:
    from vision_rollout.audit import (
        CHART,
        MAX_AUDIT_S,
        REPORT,
        audit,
        await_copies,
        report_files,
        with_coverage,
        write_report,
    )

    end = datetime.now(UTC)
    since = _since(args.since)
    budget = MAX_AUDIT_S if args.budget_s is None else args.budget_s
    if not 0 <= budget <= MAX_AUDIT_BUDGET_S:
        raise UsageError(f"--budget-s: 0 to {MAX_AUDIT_BUDGET_S:g} seconds, not {budget:g}")
    if args.mirror_percent is not None and not 0 <= args.mirror_percent <= 100:
        raise UsageError(f"--mirror-percent: 0 to 100, not {args.mirror_percent:g}")
    # A report already in --out: a SKIP's report.md was written beside the earlier audit's chart
    # and anomalies, which a reviewer took for this one's. Refused, or with --overwrite replaced
    # whole (the earlier report's files this one does not have removed, on this machine's disk).
    names = {REPORT, CHART, "summary.json", "confusion.csv", "anomalies.csv"}
    # pyarrow's ArrowInvalid (a ValueError): an object store URI it does not read, such as one
    # without a bucket or with a misspelt option ("regoin=").
    from pyarrow import ArrowInvalid

    if args.out and args.out.path is not None and args.out.path.exists() and not args.out.path.is_dir():
        raise UsageError(f"--out {args.out}: not a folder")  # (else found once the log was read whole)
    try:
        present = {n for n in names if args.out.exists(n)} if args.out else set()  # (a look each: no listing)
    except ArrowInvalid as exc:
        raise UsageError(f"--out {args.out}: not a folder: {exc}") from None
    except OSError as exc:
        raise CommandError(f"--out {args.out} cannot be listed: {exc}") from None
    if present and not args.overwrite:
        raise UsageError(f"--out {args.out} holds a report already: give a new folder, or --overwrite to replace it")
    try:
        # (the copies of the last flush interval's primaries, in the writers' buffers still: waited
        # for, as the rollout's audit does, those the server's own mirror said it sampled)
        await_copies(args.prediction_log, end, args.model, None)
        result = audit(
            args.prediction_log, end - since, end, args.model, max_seconds=budget, mirror_percent=args.mirror_percent
        )
    except ArrowInvalid as exc:
        raise UsageError(f"--prediction-log: not a prediction log: {exc}") from None
    except OSError as exc:  # (pyarrow's errors reading an object store are OSErrors)
        raise CommandError(f"the prediction log cannot be read: {exc}") from None
    result = with_coverage(result, args.mirror_percent)
    if args.out:
        files = report_files(result)
        try:
            if args.out.path is not None:
                for name in sorted(present - set(files)):
                    (args.out.path / name).unlink(missing_ok=True)
            where = write_report(files, args.out)
        except OSError as exc:
            raise CommandError(f"the report cannot be written to {args.out}: {exc}") from None
        print(f"report: {where[REPORT]}", file=sys.stderr)
    if result.out_of_time:
        print(
            f"the audit's reads ran out of their {budget:g} s (--budget-s) before the log's files of the range "
            "were all read: give a larger --budget-s, or a shorter --since",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print(f"{result.verdict.upper()}: " + "; ".join(result.reasons))
    return EXIT[result.verdict]


def cmd_mesh(args: argparse.Namespace) -> int:
    import yaml

    from vision_rollout.locks import FileLock, LeaseLock
    from vision_rollout.mesh import (
        IstioRouter,
        IstioTarget,
        LocalRouter,
        RouterError,
        kube_api_client,
        render_destination_rule,
        render_virtual_service,
        validate_istio,
    )
    from vision_rollout.settings import ServingSettings

    if args.action == "get":
        if args.backend != "local" or not (args.url and args.model):
            raise UsageError("mesh get reads the model server's router: --backend local --url URL --model M")
        try:
            routes = LocalRouter(args.url, args.model, _token(args.token_file)).get_routes()
        except RouterError as exc:
            raise CommandError(str(exc)) from None
        print(json.dumps(routes.to_dict(), indent=2))
        return 0
    if args.policy is None:
        raise UsageError(f"mesh {args.action} needs --policy FILE")
    policy = _policy(args.policy)
    if args.backend == "istio":
        if not (args.namespace and args.service and args.name):
            raise UsageError("--backend istio needs --namespace, --service and --name")
        versions = _versions(args.versions, policy) if args.versions else sorted(policy.versions(), key=int)
        try:
            target = IstioTarget(
                args.namespace,
                args.service,
                args.name,
                gateways=args.gateways,
                hosts=args.hosts,
                root_namespace=args.root_namespace,
                cluster_domain=args.cluster_domain,
            )
            if args.action == "render":
                objs = [render_destination_rule(target, versions), render_virtual_service(target, policy, versions)]
                for o in objs:
                    validate_istio(o)
                print(yaml.safe_dump_all(objs, sort_keys=False), end="")
                return 0
        except RouterError as exc:  # what Istio's schema refuses: the arguments' fault
            raise UsageError(str(exc)) from None
        try:
            api_client = kube_api_client()
        except RouterError as exc:
            raise CommandError(str(exc)) from None
        # The DAG's Lease in kubernetes mode: rollout-<VirtualService> in its namespace.
        _not_held(args, LeaseLock(args.model or args.name, args.namespace, api_client, key=args.name))
        router: Any = IstioRouter(target, versions, api_client=api_client, mirrors=_mirror_log(args))
        if router.mirrors is None:
            _unrecorded_mirror(router, policy)
    else:
        if args.action == "render":
            print(json.dumps(policy.to_dict(), indent=2))
            return 0
        if not (args.url and args.model):
            raise UsageError("--backend local needs --url and --model")
        router = LocalRouter(args.url, args.model, _token(args.token_file))
        folder = args.lock_dir or Path(ServingSettings().run_dir) / "locks"
        if folder.is_dir():
            _not_held(args, FileLock(args.model, folder))
    try:
        changed = router.set_routes(policy)
    except RouterError as exc:  # (no answer from the API server too: ApiUnreachable)
        raise CommandError(str(exc)) from None
    print("applied" if changed else "unchanged: already in effect")
    return 0


def _mirror_log(args: argparse.Namespace) -> Any:
    """Where ``mesh apply --backend istio`` records a mirror change: ``--run-dir``'s
    ``mirrors/<--model, else --name>/``, as the DAG's router does (the hourly audit judges the
    copies of each hour at the share recorded there); None without ``--run-dir``."""
    from vision_rollout.mirrors import mirror_log

    if args.run_dir is None:
        return None
    _found("--run-dir", args.run_dir)
    try:
        model = _model(args.model or args.name)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"--model (the model the mirror is recorded for; default --name): {exc}") from None
    return mirror_log(args.run_dir, model)


def _unrecorded_mirror(router: Any, policy: Any) -> None:
    """UsageError when ``policy`` changes the mirror of the VirtualService (or mirrors, and the
    VirtualService's mirror cannot be read: the apply then says why) and no ``--run-dir`` says
    where to record it: the hourly audit would judge the copies at the share recorded before,
    not the one applied."""
    from vision_rollout.mesh import RouterError

    def said(mirror: Any) -> str:
        return "none" if mirror is None else f"{mirror.percent:g}% to version {mirror.version}"

    try:
        live = said(router.get_routes().mirror)
    except RouterError as exc:
        if policy.mirror is None:
            return
        live = f"not known: {_one_line(str(exc))[:200]}"
    if live != said(policy.mirror):
        raise UsageError(
            f"the policy changes the mirror ({live}, now {said(policy.mirror)}): give --run-dir, the connection's "
            "run_dir, where the change is recorded (mirrors/<model>/) for the hourly shadow audit, which judges the "
            "copies at the share recorded there; nothing changed"
        )


def _not_held(args: argparse.Namespace, lock: Any) -> None:
    """``mesh apply`` refused while a rollout holds the model's ``lock`` (``--backend local``: the
    lock file under ``--lock-dir``, else the DAGs' default run folder's ``locks/`` where it
    exists; ``--backend istio``: the DAG's Lease ``rollout-<--name>`` in ``--namespace``): the
    run's next stage, or its rollback, writes its own routes over these (or, in kubernetes
    mode, takes them for a mesh changed under it and rolls back), as ``kubectl argo rollouts``
    refuses edits of a rollout in progress. ``--force`` applies them all the same, saying whose
    run holds it. The Lease's read failed by the API server (its 429, 500, 502, 503 or 504 once
    the client's retries are spent) is said to be that, to be tried again, ``--force`` not
    offered: unlike an unreadable lock, it says nothing of the rollout that may hold it."""
    from vision_rollout.locks import LockError
    from vision_rollout.mesh import MAYBE_SERVED, UNSERVED, ApiUnreachable

    model = args.model or args.name
    try:
        held = lock.holding()
    except ApiUnreachable as exc:  # nothing known: --force would not reach the routes either
        raise CommandError(f"{exc}; nothing changed") from None
    except LockError as exc:  # (an unreadable lock file or Lease: whose run is not known)
        if exc.status in UNSERVED | MAYBE_SERVED and not args.force:
            raise CommandError(
                f"{exc}: the API server failed to read the Lease (a transient failure): try again; nothing changed"
            ) from None
        if not args.force:
            raise CommandError(f"{exc}, or give --force; nothing changed") from None
        print(f"rolloutctl mesh: warning: --force: {_one_line(str(exc))}", file=sys.stderr, flush=True)
        return
    if held is None or not held.holder or held.expired(lock.clock()):
        return
    then = (
        f"it is marked aborted ({_one_line(held.aborted)}) and writes the stable version's routes at its next look: "
        "wait until it has ended (rolloutctl status)"
        if held.aborted
        else "its next stage (or its rollback) writes its own routes over these: abort it first (rolloutctl abort)"
    )
    holding = f"{held.describe()} holds model {model!r} ({lock.where}): {then}"
    if not args.force:
        raise CommandError(f"{holding}, or give --force; nothing changed")
    print(f"rolloutctl mesh: warning: --force: {_one_line(holding)}", file=sys.stderr, flush=True)


def _versions(text: str, policy: Any) -> list[str]:
    """``--versions``: the DestinationRule's subsets, each a version number, every version the
    policy routes or mirrors to among them (else its routes name a subset that does not exist:
    Envoy answers 503 for that share)."""
    from model_server.config import INT64_MAX

    versions = [v.strip() for v in text.split(",")]
    bad = [v for v in versions if not re.fullmatch(r"[1-9][0-9]{0,18}", v) or int(v) > INT64_MAX]
    if bad:
        raise UsageError(f"--versions takes version numbers, e.g. 1,2, not {text[:80]!r}")
    missing = sorted(set(policy.versions()) - set(versions), key=int)
    if missing:
        raise UsageError(
            f"--versions {text[:80]}: the policy routes to version(s) {', '.join(missing[:10])}, which would have no subset"
        )
    return sorted(set(versions), key=int)


def cmd_verify(args: argparse.Namespace) -> int:
    from vision_rollout.images import verify_model

    model_dir = args.model_dir
    if model_dir is not None and not model_dir.is_dir():
        raise UsageError(f"--model-dir {model_dir}: no such folder")
    validation = model_dir / "validation" if model_dir else None
    report = verify_model(args.path, args.baseline, model_dir, validation)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        status = "OK" if report.ok else "FAILED"
        print(f"{status}: {report.path} sha256 {report.sha256[:16]} ({report.size_bytes} bytes) on {report.provider}")
        if report.golden_accuracy is not None:
            print(
                f"  golden inference on {report.golden_images} validation images: accuracy {report.golden_accuracy:.4f}"
                + (
                    f", agreement with baseline {report.baseline_agreement:.4f}"
                    if report.baseline_agreement is not None
                    else ""
                )
            )
        if report.batch_checked:
            print(f"  ran at a batch of {report.batch_checked}")
        for p in report.problems:
            print(f"  problem: {p}")
        skipped = [
            flag
            for flag, given in (
                ("--model-dir (config, golden inference)", model_dir),
                ("--baseline (signature)", args.baseline),
            )
            if given is None
        ]
        if skipped:
            print(f"  not checked: no {' nor '.join(skipped)}")
    return 0 if report.ok else 1


# ``_signals_held``'s nesting, the first signal held back within it (None: none), and the signal
# that stopped the run (``_stopped_by_signals``; None: none yet).
_HELD: dict[str, Any] = {"depth": 0, "pending": None, "received": None}


@contextmanager
def _signals_held() -> Iterator[None]:
    """The first signal ``_stopped_by_signals`` turns into ``Interrupted`` held back within (a
    report being written to the outbox: whole, not cut mid-way), raised once it is left. Only in
    the main thread, where the handler runs and raises (elsewhere nothing is held, as
    ``_stopped_by_signals`` installs nothing: a worker's writing held the main thread's signal)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _HELD["depth"] += 1
    try:
        yield
    finally:
        _HELD["depth"] -= 1
        if not _HELD["depth"] and (signum := _HELD["pending"]) is not None:
            _HELD["pending"] = None
            raise Interrupted(signum)


@contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP (unless ignored) raise ``Interrupted`` once, where the rollout
    is, so that it puts the stable version back before the process ends: a CI job cancelled
    (SIGTERM) used to kill it at once, the canary left mid-stage with the mirror on. A second
    signal does not cut the restore short; it is told to wait. (Outside the main thread, as in
    a test's worker thread, nothing is installed.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _HELD["received"] = None

    def handler(signum: int, frame: Any) -> None:
        if _HELD["received"] is not None:
            print("rolloutctl run: putting the stable version back; wait for it", file=sys.stderr, flush=True)
            return
        _HELD["received"] = signum
        if _HELD["depth"]:  # (a report being written: raised once it is, ``_signals_held``)
            _HELD["pending"] = signum
            return
        # A signal during the replay lands in gevent's hub, which printed a traceback before
        # passing it on: quietly, where gevent is in use (not while it is being imported).
        get_hub = getattr(sys.modules.get("gevent"), "get_hub", None)
        with suppress(Exception):
            if get_hub is not None:
                hub = get_hub()
                hub.NOT_ERROR = (*hub.NOT_ERROR, Interrupted)
        raise Interrupted(signum)

    # A signal ignored when the process started stays ignored: SIGHUP under nohup, SIGINT in a
    # script's background job (the terminal's Ctrl-C is not for it).
    before = {
        sig: old
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        if (old := signal.getsignal(sig)) != signal.SIG_IGN
    }
    for sig in before:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in before.items():
            # Once stopped, a late signal (a second kill) would end the process by default with
            # its own code before the first one's is returned: ignored instead.
            signal.signal(sig, signal.SIG_IGN if _HELD["received"] is not None else old)
        _HELD["received"] = None


def _where_routes_are(router: Any, spec: Any) -> str:
    """What serves now, read back, for the last line of a rollout that did not end by itself."""
    from vision_rollout.mesh import RouterError

    try:
        routes = router.get_routes()
    except RouterError as exc:
        return f"the routes cannot be read back ({exc}): check that version {spec.baseline_version} takes 100%"
    if routes == spec.stable_policy():
        return f"version {spec.baseline_version} takes 100% again"
    if routes == spec.promoted_policy():  # (a signal while promoting: the decision is carried out)
        return f"version {spec.candidate_version} takes 100%: its promotion was decided"
    return f"the routes are NOT back to version {spec.baseline_version}: {json.dumps(routes.to_dict())}"


def _preflight(args: argparse.Namespace, spec: Any, router: Any, source: Any) -> tuple[dict[str, int], str]:
    """What a rollout needs, checked before any route changes (the DAG's build_image checks the
    same before its first stage): the validation set, the model server with both versions
    loaded and the baseline alone serving (no rollout in progress: two runs at once each drove
    the routes and both said PROMOTED), serving the candidate from the bytes ``--sha256`` names
    (``rolloutctl verify-model``'s), and Prometheus answering (a mistyped URL held the first
    stage, the canary taking its share, until max_stage_seconds). The validation labels, and
    the sha256 of the candidate the rollout judges (``--sha256``, else the one served now)."""
    from vision_rollout.engine import validation_labels
    from vision_rollout.mesh import RouterError, not_steady
    from vision_rollout.metrics import MetricsError
    from vision_rollout.serving import AdminError, not_as_verified

    try:
        labels = validation_labels(args.validation)
    except OSError as exc:
        raise UsageError(f"--validation {args.validation}: {exc.strerror or exc}: {exc.filename}") from None
    except ValueError as exc:
        raise UsageError(f"--validation {args.validation}: {exc}") from None
    if not labels:
        raise UsageError(f"--validation {args.validation}: labels.csv names no image")
    _stores_answer(args)
    try:
        problem = not_steady(router.get_routes(), spec.baseline_version)
        if problem:
            raise CommandError(f"not where a rollout starts, nothing changed: {problem}")
        for version in (spec.baseline_version, spec.candidate_version):
            if not router.admin.ready(spec.model, version):
                versions = sorted({int(spec.baseline_version), int(spec.candidate_version)})
                load = {"parameters": {"config": json.dumps({"version_policy": {"specific": {"versions": versions}}})}}
                raise CommandError(
                    f"version {version} of '{spec.model}' is not loaded on the model server, nothing changed: "
                    f"load it beside version {spec.baseline_version} first: POST /v2/repository/models/{spec.model}"
                    f"/load with {json.dumps(load)} and the admin token (tritonclient's load_model)"
                )
        verified = args.sha256 or router.admin.served_sha256(spec.model, spec.candidate_version)
        if changed := not_as_verified(router.admin, spec.model, spec.candidate_version, verified):
            raise CommandError(f"not where a rollout starts, nothing changed: {changed} (--sha256)")
    except (RouterError, AdminError) as exc:
        raise CommandError(f"nothing changed: {exc}") from None
    if source is not None:
        try:
            source.scrape_interval_s()
        except MetricsError as exc:
            raise CommandError(f"Prometheus cannot be read, nothing changed: {exc}") from None
    return labels, verified


def _stores_answer(args: argparse.Namespace) -> None:
    """The object stores of ``--prediction-log`` and ``--outbox`` answer and hold their buckets:
    a mistyped bucket was an empty prediction log, the first stage waiting for records, the
    canary taking its share, until max_stage_seconds; for the outbox every report was lost."""
    from pyarrow import ArrowInvalid

    from vision_rollout.folders import Folder

    for flag, folder in (("--prediction-log", Folder(args.prediction_log)), ("--outbox", args.outbox)):
        if folder is None:
            continue
        if flag == "--outbox" and folder.path is not None:  # (made at its first report: where it can be)
            found = next(p for p in (folder.path.absolute(), *folder.path.absolute().parents) if p.exists())
            if not found.is_dir():
                raise UsageError(f"{flag} {folder}: {found} is not a folder")
        try:
            folder.check()
        except ArrowInvalid as exc:
            raise UsageError(f"{flag} {folder}: not a folder: {exc}") from None
        except OSError as exc:
            raise CommandError(f"{flag} {folder} cannot be read, nothing changed: {exc}") from None


class _Lease:
    """The model's lock under ``--lock-dir`` (local mode's DAG keeps it in ``<run folder>/locks``):
    taken before the start checks, renewed at every look, released at the end; a lease taken
    over from a run that did not end goes back to it as it was when this run touched nothing.
    Without ``--lock-dir``, nothing is held."""

    def __init__(self, folder: Path | None, model: str) -> None:
        from vision_rollout.locks import FileLock

        self.lock = FileLock(model, folder) if folder is not None else None
        # A name of this run's own: containers sharing the host's network share its host name,
        # and each may run rolloutctl as its pid 1 (the lease takes its holder's retry as its own).
        self.holder = f"rolloutctl on {socket.gethostname()} (pid {os.getpid()}, {uuid.uuid4().hex[:12]})"
        self.before: Any = None
        self.touched = False

    def __enter__(self) -> _Lease:
        from vision_rollout.locks import ModelBusy

        if self.lock is not None:
            try:
                self.before = self.lock.holding()
                self.lock.acquire(self.holder)
            except ModelBusy as exc:
                raise CommandError(f"nothing changed: {exc}") from None
            except OSError as exc:  # (a folder that cannot be made or written: nothing was taken)
                raise CommandError(
                    f"--lock-dir {self.lock.path.parent}: the model's lock cannot be taken: "
                    f"{exc.strerror or exc}; nothing changed"
                ) from None
            except Interrupted:  # perhaps once taken: given back (only this run's holding is)
                self.lock.release(self.holder, to=self.before)
                raise
        return self

    def renew(self, note: str | None = None, seconds: int | None = None) -> None:
        """Renewed, with ``note`` (``rolloutctl status`` shows it), for ``seconds`` (``LEASE_S``
        where None); Aborted when the rollout was
        aborted (``rolloutctl abort``), or when nobody holds the lock any more (its file or
        folder removed): it rolls back, no other run's routes being at stake (a run starting
        meanwhile finds this one's routes and touches nothing). LockLost when another run holds it."""
        from vision_rollout.locks import LEASE_S, Aborted, LockLost

        if self.lock is None:
            return
        try:
            held = self.lock.renew(self.holder, LEASE_S if seconds is None else seconds, note=note)
        except LockLost:
            if self.lock.holding() is None:
                raise Aborted(f"aborted: the model's lock {self.lock.where} is gone, nobody holds it") from None
            raise
        if held.aborted:
            raise Aborted(f"aborted: {held.aborted}")

    def __exit__(self, *exc: Any) -> None:
        if self.lock is not None:
            self.lock.release(self.holder, to=None if self.touched else self.before)


_PROGRESS_EVERY_S = 60.0  # run's progress line during a stage, at most this often
# The chart of the report of a run cut short by an abort or an error is drawn within this, or the
# report goes without it. After a signal it is not drawn: a supervisor's kill follows its signal
# (docker stop's 10 s after, Kubernetes' 30 s), and the report is written at once.
_CUT_SHORT_CHART_S = 10.0
_SIGNALLED = "not drawn: a signal stopped the run"


def cmd_run(args: argparse.Namespace) -> int:
    from vision_rollout.mesh import LocalRouter
    from vision_rollout.metrics import PrometheusSource

    spec = _spec(args.spec)
    if spec.mesh != "local":
        raise UsageError("rolloutctl run drives the model server's router (mesh: local); Istio runs from Airflow")
    if not args.prometheus and not args.no_hard_guards:
        raise UsageError(
            "the P99, shadow-error and restart guards read Prometheus: give --prometheus URL, or --no-hard-guards "
            "to roll out guarded by the replay's accuracy drop only"
        )
    if args.url.startswith("https://"):
        raise UsageError("--url: the validation replay speaks plain HTTP to the model server: give its http:// address")
    token = _token(args.token_file)
    unguarded = "" if args.prometheus else _UNGUARDED
    router = LocalRouter(args.url, spec.model, token, args.state_file)
    source = PrometheusSource(args.prometheus) if args.prometheus else None
    with _stopped_by_signals(), _Lease(args.lock_dir, spec.model) as lease:
        try:
            labels, verified = _preflight(args, spec, router, source)
        except Interrupted as exc:
            print(f"INTERRUPTED by {exc} before any route changed", flush=True)
            return 128 + exc.signum
        lease.touched = True
        return _run(args, spec, router, source, labels, lease, unguarded, verified, token)


def _run(
    args: argparse.Namespace,
    spec: Any,
    router: Any,
    source: Any,
    labels: dict[str, int],
    lease: _Lease,
    unguarded: str,
    verified: str | None = None,
    token: str | None = None,
) -> int:
    """``cmd_run`` once its start checks passed, the model held and signals caught. ``verified``:
    the candidate's sha256, which the model server must serve before each stage, at each look
    and before the promotion (``serving.not_as_verified``), as in the DAG; ``token``: the admin
    token, which the stage's check of where the server writes its log asks with."""
    from vision_rollout.engine import (
        Rollout,
        StageJudge,
        StageOutcome,
        StageState,
        mirrors_candidate,
        preflight,
        rollout_audit,
        rollout_audit_s,
    )
    from vision_rollout.folders import Folder
    from vision_rollout.locks import LEASE_S, Aborted
    from vision_rollout.notify import (
        Message,
        SlackNotifier,
        charted,
        plain_report,
        promotion_message,
        rollback_message,
        stage_message,
        undrawn,
    )
    from vision_rollout.serving import not_as_verified

    if unguarded:
        print(f"rolloutctl run: warning: no Prometheus{unguarded}", file=sys.stderr, flush=True)
    notes = preflight(spec, len(labels))
    for note in notes:
        print(f"rolloutctl run: warning: pre-flight: {note}", file=sys.stderr, flush=True)
    # The stages' reads kept between pokes on this machine's disk (one process pokes them all),
    # gone with the process.
    cache = Folder(tempfile.mkdtemp(prefix="rolloutctl-logcache-"))
    atexit.register(shutil.rmtree, str(cache), True)
    judge = StageJudge(
        spec,
        args.url.split("://", 1)[-1],
        args.validation,
        args.prediction_log,
        source,
        _labels=labels,
        cache=cache,
        token=token,
    )

    said: dict[int, str] = {}  # stage -> its last state, for the lease's note
    # stage -> the evidence time of its last look (its window's start, the look's ``until``): the
    # final report's chart, as the DAG's wait keeps it in its verdict's ``bake``
    bakes: dict[int, dict[str, Any]] = {}
    shown: dict[int, float] = {}  # stage -> when a line last said how it goes (monotonic)
    stages_ended: list[StageOutcome] = []  # for the report of a run cut short

    def kept(outcomes: list[StageOutcome]) -> list[dict[str, Any] | None]:
        """The stages' verdicts as the DAG keeps them (``steps.stage_verdicts``), each with its
        last look's evidence time (``bake``) for the report's chart; None for a stage without one."""
        verdicts = [
            None if o.verdict is None else {**o.verdict.to_dict(), "bake": bakes.get(i)} for i, o in enumerate(outcomes)
        ]
        return verdicts + [None] * (len(spec.stages) - len(verdicts))

    def look(window: StageWindow) -> StageState:
        # LockLost: another run took the model over; this one touches nothing more. Aborted:
        # the stable version goes back.
        lease.renew(said.get(window.index, f"stage {window.weight}%: started"))
        if window.index not in shown:
            shown[window.index] = time.monotonic()
            print(
                f"stage {window.weight}%: started: bakes {spec.bake_seconds} s (at most {spec.max_stage_seconds} s), "
                f"{spec.looks_per_stage} look(s)",
                flush=True,
            )
        state = judge(window)
        bakes[window.index] = {"window": window.started, "until": state.until}
        said[window.index] = f"stage {window.weight}%: look {state.look} of {state.looks}: {state.reason}"
        if not state.done and time.monotonic() - shown[window.index] >= _PROGRESS_EVERY_S:
            shown[window.index] = time.monotonic()
            arms = ", ".join(
                f"{'candidate' if arm == 'canary' else arm} {sum(state.served.get(arm, {}).values())}"
                for arm in ("baseline", "canary")
            )
            print(
                f"stage {window.weight}%: look {state.look} of {state.looks}, requests {arms}: {_one_line(state.reason)}",
                flush=True,
            )
        return state

    notifier = SlackNotifier(spec.slack_channel, outbox=args.outbox) if args.outbox else None

    def send(message: Message) -> bool:
        """To the outbox, when there is one; whether it was written (nothing to write without
        one). One that cannot be written is a warning: the rollout and its exit code go by the
        evidence, not by the outbox's store."""
        if notifier is None:
            return True
        try:
            notifier.send(message)
        except Exception as exc:
            log.warning("a report was not written to the outbox (%s): %s", message.text[:200], _message(exc))
            return False
        return True

    def report(outcome: StageOutcome) -> None:
        stages_ended.append(outcome)
        line = (
            f"stage {outcome.weight}%: {outcome.decision} after {outcome.looks} look(s), {outcome.seconds:.0f} s: "
            f"{outcome.reason}"
        )
        print(line, flush=True)
        lease.renew(line)
        if outcome.verdict is not None:
            send(stage_message(spec, outcome.weight, outcome.verdict))

    def shadow_audit(start: float, end: float) -> Any:
        """The DAG's shadow_consistency: the rollout's records, the spec's limits and mirror share;
        the model this run's over its wait for the copies and its reads (``rollout_audit_s``), and
        for a lease's time beyond, as the DAG's step holds it."""
        lease.renew("shadow audit: waiting for the last copies, then reading the log", LEASE_S + rollout_audit_s())
        result = rollout_audit(
            args.prediction_log,
            datetime.fromtimestamp(start, UTC),
            datetime.fromtimestamp(end, UTC),
            spec,
            mirrors_candidate(spec, router),
        )
        print(f"shadow audit: {result.verdict.upper()}: " + "; ".join(result.reasons), flush=True)
        return result

    def cut_short(why: str, signalled: bool = False) -> str:
        """What serves now, read back; reported (``why`` and that) when there is an outbox: at
        once after a signal (``signalled``), or a first one while its chart is drawn, its chart
        not drawn; the run ending as it was (an abort's exit, an error raised)."""
        where = _where_routes_are(router, spec)
        stopped, restored = f"{why}; {where}", where.startswith(f"version {spec.baseline_version} takes 100%")
        promoted = where.startswith(f"version {spec.candidate_version} takes 100%")
        message = (
            plain_report(spec, "promote", stopped) if promoted else rollback_message(spec, stopped, restored=restored)
        )
        sent = False
        try:
            if notifier is not None:  # (the chart, as the DAG's teardown's report has it: at once where not restored)
                verdicts = kept(stages_ended)
                if not (promoted or restored):
                    message = undrawn(message, spec, verdicts)
                elif signalled:
                    message = undrawn(message, spec, verdicts, _SIGNALLED)
                else:
                    message = charted(
                        message, spec, verdicts, args.prediction_log, args.validation, budget_s=_CUT_SHORT_CHART_S
                    )
            with _signals_held():  # (written whole: a signal meanwhile is raised once it is)
                send(message)
                sent = True
        except (
            Interrupted
        ) as exc:  # (a first signal while drawn or written: the report at once, the run's end as it is)
            print(f"rolloutctl run: stopped by {exc} while its report was made", file=sys.stderr)
            if not sent:
                send(message if notifier is None else undrawn(message, spec, kept(stages_ended), _SIGNALLED))
        return where

    def changed() -> str | None:
        if verified is None:
            return None
        return not_as_verified(router.admin, spec.model, spec.candidate_version, verified)

    rollout = Rollout(spec, router, look, on_stage=report, audit=shadow_audit, changed=changed)
    state_file = getattr(args, "state_file", None)
    try:  # an earlier run's record: the router records the routes this run finds (it keeps a record there)
        if state_file is not None:
            state_file.unlink(missing_ok=True)
    except OSError as exc:
        raise CommandError(f"--state-file {state_file}: {exc.strerror or exc}; nothing changed") from None
    try:
        lease.renew("started")  # aborted during the start checks: no stage begins
        result = rollout.run()
    except Interrupted as exc:
        where = cut_short(f"rolloutctl run was stopped by {exc}", signalled=True)
        print(f"INTERRUPTED by {exc}: {where}", flush=True)
        return 128 + exc.signum
    except Aborted as exc:
        where = cut_short(f"rolloutctl run was {exc}")
        print(f"ROLLED BACK: {exc}; {where}", flush=True)
        return 1
    except Exception as exc:
        if (signum := _HELD["received"]) is not None and not isinstance(exc.__context__, Interrupted):
            # The signal landed in the replay's HTTP client (gevent's hub), which came out with
            # the error it left behind (a socket closed under the request: EBADF), not with the
            # signal: the run was stopped by the signal, and the engine put the stable version back.
            name = signal.Signals(signum).name
            print(
                f"rolloutctl run: stopped by {name}, which ended the rollout's step with: {_message(exc)}",
                file=sys.stderr,
            )
            where = cut_short(f"rolloutctl run was stopped by {name}", signalled=True)
            print(f"INTERRUPTED by {name}: {where}", flush=True)
            return 128 + signum
        stopped = " (while stopping for a signal)" if isinstance(exc.__context__, Interrupted) else ""
        ended = f"the rollout failed{stopped}: {_message(exc)}"
        raise CommandError(f"{ended}; {cut_short('rolloutctl run: ' + ended)}") from None
    reported = False
    try:  # (a signal now, once the routes are what the rollout decided: the last line says what serves)
        if result.promoted:
            try:
                lease.renew(f"promoted: {result.reason}")
            except Aborted as exc:  # an abort while promoting put the stable version back: so does this run
                rollout.restore_stable()
                where = cut_short(f"rolloutctl run was {exc} while promoting")
                print(f"ROLLED BACK: {exc} while promoting; {where}", flush=True)
                return 1
        last = result.stages[-1] if result.stages else None
        verdicts = [o.verdict for o in result.stages if o.verdict is not None]
        failed = last if last is not None and last.decision != "pass" else None
        message = (
            promotion_message(spec, verdicts, result.audit, reason=result.reason, notes=notes)
            if result.promoted
            else rollback_message(
                spec,
                result.reason,
                failed.verdict if failed else None,
                failed.weight if failed else None,
                result.audit,
                notes=notes,
            )
        )
        if notifier is not None:  # (the chart of the stage that decided, as the DAG's report has it)
            message = charted(
                message,
                spec,
                kept(result.stages),
                args.prediction_log,
                args.validation,
                decided=failed is not None and not result.promoted,
            )
        with _signals_held():  # (written whole: a signal meanwhile is raised once it is, no second report)
            reported = send(message)  # (not written: a signal now writes the cut-short report)
        print(("PROMOTED: " if result.promoted else "ROLLED BACK: ") + result.reason + unguarded)
        return 0 if result.promoted else 1
    except Interrupted as exc:
        if reported:  # (its report written, or none to write: what serves said, not reported again)
            when = (
                "once its report was written" if notifier else "once it had ended (no --outbox: no report is written)"
            )
            print(f"INTERRUPTED by {exc} {when}: {_where_routes_are(router, spec)}", flush=True)
            return 128 + exc.signum
        where = cut_short(f"rolloutctl run was stopped by {exc} once it had ended", signalled=True)
        print(f"INTERRUPTED by {exc}: {where}", flush=True)
        return 128 + exc.signum


def cmd_outbox(args: argparse.Namespace) -> int:
    """The reports waiting in an outbox (the DAGs' ``<run_dir>/outbox``, ``run --outbox``): listed,
    or sent to Slack with the bot token of ``--token-file``, each removed once Slack took it. Those
    Slack refused for good (a mistyped channel) are set aside in its ``refused/``: listed with
    Slack's reason, sent again with ``--retry-refused`` (all, or those named), or dropped."""
    from vision_rollout.folders import NotAFile
    from vision_rollout.notify import REFUSED, drop_report, one_line, send_refused, send_waiting, waiting_reports

    if not hasattr(args, "outbox"):
        raise UsageError("the following arguments are required: --outbox")
    _found("--outbox", args.outbox)
    if args.action == "list":
        found = [w.to_dict() for w in waiting_reports(args.outbox)]
        if args.json:
            print(json.dumps(found, indent=2))
        for w in [] if args.json else found:
            why = w.get("problem") or (f"Slack said: {w['slack_error']}" if "slack_error" in w else "no token then")
            if "refused" in w:
                why = f"set aside: Slack refused it: {w['refused']}"
            print(
                f"{_shown(w['name'])}  {one_line(w.get('channel', ''))}  {one_line(w.get('text', ''))[:120]}  ({why})"
            )
        aside = sum(1 for w in found if "refused" in w)
        if not args.json:
            print(
                f"{len(found) - aside} report(s) waiting in {args.outbox}"
                + (f", {aside} set aside ({REFUSED}/)" if aside else "")
            )
        return 0
    if args.action == "drop":
        for name in args.names:
            try:
                print(f"dropped {_shown(drop_report(args.outbox, name))}")
            except (ValueError, FileNotFoundError, NotAFile) as exc:
                raise UsageError(str(exc)) from None
        return 0
    token = _token(args.token_file)
    assert token is not None
    if re.search(r"[^\x21-\x7e]", token):  # (http.client's refusal of such a header quotes it)
        raise UsageError(
            f"--token-file {args.token_file}: the token holds a space, a control character or one beyond ASCII "
            "(a byte-order mark, a typographic quote)"
        )
    from slack_sdk import WebClient

    if not 0 <= args.budget_s <= 3600:
        raise UsageError(f"--budget-s: 0 to 3600, not {args.budget_s:g}")
    client = WebClient(token=token, base_url=args.slack_url or WebClient.BASE_URL)
    held = [n for n in (args.outbox / REFUSED).names() if n.endswith(".json")] if args.retry_refused is not None else []
    named = args.retry_refused or []  # (no name: every report set aside)
    for name in named:
        if name not in held:
            raise UsageError(f"{name}: no report of that name is set aside in {args.outbox / REFUSED}")
    # Slack unreachable: each report waits out its timeout; the round starts none after its budget.
    start = time.monotonic()
    left = f"not started: the round's {args.budget_s:g} s were spent (send again)"
    found = [n for n in args.outbox.names() if n.endswith(".json")]
    results = send_waiting(args.outbox, client, budget_s=args.budget_s)
    tried = {r["name"] for r in results}
    results += [{"name": n, "left": left} for n in found if n not in tried]
    if args.retry_refused is not None:  # (sent where they lie: one Slack does not take now stays set aside)
        wanted = named or held
        rest = max(0.0, args.budget_s - (time.monotonic() - start))
        try:
            again = [{**r, "retried": True} for r in send_refused(args.outbox, client, named, budget_s=rest)]
        except FileNotFoundError as exc:  # (dropped meanwhile)
            raise UsageError(str(exc)) from None
        tried = {r["name"] for r in again}
        results += again + [{"name": n, "left": left, "retried": True} for n in wanted if n not in tried]
    unsent = [r for r in results if "error" in r or "left" in r]
    if unsent:
        aside = sum(1 for r in unsent if r.get("refused") or r.get("retried"))
        why = [f"{len(unsent) - aside} wait in the outbox"] if len(unsent) > aside else []
        why += [f"{aside} set aside in {REFUSED}/"] if aside else []
        failed = CommandError(
            f"{len(unsent)} of {len(results)} report(s) not sent: {', '.join(why)}", {"results": results}
        )
    if args.json:
        if unsent:  # (one object, as every command's error under --json: main prints it)
            raise failed
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            kept = f"left set aside in {REFUSED}/ (send --retry-refused again): " if r.get("retried") else ""
            what = (
                "sent"
                if r.get("sent")
                else f"skipped: {r['skipped']}"
                if "skipped" in r
                else f"{kept or 'left waiting: '}{r['left']}"
                if "left" in r
                else f"refused for good, set aside{' again' if r.get('retried') else ''} in {REFUSED}/: {r['error']}"
                if r.get("refused")
                else f"{kept or 'error: '}{r['error']}"
            )
            print(
                f"{_shown(r['name'])}: {what}"
                + (f" (its chart was not: {r['chart_error']})" if "chart_error" in r else "")
            )
        sent = sum(1 for r in results if r.get("sent"))
        print(f"{sent} of {len(results)} report(s) sent from {args.outbox}")
    if unsent:
        raise failed
    return 0


def _found(flag: str, folder: Any) -> None:
    """A folder the command reads exists: on this disk, else a usage error naming it (a mistyped
    folder read as an empty one); in an object store, its bucket answers (``Folder.check``)."""
    path = folder.path
    if path is not None and not path.is_dir():
        raise UsageError(f"{flag}: {'not a folder' if path.exists() else 'no such folder'}: {str(path)[:200]!r}")
    folder.check()


def _shown(name: str) -> str:
    """A file's name as a line of the terminal shows it: its control characters (a line break,
    a terminal escape) and the bytes no encoding reads as ``\\x..`` escapes, as Python writes them."""
    return ascii(name)[1:-1] if not name.isprintable() or not name.isascii() else name


def _slack_url(text: str) -> str:
    """Slack's Web API base URL, https://host/api/ (default Slack's own). Credentials in it, or a
    query or fragment (where a token goes), are refused without repeating the URL."""
    try:
        parts = urlsplit(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a URL (http(s)://host/api/)") from None
    if "@" in parts.netloc:
        raise argparse.ArgumentTypeError("credentials in the URL are refused (they would be printed): give none")
    if parts.query or parts.fragment:
        raise argparse.ArgumentTypeError("Slack's API base URL, http(s)://host/api/, without a query or fragment")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"not an http(s)://host/api/ URL: {text[:100]!r}")
    _host_name(parts.hostname)
    return text if text.endswith("/") else text + "/"


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _model_lock(args: argparse.Namespace, model: str) -> Any:
    """The model's lock: the file under ``--lock-dir`` (``run``, and the DAG in local mode), or the
    DAG's Lease in kubernetes mode, in ``--namespace``, of the VirtualService ``--name`` (default:
    the model), through the in-cluster service account or the kubeconfig."""
    from vision_rollout.locks import FileLock, LeaseLock
    from vision_rollout.mesh import RouterError, kube_api_client

    if args.lock_dir is not None:
        return FileLock(model, args.lock_dir)
    try:
        return LeaseLock(model, args.namespace, kube_api_client(), key=args.name or model)
    except RouterError as exc:
        raise CommandError(str(exc)) from None


@contextmanager
def _lock_errors(nothing_changed: str = "") -> Iterator[None]:
    """The lock's store failing, as one line (exit 4)."""
    from vision_rollout.locks import LockError
    from vision_rollout.mesh import ApiUnreachable

    try:
        yield
    except (LockError, ApiUnreachable) as exc:  # refused; or no answer from the API server
        raise CommandError(f"{exc}{nothing_changed}") from None


def _holding(lock: Any) -> Any:
    with _lock_errors():
        return lock.holding()


def cmd_status(args: argparse.Namespace) -> int:
    """Who holds the model's lock, until when, its abort mark and last word; with ``--url`` the
    routes in effect as the model server reads them. Exit 0: none; 3: a rollout holds it; 1: a
    lease that expired (a run that did not end: look at the routes); 4 when the routes cannot be
    read (the lock's part is shown all the same: a server down is when it is looked for)."""
    from vision_rollout.locks import CLOCK_SKEW_S
    from vision_rollout.mesh import LocalRouter, RouterError

    lock = _model_lock(args, args.model)
    held = _holding(lock)
    routes, unread = None, None
    if args.url:
        try:
            routes = LocalRouter(args.url, args.model, _token(args.token_file)).get_routes()
        except RouterError as exc:
            unread = str(exc)
    now = lock.clock()
    state = "none" if held is None or not held.holder else "expired" if held.expired(now) else "running"
    if args.json:
        out: dict[str, Any] = {"model": args.model, "lock": lock.where, "state": state, "holding": None}
        if held is not None and held.holder:
            out["holding"] = {
                **{k: v for k, v in held.__dict__.items() if k not in ("renewed", "acquired")},
                **{k: _when(getattr(held, k)) for k in ("acquired", "renewed", "expires")},
                "expires_in_s": round(held.expires - now, 1),
            }
        out["routes"] = routes.to_dict() if routes is not None else None
        if unread:  # (printed with the error, by main)
            raise CommandError(unread, {**out, "routes_error": unread})
        print(json.dumps(out, indent=2))
    else:
        if state == "none":
            print(f"model {args.model!r}: no rollout holds it ({lock.where})")
        else:
            left = (
                "EXPIRED: its run did not end; another run may take the model over"
                if state == "expired"
                else f"{held.expires - now:.0f} s left"
                if held.expires > now
                else f"overdue: taken for dead in {held.expires + CLOCK_SKEW_S - now:.0f} s"
            )
            print(f"model {args.model!r}: held by run {held.holder!r} ({lock.where})")
            print(
                f"  lease: taken {_when(held.acquired)}, renewed {_when(held.renewed)}, runs to "
                f"{_when(held.expires)} ({left})"
            )
            # (as any writer of the lock left them: a Lease's annotations, a note quoting a server)
            if held.aborted:
                print(f"  ABORTED: {_one_line(held.aborted)} (the run puts the stable version back and stops)")
            if held.note:
                print(f"  last: {_one_line(held.note)}")
        if routes is not None or unread:
            print(f"  routes: {_weights(routes) if routes is not None else 'cannot be read'}")
    if unread:
        raise CommandError(unread)
    return {"none": 0, "running": 3, "expired": 1}[state]


def _weights(policy: Any) -> str:
    """A policy in one line: the default route's weights, the mirror, the rules' count."""
    line = ", ".join(f"version {d.version} {d.weight}%" for d in policy.route) or "no route"
    if policy.mirror is not None:
        line += f"; mirror to version {policy.mirror.version} at {policy.mirror.percent:g}%"
    if policy.rules:
        line += f"; {len(policy.rules)} header rule(s)"
    return line


_PERHAPS_MARKED = "the run perhaps marked aborted (rolloutctl status shows it), nothing else changed"


def cmd_abort(args: argparse.Namespace) -> int:
    """The running rollout of the spec's model marked aborted in its lock (its next look finds it
    and rolls back: ``rolloutctl run``, or the DAG's next step, whose teardown restores), then, in
    local mode, the stable version put back as a rollback does (``engine.restore_stable``). The
    lease is left to its holder. Refused, nothing changed, when no rollout holds the model or the
    routes are not what that spec's rollout sets (a wrong spec would put the wrong version back).
    In kubernetes mode (``--namespace``) the mark alone: the DAG run's teardown puts the stable
    version back (its pods first, then the routes), at the run's next step."""
    from vision_rollout.engine import restore_stable
    from vision_rollout.locks import AbortInDoubt, LockError, LockLost
    from vision_rollout.mesh import LocalRouter, RouterError
    from vision_rollout.serving import AdminError

    spec = _spec(args.spec)
    if spec.mesh != ("istio" if args.namespace else "local"):
        raise UsageError(
            f"the spec's mesh is {spec.mesh}: its lock is "
            + ("under --lock-dir (local mode)" if spec.mesh == "local" else "a Lease in --namespace (kubernetes mode)")
        )
    reason = _one_line(args.reason or "") or f"rolloutctl abort by {_operator()}"
    lock = _model_lock(args, spec.model)
    if args.namespace:
        with _lock_errors("; nothing changed"):
            try:
                marked = lock.abort(reason)
            except LockLost as exc:
                raise CommandError(f"nothing to abort, nothing changed: {exc}") from None
            except AbortInDoubt as exc:  # (perhaps marked: not "nothing changed")
                raise CommandError(str(exc)) from None
            except KeyboardInterrupt:  # (perhaps while the mark was written)
                print(f"rolloutctl abort: interrupted: {_PERHAPS_MARKED}", file=sys.stderr)
                return 128 + signal.SIGINT
        print(
            f"ABORTED {'already ' if marked.aborted != reason else ''}({_one_line(marked.aborted)}): run {marked.holder!r} "
            f"rolls back at its next step: its teardown puts version {spec.baseline_version} back"
        )
        return 0
    if not args.url:
        raise UsageError("--lock-dir: give the model server's --url too (the routes go back there)")
    router = LocalRouter(args.url, spec.model, _token(args.token_file))
    held = _holding(lock)
    try:
        routes = router.get_routes()
        if held is None or not held.holder:
            raise CommandError(
                f"no rollout of {spec.model!r} holds {lock.where}: nothing to abort, nothing changed "
                f"(routes: {_weights(routes)})"
            )
        ours = [spec.stable_policy(), *(spec.policy_for_stage(w) for w in spec.stages)]
        if routes not in ours:
            raise CommandError(
                f"the routes are not what this spec's rollout sets ({_weights(routes)}): check --spec (its "
                f"baseline would be put back); nothing changed"
            )
        if not router.admin.ready(spec.model, spec.baseline_version):  # (retired by a promotion)
            raise CommandError(
                f"version {spec.baseline_version} of {spec.model!r} is not loaded: it cannot take the traffic "
                "back; nothing changed"
            )
        marked = lock.abort(reason)
    except LockLost as exc:  # released between the read and the mark: that run has ended
        raise CommandError(f"nothing to abort, nothing changed: {exc}") from None
    except (RouterError, AdminError, LockError) as exc:
        raise CommandError(str(exc)) from None
    except KeyboardInterrupt:  # (perhaps while the mark was written)
        print(f"rolloutctl abort: interrupted before any route was written: {_PERHAPS_MARKED}", file=sys.stderr)
        return 128 + signal.SIGINT
    told = f"run {marked.holder!r} rolls back at its next look (a DAG run: its next step)"
    try:
        restore_stable(spec, router)
        where = _where_routes_are(router, spec)
    except RouterError as exc:  # the mark is set: the run rolls back all the same
        raise CommandError(
            f"aborted ({marked.aborted}): {told}, but version {spec.baseline_version} was not put back: {exc}"
        ) from None
    except KeyboardInterrupt:  # Ctrl-C once marked: the run rolls back all the same
        print(
            f"rolloutctl abort: interrupted once the abort was marked ({_one_line(marked.aborted)}): {told}; "
            f"version {spec.baseline_version} perhaps not put back yet (rolloutctl status --url shows the routes)",
            file=sys.stderr,
        )
        return 128 + signal.SIGINT
    if not where.startswith(f"version {spec.baseline_version} takes 100%"):  # (a write of the run's meanwhile)
        raise CommandError(f"aborted ({marked.aborted}): {told}, but {where}")
    print(f"ABORTED {'already ' if marked.aborted != reason else ''}({_one_line(marked.aborted)}): {told}; {where}")
    return 0


def cmd_restart_stage(args: argparse.Namespace) -> int:
    """A fresh test of a stage of a DAG run asked for, with its reason (``attempts``): the stage's
    next run (its ``apply_mesh_weights`` cleared in Airflow) starts a new attempt, and its report
    says it was restarted and what that costs. Without this, a cleared stage resumes its test, or
    reports the decision its test took. A record that cannot be read is kept aside, whole, and
    the stage tests afresh. Exit 4, nothing changed, for a stage that never started."""
    from vision_rollout import attempts
    from vision_rollout.settings import workdir

    if not 1 <= args.stage <= 100:
        raise UsageError(f"--stage: 1 for the first stage, not {args.stage}")
    reason = attempts.printable(args.reason or "")[:300]  # (who asked kept after it)
    if not reason:
        raise UsageError("--reason: why the stage's test starts afresh (it is in the stage's report)")
    _found("--run-dir", args.run_dir)
    folder = workdir(args.run_dir, args.model, args.run_id)
    try:
        record = attempts.request_restart(folder, args.run_id, args.stage - 1, f"{reason} ({_operator()[:150]})")
    except (ValueError, OSError) as exc:
        raise CommandError(f"{exc}; nothing changed") from None
    n = max(record.tests, 1) + 1
    print(
        f"stage {args.stage} of run {args.run_id!r}: its next run (its apply_mesh_weights cleared; the whole run "
        f"once the run has ended, to take the model's lease again) starts attempt {n}, "
        f"a fresh test at the run's alpha. Reported as restarted: with {n} attempts, a candidate at the margin "
        f"passes one with probability up to 1 - (1 - alpha)^{n} ({100 * attempts.chance(0.05, n):.3g}% at alpha 0.05)"
    )
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """What nobody reads any more in a run folder (the DAGs' ``run_dir``) removed, or with
    ``--dry-run`` listed, as the hourly shadow audit does for the models it audits (never the
    folder of the run holding a model's lock: its lock file, or with ``--namespace`` in
    kubernetes mode its Lease, of the VirtualService ``--name``, default the model): each
    model's audit hour folders older than ``--retention-days`` (``audit.prune_hours``) and its
    mirror changes recorded before then but the one in force (``MirrorLog.prune``), the
    stage caches of stages started days ago (``logcache.prune``), and (``settings.prune_runs``)
    each model's rollout run folders and approval waits' counts unchanged for
    ``--retention-days``, and the outbox's leftovers of killed senders (never a report
    waiting); ``--limit`` of each kind, of the ``--model`` given, else of every model found
    there."""
    import time

    from vision_rollout import logcache
    from vision_rollout.audit import prune_hours
    from vision_rollout.mirrors import mirror_log
    from vision_rollout.settings import (
        MAX_RETENTION_DAYS,
        MIN_RETENTION_DAYS,
        MODEL_PATTERN,
        prune_runs,
        stage_caches,
    )

    if not MIN_RETENTION_DAYS <= args.retention_days <= MAX_RETENTION_DAYS:
        raise UsageError(f"--retention-days: {MIN_RETENTION_DAYS} to {MAX_RETENTION_DAYS}, not {args.retention_days}")
    if not 1 <= args.limit <= 100_000:
        raise UsageError(f"--limit: 1 to 100000, not {args.limit}")
    if args.name is not None and len(args.model or []) != 1:
        raise UsageError("--name: the VirtualService of one --model (its Lease's name); without it, the model's")
    if args.name is not None and args.namespace is None:
        raise UsageError("--name: with --namespace")
    _found("--run-dir", args.run_dir)

    def lease_holder(model: str) -> str | None:
        holding = _model_lock(args, model).holding()
        return holding.holder if holding is not None else None

    found = {m for kind in ("audits", "rollouts", "approvals", "mirrors") for m in (args.run_dir / kind).folders()}
    models = args.model or sorted(m for m in found if len(m) <= 128 and re.fullmatch(MODEL_PATTERN, m))
    now = time.time()
    before = now - args.retention_days * 86400
    hours = datetime.fromtimestamp(before, UTC)
    pruned = {
        "audit hour folders": [
            f"{model}/{name}"
            for model in models
            for name in prune_hours(args.run_dir / "audits" / model, hours, args.limit, args.dry_run)
        ],
        "stage caches": logcache.prune(stage_caches(args.run_dir), args.dry_run),
        **prune_runs(
            args.run_dir, models, before, now, args.limit, args.dry_run, lease_holder if args.namespace else None
        ),
        "mirror changes": [
            f"{model}/{name}"
            for model in models
            for name in mirror_log(args.run_dir, model).prune(before, args.limit, args.dry_run)
        ],
    }
    if args.json:
        print(json.dumps(pruned, indent=2))
        return 0
    for kind, names in pruned.items():
        for name in names:
            print(f"{kind}: {_shown(name)}")
    counts = ", ".join(f"{len(names)} {kind}" for kind, names in pruned.items())
    print(f"{'would remove' if args.dry_run else 'removed'} {counts} from {args.run_dir}")
    return 0


def _operator() -> str:
    try:
        user = os.getlogin()
    except OSError:
        user = os.environ.get("USER", "?")
    return f"{user} on {socket.gethostname()}"


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rolloutctl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log each step (each poke of run), with tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    from vision_rollout.locks import CLOCK_SKEW_S

    g = sub.add_parser("gate", help="judge a canary from samples (CSV or Parquet)")
    g.add_argument(
        "--samples",
        type=Path,
        required=True,
        help="a row per request (.csv or .parquet): arm (baseline or canary), latency_ms, error; optional source "
        "(live or replay), oom, correct, pair_id; with --stage (as engine.stage_samples exports them), "
        f"{', '.join(_STAGE_COLUMNS)} required too, labelled_at optional (when each live label is evidence: "
        "without it every live label is judged, with a warning); a file of columns alone (no evidence at all) is "
        "refused, exit 2",
    )
    g.add_argument(
        "--latency-from",
        metavar="live|replay",
        help="the source whose rows the latency checks and the sample minimum read, as the DAG's stage does "
        "(live below 100%%, replay at 100%%: its verdict's latency sentences say which); errors count every "
        "request; default every row",
    )
    g.add_argument(
        "--spec",
        type=Path,
        help="the rollout's RolloutSpec as JSON (as run's): the gate's config from it (--set overrides a key), "
        "--looks its looks_per_stage",
    )
    g.add_argument(
        "--stage",
        type=int,
        help="judge as the DAG judges this stage of --spec's stages, 1 for the first: latency from its source "
        "(live below 100%%, replay at 100%%); at 100%% after an earlier stage latency reported, not judged; at "
        "its last look (--look = --looks) below 100%%, the next stage below 100%% too, latency left undecided "
        "alone carried there; under its hard guards as the DAG's poke reads them (a breach fails the look, none "
        "judged, as the DAG rolls back): the replay's accuracy drop from the samples, those on Prometheus with "
        "--prometheus (--no-hard-guards: not judged, said); takes --started and --replay-images, and "
        "--information past its first look",
    )
    g.add_argument(
        "--level",
        type=float,
        metavar="L",
        help="with --stage: the share of alpha the stage's window may spend, 0 < L <= 1 (its stage record's "
        "attempt's level: below 1 once its window moved), judged at the spec's alpha times it as the DAG does; "
        "default 1",
    )
    g.add_argument(
        "--replay-images",
        type=int,
        metavar="N",
        help="the images of a validation round, as the DAG's stage replays them (the model's validation set: "
        "the distinct images its labels.csv names; the N of the DAG's 'Validation replay: X of N images'): the "
        "paired accuracy check judges a whole round only (N images paired by both arms) and waits, holding the "
        "gate, until one is in; default none: it judges the pairs given",
    )
    g.add_argument(
        "--started",
        type=float,
        metavar="T",
        help="with --stage: the stage's start, unix seconds (its stage record's window start, its verdict's "
        "bake.window): the samples given, the stage's as a poke read them (time: when each is evidence), are "
        "judged as the DAG's poke that first judged the look: those before its time (look k at T + k bake/K; the "
        "last at the bake's end or once a whole validation round and each arm's min_samples are in, as "
        "engine.final_look_time), their live labels those received before it too (labelled_at, when each "
        "label is evidence, as engine.stage_samples exports it; samples without that column keep every label, with a "
        "warning; a live label without one, or one before --started, is refused), "
        "under the hard guards then; refused when it is in the future (milliseconds?) by "
        f"more than the {CLOCK_SKEW_S} s two machines' clocks may be apart (locks.CLOCK_SKEW_S: it is stamped on "
        "the DAG worker's clock, compared with this machine's; less ahead, it is judged), "
        "when a sample lies before it, or when none lies between it and the look's time (a look whose time is in "
        "the future by more than that skew is refused too: no DAG poke has judged it); samples ending well "
        "before the look's time (clients gone quiet, or read by a poke before it) are judged as the look's, "
        "with a warning",
    )
    gate_guards = g.add_mutually_exclusive_group()
    gate_guards.add_argument(
        "--prometheus",
        type=_url,
        help="with --stage: http://host:port, for the hard guards on Prometheus (P99, shadow errors, restarts) "
        "over the stage to the look's poke; the replay's accuracy drop is judged from the samples; Prometheus "
        "unreadable or without data, even for one guard: a guard it read tripped or a look that fails fails "
        "(exit 1, with a warning saying what could not be read: Prometheus, or the guards without data), as the "
        "DAG's poke fails the stage on them whatever the "
        "others; anything else exit 4, nothing judged (it rests on the guards not read), the error saying which: a "
        "Prometheus that cannot be used there (a mistyped URL, or down), or one answering without data for a guard",
    )
    gate_guards.add_argument(
        "--no-hard-guards",
        action="store_true",
        help="with --stage: judge without Prometheus: no P99, shadow-error or restart guard, only the replay's "
        "accuracy drop (said on stderr and on the verdict's line; with --json, its unguarded field)",
    )
    g.add_argument("--look", type=int, default=1, help="which look this is (default 1)")
    g.add_argument("--looks", type=int, help="looks planned, 1 to 12 (default 1, or --spec's looks_per_stage)")
    g.add_argument(
        "--information",
        metavar="L1/R1/A1,...",
        help="the information of each earlier look, 1 to --look minus 1, per check (the smaller arm's latency "
        "samples/requests/live labels at it, the n of its latency, errors and live accuracy checks): this "
        "look's boundaries as the DAG computes them, at the information seen (this look's counted in "
        "--samples); without it, looks of equal information",
    )
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="gate config, e.g. alpha=0.01")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_gate)
    a = sub.add_parser("audit", help="audit the shadow log over a recent window")
    a.add_argument(
        "--prediction-log",
        "--shadow-log",
        dest="prediction_log",
        required=True,
        type=_log_uri,
        help="the serving processes' prediction log: a folder or s3://bucket/prefix (--shadow-log: its old name)",
    )
    a.add_argument("--since", default="1h", help="how far back: 30m, 1h, 2d (default 1h; at most 3660d)")
    a.add_argument(
        "--model", type=_model, help="the model audited (default: each model of the log apart, the worst verdict)"
    )
    a.add_argument("--out", type=_folder, help="write report.md, CSVs and the PNG here (a folder or s3://...)")
    a.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    a.add_argument(
        "--budget-s",
        type=float,
        help="begin no read of the log after this many seconds: the range is then inconclusive, the files left "
        "named (default 480, the hourly audit's: MAX_AUDIT_S)",
    )
    a.add_argument(
        "--mirror-percent",
        type=float,
        help="the share the mirror copied in the range (0 to 100), as the hourly audit reads it: the copies are "
        "tested against it, the coverage said, and a range without shadow records a WARNING (exit 3), not a SKIP; "
        "without --model it asserts a mirror on every model with traffic (behind Istio, or on a server without a "
        "traffic policy for it, a model nothing mirrors cannot be told from one whose mirror stopped): each such model without shadow records is a WARNING, more requests "
        "than the share's sampling explains; an idle one, or one of a few requests none sampled, a SKIP",
    )
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_audit)
    m = sub.add_parser("mesh", help="render, read or apply a traffic policy")
    m.add_argument("action", choices=["render", "get", "apply"])
    m.add_argument("--backend", choices=["istio", "local"], required=True)
    m.add_argument("--policy", type=Path, help="the policy, JSON (render, apply)")
    m.add_argument("--namespace")
    m.add_argument("--service")
    m.add_argument("--name")
    m.add_argument("--versions", help="subsets to declare, e.g. 1,2 (default: the policy's versions)")
    m.add_argument(
        "--gateways",
        type=_names,
        default=[],
        help="--backend istio: the VirtualService's gateways, e.g. istio-ingress/models,mesh (the connection's "
        "istio.gateways; default: none, the sidecars alone)",
    )
    m.add_argument(
        "--hosts",
        type=_names,
        default=[],
        help="--backend istio: the VirtualService's hosts, e.g. models.example.com (the connection's istio.hosts; "
        "default: the Service's cluster name; apply keeps the live VirtualService's hosts then)",
    )
    m.add_argument(
        "--root-namespace",
        default="istio-system",
        help="apply --backend istio: the mesh's root namespace, where its bucket EnvoyFilter is (default istio-system)",
    )
    m.add_argument(
        "--cluster-domain",
        default="cluster.local",
        help="--backend istio: the cluster's DNS domain, which the Service's host name ends with (default cluster.local)",
    )
    m.add_argument(
        "--run-dir",
        type=_folder,
        help="apply --backend istio: the run folder (the connection's run_dir), where a mirror change is recorded "
        "for the hourly shadow audit (needed for one)",
    )
    m.add_argument("--url", type=_url, help="model server, http://host:port (local backend)")
    m.add_argument("--model", type=_model)
    m.add_argument("--token-file", type=Path)
    m.add_argument(
        "--lock-dir",
        type=_lock_dir,
        help="apply --backend local: the folder of the model's lock (run's --lock-dir; default: run/locks where it "
        "exists): a rollout holding the model refuses the apply",
    )
    m.add_argument(
        "--force", action="store_true", help="apply while a rollout holds the model (its next stage undoes it)"
    )
    m.set_defaults(func=cmd_mesh)
    v = sub.add_parser("verify-model", help="check a candidate artifact before any traffic")
    v.add_argument("path", type=_existing_file)
    v.add_argument("--baseline", type=_existing_file)
    v.add_argument("--model-dir", type=Path, help="the model's repository folder (config.json, validation/)")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)
    r = sub.add_parser("run", help="a whole rollout on the model server's router, without Airflow")
    r.add_argument("--spec", type=Path, required=True, help="RolloutSpec as JSON (see RolloutSpec.json_schema())")
    r.add_argument("--url", type=_url, required=True, help="model server, http://host:port")
    r.add_argument("--validation", type=Path, required=True, help="labelled validation images (labels.csv)")
    r.add_argument("--token-file", type=Path)
    r.add_argument(
        "--prediction-log",
        required=True,
        type=_log_uri,
        help="the serving processes' prediction log (a folder or s3://bucket/prefix): the evidence",
    )
    guards = r.add_mutually_exclusive_group()
    guards.add_argument("--prometheus", type=_url, help="http://host:port, for the hard guards (P99, shadow errors)")
    guards.add_argument(
        "--no-hard-guards",
        action="store_true",
        help="run without Prometheus: no P99, shadow-error or restart guard, only the replay's accuracy drop",
    )
    r.add_argument(
        "--state-file",
        type=Path,
        help="also record the routes found before the rollout in this file, replacing an earlier run's (none by default)",
    )
    r.add_argument(
        "--sha256",
        type=_sha256,
        help="the candidate's sha256 as verify-model reported it: the model server must serve those bytes "
        "(default: those it serves at the start), checked before each stage, at each look and before promoting",
    )
    r.add_argument("--outbox", type=_folder, help="write the Slack reports here (a folder or s3://...)")
    r.add_argument(
        "--lock-dir",
        type=Path,
        help="hold the model's lock in this folder while running, as the DAG does in local mode (its run folder's "
        "locks/): a run of the model already holding it is refused",
    )
    r.set_defaults(func=cmd_run)
    from vision_rollout.settings import SEND_BUDGET_S

    o = sub.add_parser("outbox", help="list the Slack reports waiting in an outbox, send them, or drop one")
    # --outbox before the action or after it: neither sets a default that hides the other.
    o.add_argument("--outbox", type=_folder, default=argparse.SUPPRESS, help="the outbox: a folder or s3://...")
    box = _Parser(add_help=False)
    box.add_argument("--outbox", type=_folder, default=argparse.SUPPRESS, help="the outbox: a folder or s3://...")
    actions = o.add_subparsers(dest="action", required=True)
    actions.add_parser("list", parents=[box], help="the reports waiting, and those set aside").add_argument(
        "--json", action="store_true"
    )
    send = actions.add_parser("send", parents=[box], help="each waiting report to Slack")
    send.add_argument("--token-file", type=Path, required=True, help="a file holding the Slack bot token")
    send.add_argument("--slack-url", type=_slack_url, help="Slack's Web API base URL (default https://slack.com/api/)")
    send.add_argument(
        "--budget-s",
        type=float,
        default=SEND_BUDGET_S,
        help=f"start no report after this many seconds, and end every Slack call by then, the rest left waiting "
        f"(default {SEND_BUDGET_S:g})",
    )
    send.add_argument(
        "--retry-refused",
        nargs="*",
        metavar="NAME",
        help="also the reports set aside in refused/ (those named, else all), the channel fixed; one Slack "
        "does not take now stays set aside",
    )
    send.add_argument("--json", action="store_true")
    drop = actions.add_parser("drop", parents=[box], help="reports removed for good")
    drop.add_argument("names", nargs="+", metavar="NAME", help="reports, as list shows them")
    o.set_defaults(func=cmd_outbox)
    st = sub.add_parser("status", help="the rollout holding a model: its lease, its last word, the routes")
    st.add_argument("--model", type=_model, required=True)
    _lock_arguments(st)
    st.add_argument("--url", type=_url, help="model server, http://host:port: also the routes in effect")
    st.add_argument("--token-file", type=Path)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)
    ab = sub.add_parser("abort", help="put the stable version back and make the running rollout roll back")
    ab.add_argument("--spec", type=Path, required=True, help="the running rollout's spec (its model and baseline)")
    _lock_arguments(ab)
    ab.add_argument("--url", type=_url, help="model server, http://host:port (with --lock-dir)")
    ab.add_argument("--token-file", type=Path)
    ab.add_argument("--reason", help="why, for the run's report (default: who aborted, from where)")
    ab.set_defaults(func=cmd_abort)
    from vision_rollout.settings import MAX_PRUNED, RETENTION_DAYS

    pr = sub.add_parser("prune", help="remove what a run folder keeps that nobody reads any more, or list it")
    pr.add_argument("--run-dir", type=_folder, required=True, help="the run folder (the connection's run_dir)")
    pr.add_argument("--model", type=_model, action="append", help="a model (again for more; default: every one)")
    pr.add_argument(
        "--retention-days", type=int, default=RETENTION_DAYS, help="days a run's folder is kept unchanged (8 to 3660)"
    )
    pr.add_argument(
        "--limit", type=int, default=MAX_PRUNED, help="run folders looked into, files removed, of each kind"
    )
    pr.add_argument(
        "--namespace",
        type=_namespace,
        help="kubernetes mode: the models' namespace, whose Leases name the runs going on (kept)",
    )
    pr.add_argument("--name", type=_model, help="kubernetes mode: the model's VirtualService (default: the model)")
    pr.set_defaults(lock_dir=None)
    pr.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_prune)
    rs = sub.add_parser("restart-stage", help="start a DAG run's stage test afresh at its next run (reported)")
    rs.add_argument("--run-dir", type=_folder, required=True, help="the run folder (the connection's run_dir)")
    rs.add_argument("--model", type=_model, required=True)
    rs.add_argument("--run-id", required=True, help="the DAG run's id")
    rs.add_argument("--stage", type=int, required=True, help="the stage, 1 for the first")
    rs.add_argument("--reason", required=True, help="why (in the stage's report)")
    rs.set_defaults(func=cmd_restart_stage)
    return p


def _namespace(text: str) -> str:
    from vision_rollout.mesh import KUBERNETES_NAMES

    rule, pattern = KUBERNETES_NAMES["namespace"]
    if not re.fullmatch(pattern, text):
        raise argparse.ArgumentTypeError(f"not {rule}: {text[:80]!r}")
    return text


def _lock_arguments(p: argparse.ArgumentParser) -> None:
    """Where the model's lock is: a folder (local mode), or a Lease (kubernetes mode)."""
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--lock-dir", type=_lock_dir, help="the folder of the model's lock (run's --lock-dir)")
    where.add_argument("--namespace", type=_namespace, help="kubernetes mode: the model's namespace, its Lease there")
    p.add_argument("--name", type=_model, help="kubernetes mode: the model's VirtualService (default: the model)")


def _message(exc: BaseException) -> str:
    """One line for an error: the library's errors say where and why; others name their type."""
    from vision_rollout.locks import LockError
    from vision_rollout.mesh import RouterError
    from vision_rollout.metrics import MetricsError
    from vision_rollout.serving import AdminError

    if isinstance(exc, (CommandError, RouterError, AdminError, MetricsError, LockError)):
        return _one_line(str(exc))
    return _one_line(f"{type(exc).__name__}: {exc}")


def _one_line(text: str) -> str:
    """``text`` as one line of printable characters: an error quotes what a server, a proxy or a
    file said, whose line breaks read as lines of the command's own and whose terminal escapes
    the terminal runs."""
    from vision_rollout.attempts import printable

    return printable(text)


class _OneLine(logging.Formatter):
    """Log lines without tracebacks (``-v`` keeps them): the error the command ends on says it."""

    def formatException(self, ei: Any) -> str:
        return ""

    def format(self, record: logging.LogRecord) -> str:
        record.exc_text = ""
        return super().format(record).rstrip()


def _logging(verbose: bool) -> None:
    """Where nothing configured logging (a shell, CI; not a test's capture): WARNING and up on
    stderr in one line each, or with ``-v`` INFO and up (each poke of run) with tracebacks."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    fmt = "rolloutctl: %(levelname)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt) if verbose else _OneLine(fmt))
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)


def _failed(wants_json: bool, said: str, error: str, code: int, result: dict[str, Any] | None = None) -> int:
    """An error: ``said`` on stderr, the line the command ends on; with ``--json`` also one JSON
    object on stdout, ``result`` (what the command could tell all the same) with ``error`` and
    ``exit``, so that a script reading stdout gets an answer, as from ``kubectl -o json``."""
    print(said, file=sys.stderr)
    if wants_json:
        print(json.dumps({**(result or {}), "error": error, "exit": code}, indent=2), flush=True)
    return code


def _asks_json(argv: list[str]) -> bool:
    """Whether ``argv`` gives ``--json`` as argparse takes it (spelled out or abbreviated, ``--js``)
    among its options (before a ``--``): a usage error is then also a JSON object on stdout."""
    options = argv[: argv.index("--")] if "--" in argv else argv
    return any(len(a) > 2 and "--json".startswith(a) for a in options)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:  # --help
        return USAGE if exc.code else 0
    except _ArgumentsRefused as exc:  # argparse's own usage errors, after its usage line
        prog, error = exc.args
        return _failed(_asks_json(argv), f"{prog}: error: {error}", error, USAGE)
    _logging(args.verbose)
    wants_json, command = bool(getattr(args, "json", False)), f"rolloutctl {args.command}"
    try:
        return int(args.func(args))
    except UsageError as exc:
        error = _one_line(str(exc))
        return _failed(wants_json, f"{command}: {error}", error, USAGE)
    except KeyboardInterrupt as exc:  # (run handles its own, the stable version back first)
        return _failed(
            wants_json, f"{command}: interrupted", "interrupted", 128 + getattr(exc, "signum", signal.SIGINT)
        )
    except Exception as exc:
        from vision_rollout.locks import LockError
        from vision_rollout.mesh import RouterError
        from vision_rollout.metrics import MetricsError
        from vision_rollout.serving import AdminError

        if not isinstance(exc, (CommandError, RouterError, AdminError, MetricsError, LockError, OSError)):
            traceback.print_exc()  # not one the command knows: its trace, for a bug report
        error = _message(exc)
        result = exc.result if isinstance(exc, CommandError) else None
        return _failed(wants_json, f"{command}: error: {error}", error, ERROR, result)


if __name__ == "__main__":
    sys.exit(main())
