"""The rollout engine: how a stage is looked at and judged, the same for the DAG and the CLI.

A stage of weight w starts when its traffic policy is applied (``StageWindow.started``). Its
looks are planned at ``started + j * bake_seconds / looks_per_stage``, j = 1..K, and each look
is judged once, on the evidence recorded before its time:
- the live A/B arms: primary records of the prediction log routed by the policy (not by a
  version in the path) to the baseline or the candidate since the stage began: latency, errors
  and, where a label arrived, correctness;
- the paired validation replay: the validation images sent to both versions by name once per
  look interval, recorded in the same log; each image counts once per version for accuracy (the models
  are deterministic: a repeat adds no accuracy evidence), every request counts for errors;
- the hard guards (Prometheus and the replay's accuracy drop), read at the time of judging.

The judgement is a pure function of the log, the spec, the window and the clock: a poke that
comes late judges the looks it missed, in order, each on the records before its own time, and a
retried task judges the same looks to the same verdicts. The first look that passes or fails
decides the stage (a passed stage still bakes to ``bake_seconds`` under the guards). The last
look waits, if need be, until each arm has ``min_samples``, but never past
``max_stage_seconds``; still undecided there, the stage fails as undecided, unless only its
latency comparison is (no check failed, no guard tripped or held, the samples enough) and the
next stage judges latency on live arms too: the comparison is then carried to that stage
(``StageWindow.latency_carried_to``), and the stage passes on the rest. Every stage is a
group-sequential test at level alpha over its own looks, and promotion needs every stage to
pass, the last one below 100% (or a lone 100% stage) with its latency shown: the chance of
promoting a canary at a margin is at most alpha.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from vision_rollout.folders import Folder
from vision_rollout.gates import (
    INFORMATION_OF,
    Check,
    GateConfig,
    GuardInputs,
    Information,
    Reckoning,
    Verdict,
    check_information,
    evaluate_gate,
    fewest_pairs,
    guard_checks,
    limit_percent,
    look_information,
    nominal_alpha,
    utc_spans,
)
from vision_rollout.locks import Aborted, LockLost
from vision_rollout.mesh import Router
from vision_rollout.metrics import MetricsError, MetricsSource, NoValuesFound, PrometheusSource, PromQL
from vision_rollout.spec import RolloutSpec

if TYPE_CHECKING:
    from vision_rollout.audit import AuditResult

log = logging.getLogger(__name__)

SETTLE_S = 5.0  # a record reaches the prediction log within its flush interval (2 s by default)
WRITE_S = 3.0  # and a flush's write (settle_time)
# How long a poke's read of the stage's records may take (listings and files begun until then):
# a slow store or a stage of very many files ran a poke past its lease (``LEASE_S``, 300 s). What
# it read is kept for the next poke (the stage's cache), and nothing is judged on part of it.
POKE_READ_S = 120.0
# What a poke's read of the stage's records may hold in memory (Arrow tables, the stage cache's
# parts counted in): a busy stage's hours of records ran the worker out of memory, poke after
# poke. The files beyond are left unread, and nothing is judged on part of the records.
MAX_POKE_BYTES = 2 * 1024**3
CLOCK_SKEW_S = 5.0  # how far the model servers' clocks may be behind the workers'
MAX_FLUSH_S = 60.0  # the longest flush interval settle_time believes a model server reports


# -- the stage's plan ------------------------------------------------------------------------


@dataclass(frozen=True)
class StageWindow:
    index: int  # 0-based
    weight: int  # the candidate's share, percent
    started: float  # unix seconds: when the stage's weights took effect

    def look_time(self, spec: RolloutSpec, look: int) -> float:
        return self.started + look * spec.bake_seconds / spec.looks_per_stage

    @property
    def latency_from(self) -> str:
        """The live arms while both take traffic; at 100% the baseline has only the replay."""
        return "live" if self.weight < 100 else "replay"

    @property
    def latency_unjudged(self) -> str | None:
        """Why this stage's latency comparison decides nothing, or None when it decides.

        At 100% the candidate takes all live traffic and the baseline only the replay: the
        candidate's replay requests queue behind live ones (pods at working utilisation against
        idle ones), so the replay compares a loaded candidate with an idle baseline, and an
        equal candidate fails the tail margin at a rate set by the load, not by the model. After
        a stage below 100% (which passed only once the live arms, at the same footing, showed
        the latency within its margins) the comparison is reported and the P99 guard holds the
        latency at full load. A rollout whose only stage is 100% has no other comparison: its
        replay comparison decides, against the candidate under load (a false rollback more
        likely the busier the service, a slower candidate still stopped).
        """
        if self.weight < 100 or self.index == 0:
            return None
        return (
            "at 100% the candidate takes all live traffic and the baseline only the replay, so this "
            "compares a loaded candidate with an idle baseline; the stages before judged latency on "
            "live arms at equal footing, and the P99 guard holds it at full load."
        )

    def latency_carried_to(self, spec: RolloutSpec) -> int | None:
        """The weight of the stage that takes over this stage's latency comparison when its last
        look leaves it undecided: the next stage, when it judges latency on live arms too (below
        100%). None for the last stage that judges it, which must show it. A stage whose small
        live arm cannot show the margin in its time (5% of a service under load) passes it on
        rather than rolling an equal candidate back, as a canary analysis's intermediate interval
        neither failed nor passed goes on to the next (Kayenta's marginal score)."""
        following = self.index + 1
        if self.weight >= 100 or following >= len(spec.stages) or spec.stages[following] >= 100:
            return None
        return spec.stages[following]


def look_interval(spec: RolloutSpec) -> float:
    return spec.bake_seconds / spec.looks_per_stage


def preflight(spec: RolloutSpec, images: int) -> list[str]:
    """What the plan cannot show, said before any traffic moves (the DAG's first step and
    ``rolloutctl run`` print it, the final report carries it): a validation replay of
    ``images`` images too few for the paired accuracy check to show a candidate that answers
    them as the baseline does within ``accuracy_margin``, at any look (the last one's level is
    the most lenient). That level is the procedure's at the stage's plan, traffic at a steady
    pace: the boundary at the information seen (``boundaries``) is then the one of equal
    increments; traffic rising through the stage lowers it (642 images for the defaults, 687
    where it rises from 1x to 3x). Every round replays the same images, so no wait adds evidence: such a
    candidate ends the first stage undecided and is rolled back. One that gets more of them
    right than the baseline can still pass, so this warns and refuses nothing."""
    if images <= 0:
        return []
    level = nominal_alpha(spec.alpha, spec.looks_per_stage, spec.looks_per_stage, spec.spending)
    fewest = fewest_pairs(spec.accuracy_margin, level)
    if fewest is not None and images >= fewest:
        return []
    first = f"ends the {spec.stages[0]}% stage undecided and is rolled back"
    if fewest is None:
        return [
            f"accuracy_margin is {limit_percent(spec.accuracy_margin)} pp: the paired accuracy check shows no "
            f"candidate that answers the {images} validation images as the baseline does within it (such a "
            f"candidate {first}); only one that gets more of them right than the baseline can pass."
        ]
    return [
        f"the validation set has {images} images, too few to show a candidate that answers them as the baseline "
        f"does within the {limit_percent(spec.accuracy_margin)} pp accuracy margin: that needs at least {fewest} "
        f"(at the last look's one-sided level {level:.3g}, traffic at a steady pace through the stage; rising "
        f"traffic lowers it). Such a candidate {first}; only one that gets more of "
        "them right than the baseline can pass. Add images to the validation set, or widen accuracy_margin."
    ]


# -- evidence from the prediction log --------------------------------------------------------


def validation_labels(folder: Path) -> dict[str, int]:
    """sha256 of each validation image -> its label: how a replayed request finds its truth."""
    import hashlib

    from vision_rollout.replay import load_validation

    return {hashlib.sha256(image).hexdigest(): label for _, image, label in load_validation(folder)}


def available(records: pd.DataFrame, settle_s: float = SETTLE_S) -> pd.Series:
    """When each record is evidence (unix seconds): the first look time at which a poke, judging
    ``settle_s`` later, surely finds its file in the log. That is its time, unless the log says
    (``read(..., written=True)``) its file was written later than that allows: a file named at
    second S is whole by S + ``WRITE_S`` on its writer's clock, by S + ``WRITE_S`` +
    ``CLOCK_SKEW_S`` on the judge's. A replica that flushed late (a starved writer, a slow PUT, a
    clock behind the workers') added records to a look already judged, which the next poke judged
    again on more: a look the sequential test does not count, and a verdict a retried poke did not
    reproduce. Such records are the evidence of the looks after them now."""
    t = _unix(records["time"])
    if "written" not in records.columns:
        return t
    written = records["written"]
    whole = _unix(written.fillna(pd.Timestamp(0, tz="UTC"))).where(written.notna()) + WRITE_S + CLOCK_SKEW_S
    return np.fmax(t, whole - settle_s)


def stage_samples(
    records: pd.DataFrame,
    spec: RolloutSpec,
    window: StageWindow,
    until: float,
    labels: dict[str, int],
    settle_s: float = SETTLE_S,
) -> pd.DataFrame:
    """The gate's samples from prediction-log records with ``started <= time`` that are evidence
    before ``until`` (``available``).

    Columns: arm, source (live | replay), latency_ms, error, oom, correct (NaN without a
    label or an answer), pair_id (the image's sha256 for the replay), cluster (a live row's
    request id: its items are one unit of evidence), labelled_by (the tenant, masked, whose
    label a live row has), labelled_at (unix seconds: when that label is evidence, so that a
    look before ``until`` can cut the labels at its time, as ``_live_labels`` does), time (unix
    seconds: when it is evidence).

    A record of a batch request is a row per item, each with the request's latency and outcome:
    the request's evidence of latency, error and OOM is on its first item's row only (NaN on the
    others), its items' correctness on each. One failed request of 64 images counted 64 errors
    (and one slow one 64 latencies), so one client's batch decided the stage.
    """
    if records.empty:
        return _empty_samples()
    t = _unix(records["time"])
    from model_server.predictionlog import key_codes

    records = records.assign(_at=available(records, settle_s), _key=-1)
    seen = (records["_at"] < until).to_numpy(bool)  # (keyed on what the look saw: ``_live_labels``)
    records.loc[seen, "_key"] = key_codes(records[seen])
    arms = {spec.baseline_version: "baseline", spec.candidate_version: "canary"}
    primary = records[
        (records["role"] == "primary")
        & records["version"].isin(list(arms))
        & (t >= window.started)
        & (records["_at"] < until)
        & (records["model"] == spec.model)
        & (records["route"] != "probe")  # the rollout's masking probe: no client's request
    ]
    if primary.empty:
        return _empty_samples()
    by_version = primary["route"] == "version"
    is_replay = by_version & primary["image_sha256"].isin(list(labels))
    keep = is_replay | ~by_version
    chosen = primary[keep].reset_index(drop=True)
    is_replay = is_replay[keep].reset_index(drop=True)
    joined = _live_labels(records, chosen, spec.model, until)
    truth = chosen["image_sha256"].map(labels).where(is_replay, joined["label"])
    # Server failures: a client's 400, or its own queue timeout (CANCELED), is not the version's.
    error = ~chosen["outcome"].isin(["ok", "INVALID_INPUT", "CANCELED"])
    # Latency of the answers and of the requests given up waiting (as long as the client's
    # timeout: a slow arm pays for them); a failure's is not an answer's (a client's garbage
    # pinned to one arm, answered 400 in microseconds, made it look faster).
    answered = chosen["outcome"].isin(["ok", "CANCELED"])
    # A latency that is no duration (a foreign or damaged record: NaN, Inf, not above 0) is no
    # latency evidence; the request still counts for errors. One such record stopped the stage.
    latency = chosen["latency_ms"].astype(float)
    answered &= np.isfinite(latency) & (latency > 0)
    request = chosen["item"] == 0  # the row that stands for its request
    request_id = chosen["request_id"].astype(object)
    return pd.DataFrame(
        {
            "arm": chosen["version"].map(arms),
            "source": np.where(is_replay, "replay", "live"),
            "latency_ms": latency.where(answered & request),
            "error": error.astype(float).where(request),
            "oom": (chosen["outcome"] == "OOM").astype(float).where(request),
            # Only an answer is right or wrong: a request given up (CANCELED) or refused as the
            # client's (INVALID_INPUT) has no top-1, and was read as a wrong answer.
            "correct": (chosen["top1"] == truth).astype(float).where(truth.notna() & (chosen["outcome"] == "ok")),
            "pair_id": chosen["image_sha256"].where(is_replay),
            # The live rows of one request are one unit of the live accuracy evidence.
            "cluster": request_id.where(~is_replay & request_id.notna() & (request_id != "")),
            "labelled_by": joined["tenant"].where(~is_replay),  # the tenant that sent a live label
            "labelled_at": joined["at"].where(~is_replay),  # (when that label is evidence)
            "time": chosen["_at"],
        }
    )


def _live_labels(records: pd.DataFrame, live: pd.DataFrame, model: str, until: float) -> pd.DataFrame:
    """The label of each live record, the tenant that sent it and when it is evidence (``label``,
    ``tenant``, ``at``: ``available``'s), joined by the log's key (``key_codes``: request id and
    item, and the tenant where two tenants sent one id), as the log's ``joined`` joins them: the
    earliest label received before ``until`` (a look's evidence is what was logged before its
    time), on the earliest answer of its key (a re-sent id is a second answer, not a second piece
    of evidence): a second label sent to another replica (each takes one) cannot override the
    first, a late poke judges a look on what it would have seen on time, one label of an id
    re-sent 20 times counts once, and one tenant's label does not judge another's answer. The
    key (``_key``) is ``key_codes``' on the records available before ``until``: a request that
    another tenant sent under the id later does not change what a look judged."""
    rows = records[(records["role"] == "label") & (records["model"] == model)]
    out = pd.DataFrame({"label": np.nan, "tenant": None, "at": np.nan}, index=live.index)
    if rows.empty or live.empty:
        return out
    t = rows["_at"]
    rows = rows[t < until].assign(_t=t[t < until])
    if rows.empty:
        return out
    if "tenant" not in rows.columns:
        rows = rows.assign(tenant=None)
    first = (
        rows.sort_values("_t", kind="stable")
        .drop_duplicates("_key", keep="first")
        .set_index("_key")[["label", "tenant", "_t"]]
    )
    answered = live[(live["outcome"] == "ok") & (live["route"] != "version")]
    answered = answered.assign(_t=answered["_at"]).sort_values("_t", kind="stable")
    answered = answered.drop_duplicates("_key", keep="first")
    found = first.reindex(answered["_key"])
    out.loc[answered.index, "label"] = found["label"].to_numpy(dtype=float)
    out.loc[answered.index, "tenant"] = found["tenant"].astype(object).to_numpy()
    out.loc[answered.index, "at"] = found["_t"].to_numpy(dtype=float)
    return out


def _unix(times: pd.Series) -> pd.Series:
    if pd.api.types.is_numeric_dtype(times):
        return times.astype(float)
    return times.dt.tz_convert("UTC").astype("datetime64[us, UTC]").astype("int64") / 1e6


def _empty_samples() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "arm": pd.Series(dtype=str),
            "source": pd.Series(dtype=str),
            "latency_ms": pd.Series(dtype=float),
            "error": pd.Series(dtype=float),
            "oom": pd.Series(dtype=float),
            "correct": pd.Series(dtype=float),
            "pair_id": pd.Series(dtype=object),
            "cluster": pd.Series(dtype=object),
            "labelled_by": pd.Series(dtype=object),
            "labelled_at": pd.Series(dtype=float),
            "time": pd.Series(dtype=float),
        }
    )


def replay_drop(samples: pd.DataFrame, images: int = 0) -> float | None:
    """Baseline minus candidate accuracy on the replayed images both answered (a hard guard);
    None until both versions answered every one of the ``images`` (a round logged whole: on a
    part of one, one image only the baseline got among the first 40 read as a 2.5 pp drop, and
    a candidate as accurate as the baseline tripped the guard in 11 to 17% of image orders)."""
    replay = samples.dropna(subset=["pair_id"])
    if images and (replay.groupby("pair_id")["arm"].nunique() == 2).sum() < images:
        return None
    pairs = replay.dropna(subset=["correct"])
    if pairs.empty:
        return None
    table = pairs.pivot_table(index="pair_id", columns="arm", values="correct", aggfunc="first").dropna()
    if table.empty or not {"baseline", "canary"} <= set(table.columns):
        return None
    return float(table["baseline"].mean() - table["canary"].mean())


# -- judging a stage --------------------------------------------------------------------------


@dataclass(frozen=True)
class StageState:
    """Where a stage stands at ``now``: what the sensor, the CLI and the report read."""

    status: str  # waiting | pass | fail | undecided | breach
    look: int  # the last look judged (0: none yet)
    looks: int
    verdict: Verdict | None
    reason: str
    served: dict[str, dict[str, int]] = field(default_factory=dict)  # arm -> source -> requests
    elapsed_s: float = 0.0
    until: float | None = None  # the evidence time of the look ``verdict`` is of (unix seconds)

    @property
    def done(self) -> bool:
        return self.status != "waiting"


def served(samples: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Requests per arm and source (a batch request is one)."""
    counts = samples.dropna(subset=["error"]).groupby(["arm", "source"]).size()
    return {arm: {src: int(n) for (a, src), n in counts.items() if a == arm} for arm in ("baseline", "canary")}


def final_look_time(spec: RolloutSpec, window: StageWindow, samples: pd.DataFrame, images: int = 0) -> float:
    """The last look: at the bake's end, or later once each arm has ``min_samples`` of its
    latency evidence and, when the validation replay runs, all of a round's ``images`` are
    answered by both versions (the paired accuracy check judges whole rounds); never past
    ``max_stage_seconds``.
    Each condition is the time a count was reached in the log, so a late poke finds the same
    time. Without the replay's, a last look on a loaded machine found a replay round sent but 8
    of its images logged by both versions, and judged accuracy on those."""
    planned = window.look_time(spec, spec.looks_per_stage)
    reached = []
    for arm in ("baseline", "canary"):
        answered = (samples["arm"] == arm) & (samples["source"] == window.latency_from) & samples["latency_ms"].notna()
        times = np.sort(samples.loc[answered, "time"].to_numpy())
        reached.append(times[spec.min_samples - 1] + 1e-6 if len(times) >= spec.min_samples else math.inf)
    replay = samples.dropna(subset=["pair_id"])
    if images:  # (none of the replay in the log yet: it waits for it as for the rest of a round)
        # An image is paired once both versions' first answers to it are logged (later rounds
        # replay it again: they move nothing).
        first = replay.groupby(["pair_id", "arm"])["time"].min().unstack()
        complete = np.sort(first.dropna().max(axis=1).to_numpy()) if first.shape[1] == 2 else np.array([])
        reached.append(complete[images - 1] + 1e-6 if len(complete) >= images else math.inf)
    return min(max(planned, *reached), window.started + spec.max_stage_seconds)


def look_end(spec: RolloutSpec, window: StageWindow, look: int, samples: pd.DataFrame, images: int = 0) -> float:
    """The time of look ``look`` of the stage, its samples those before it: planned
    (``StageWindow.look_time``), the last one's ``final_look_time`` on the stage's ``samples`` so
    far (``images``: a validation round's)."""
    if look < spec.looks_per_stage:
        return window.look_time(spec, look)
    return final_look_time(spec, window, samples, images)


def stage_guards(guards: GuardInputs | None, samples: pd.DataFrame, images: int = 0) -> GuardInputs:
    """The hard guards a poke judges the stage under: ``guards``, those read from Prometheus
    (``guard_inputs``), and the replay's accuracy drop on the stage's ``samples`` so far
    (``replay_drop``, on whole rounds of ``images``)."""
    return GuardInputs(**{**(guards.__dict__ if guards else {}), "validation_drop": replay_drop(samples, images)})


def look_verdict(
    spec: RolloutSpec,
    window: StageWindow,
    look: int,
    at: float,
    samples: pd.DataFrame,
    cfg: GateConfig,
    guards: GuardInputs | None,
    images: int,
    information: tuple[Information, ...],
    reckoning: Reckoning | None = None,
) -> Verdict:
    """Look ``look`` of the stage judged on its ``samples`` (those before its time ``at``) under
    the hard guards ``guards`` (``stage_guards``), as its pokes judge it: latency on the stage's
    source, at 100% after an earlier stage reported, not judged, and at its last look left
    undecided alone carried to the next stage below 100% (``StageWindow``); the paired accuracy
    check on whole rounds of ``images``; each check's boundary at ``information``, what looks
    1..``look`` saw. The evidence it rests on leads its checks."""
    verdict = evaluate_gate(
        samples,
        cfg,
        look,
        spec.looks_per_stage,
        guards=guards,
        latency_from=window.latency_from,
        replay_images=images,
        latency_unjudged=window.latency_unjudged,
        latency_carried_to=window.latency_carried_to(spec) if look == spec.looks_per_stage else None,
        information=information,
        reckoning=reckoning,
    )
    return replace(verdict, checks=(evidence_check(samples, at - window.started), *verdict.checks))


def read_in_part(records: pd.DataFrame) -> str | None:
    """What a read cut short by its time or its memory bound left of the stage's records (``read``'s
    ``unread_files``, ``unlisted_folders``), or the hour folders it listed in part as holding
    more files than it lists (``crowded_folders``), as a sentence; None when nothing was left."""
    from model_server.predictionlog import MAX_LISTED_FILES

    attrs = records.attrs
    files, folders = attrs.get("unread_files", 0), attrs.get("unlisted_folders", 0)
    if crowded := attrs.get("crowded_folders", 0):
        return (
            f"{crowded} hour folders of the stage hold more than {MAX_LISTED_FILES:,} prediction log files "
            "(MAX_LISTED_FILES: a writer flushing far too often?), listed in part"
        )
    if not files and not folders:
        return None
    listed = files + attrs.get("files_read", 0) + len(attrs.get("skipped_file_reasons") or {})
    unlisted = f" and {folders} of its hour folders not listed" if folders else ""
    if not attrs.get("out_of_time"):
        return (
            f"{files} of {listed} prediction log files of the stage not read within the poke's memory bound "
            f"(MAX_POKE_BYTES, {MAX_POKE_BYTES:,} bytes of records: a stage of very many records)"
        )
    return (
        f"{files} of {listed} prediction log files of the stage not read{unlisted} within the poke's "
        f"{POKE_READ_S:g} s (POKE_READ_S: a slow store, or very many files); those read are kept for the "
        "next poke"
    )


def judge_stage(
    spec: RolloutSpec,
    window: StageWindow,
    records: pd.DataFrame,
    labels: dict[str, int],
    now: float,
    guards: GuardInputs | None = None,
    config: GateConfig | None = None,
    settle_s: float = SETTLE_S,
    replay_images: int | None = None,
    evidence_s: float = SETTLE_S,
    reckoned: Reckoned | None = None,
) -> StageState:
    """Judge, in order, every look whose time (plus ``settle_s``) has come, each on the records
    before its time; stop at the first that decides. ``replay_images``: the images a replay
    round sends (default all of ``labels``); the accuracy-drop guard reads whole rounds only,
    and no look passes before it has read one. ``reckoned``: what the stage's judgements
    reckoned before, its looks' levels and a waiting look's need taken from there, and what
    this one took or reckoned put there in place of the rest (``gates.Reckoning``).

    ``evidence_s``: the settle time each record's evidence time is reckoned with (``available``),
    the lesser of it and ``settle_s``: the smallest any poke of the stage waits (a stage judge's
    own ``settle_s``, which ``settle_time`` only lengthens where a model server reports a longer
    flush), so that a poke that read the flush interval and one that could not (Prometheus down)
    judge a look on the same records. Reckoned with each poke's own settle time, a look at 40 s
    held records flushed at 40 s for a poke waiting 13 s and not for one waiting 5 s.

    While a hard guard cannot be read or has no data, or files of the prediction log that
    ``read`` skipped (``skipped_file_reasons`` in ``records.attrs``: truncated, another writer's
    schema, unreadable by this worker) leave their records out of the evidence, the looks are
    still judged, and one that fails ends the stage (a failure needs no guard: a canary failing
    every request has no P99); nothing passes meanwhile. While files of the stage were left
    unread, or hour folders unlisted, by the read's time (``POKE_READ_S``) or its memory bound
    (``MAX_POKE_BYTES``), or hour folders
    listed in part (``MAX_LISTED_FILES``: ``read_in_part``),
    no look is judged: the records read are a part chosen by the order of the files' names (by
    pod), no sample of the stage's; a hard guard's breach still ends it."""
    cfg = config or GateConfig.from_spec(spec)
    K = spec.looks_per_stage
    base = min(settle_s, evidence_s)
    reckoning = None if reckoned is None else Reckoning(reckoned)
    current = stage_samples(records, spec, window, now - settle_s, labels, base)
    elapsed = now - window.started
    judged, judged_at = 0, math.nan  # (the last look judged, and its time)

    def state(status: str, look: int, verdict: Verdict | None, reason: str) -> StageState:
        until = judged_at if verdict is not None and look == judged else None
        return StageState(status, look, K, verdict, reason, served(current), elapsed, until)

    images = len(labels) if replay_images is None else replay_images
    guard_in = stage_guards(guards, current, images)
    if breach := tripped(guard_in, cfg):
        return state("breach", 0, None, breach)
    if (partial := read_in_part(records)) is not None:  # no look judged on part of the records
        if elapsed >= spec.max_stage_seconds:
            return state("undecided", 0, None, f"undecided: the stage ended ({elapsed:.0f} s) while {partial}")
        return state("waiting", 0, None, f"holding: {partial}; nothing is judged on part of them")
    verdict: Verdict | None = None
    seen: list[Information] = []  # the information of each look so far (its boundaries read them all)
    for look in range(1, K + 1):
        at = look_end(spec, window, look, current, images)
        if at > now - settle_s:
            break
        samples = stage_samples(records, spec, window, at, labels, base)
        seen.append(look_information(samples, window.latency_from))
        verdict = look_verdict(spec, window, look, at, samples, cfg, guard_in, images, tuple(seen), reckoning)
        judged, judged_at = look, at
        if verdict.decision != "wait":
            break
    if verdict is not None and verdict.decision == "fail":
        return state("fail", judged, verdict, verdict.summary)
    unread = records.attrs.get("skipped_file_reasons") or {}
    if guard_in.unavailable or guard_in.missing or unread:  # a stage passes only under its guards, on its records
        if guard_in.unavailable:
            now_, then = "the hard guards cannot be read", "its hard guards could not be read"
            why, until = f" ({guard_in.unavailable})", "Prometheus answers again"
        elif unread:  # the missing records may be one arm's: its errors, its slow answers
            path, reason = next(iter(unread.items()))
            files = f"{len(unread)} prediction log file{'s' if len(unread) > 1 else ''} of the stage"
            now_, then = f"{files} cannot be read", f"{files} could not be read"
            why = " (first: " + " ".join(f"{str(path)[-120:]}: {str(reason)[:200]}".split()) + ")"
            until = "the log's records of the stage can be read"
        else:
            now_, then = "a hard guard has no data", "a hard guard had no data"
            why, until = f": {guard_in.missing}", "it has"
        if elapsed >= spec.max_stage_seconds:
            return state("undecided", 0, None, f"undecided: the stage ended ({elapsed:.0f} s) while {then}{why}")
        return state("waiting", 0, None, f"holding: {now_}{why}; nothing passes until {until}")
    if verdict is None:
        return state("waiting", 0, None, f"first look at {look_interval(spec):.0f} s into the stage")
    held = [c for c in verdict.checks if c.name.startswith("guard_") and c.decision == "wait" and c.blocks_pass]
    if verdict.decision == "wait" and judged == K and held:
        # A guard holding the last look (a P99 excursion under way, short of a breach) holds the
        # stage, as one without data does: its last look read "wait" for the guard alone, and the
        # stage ended undecided on a spike the guard allows.
        why = " ".join(c.sentence for c in held)
        if rest := [c.sentence for c in verdict.checks if c.decision == "wait" and c.blocks_pass and c not in held]:
            why += " Waiting beside it: " + " ".join(rest[:3])  # (else the guard alone was named)
        if elapsed >= spec.max_stage_seconds:
            return state("undecided", K, verdict, f"undecided: the stage ended ({elapsed:.0f} s) while {why}")
        return state("waiting", K, verdict, f"holding at look {K} of {K}: {why}")
    if verdict.decision == "pass":
        if labels and guard_in.validation_drop is None:
            return state(
                "waiting",
                judged,
                verdict,
                f"passed at look {judged} of {K}; holding until the replay's accuracy guard has read a whole round",
            )
        # Time the guards were blind (Prometheus restarted without its storage, down) is baked again.
        bake, blind = spec.bake_seconds + guard_in.unwatched_s, guard_in.unwatched_s
        if elapsed >= bake:
            return state("pass", judged, verdict, verdict.summary)
        if elapsed >= spec.max_stage_seconds:
            return state(
                "undecided",
                judged,
                verdict,
                f"undecided: the hard guards watched {elapsed - blind:.0f} s of the stage's {elapsed:.0f} s, not the "
                f"{spec.bake_seconds} s bake, by max_stage_seconds ({spec.max_stage_seconds} s): Prometheus holds no "
                f"sample of a server serving the candidate for {blind:.0f} s of it. {verdict.summary}",
            )
        longer = (
            f" ({blind:.0f} s longer: Prometheus holds no sample of the candidate's servers for them)" if blind else ""
        )
        return state(
            "waiting",
            judged,
            verdict,
            f"passed at look {judged} of {K}; baking until {bake:.0f} s under the hard guards{longer}",
        )
    n = need_n(verdict, spec, tuple(seen), reckoning)
    live_held = any(c.held for c in verdict.checks)
    if live_held:
        need = "the live accuracy check holds it: one tenant's labels decide it (below)."
    elif n is None and any(
        c.name == "accuracy_paired" and c.decision == "wait" and c.ci is None for c in verdict.checks
    ):
        need = "the paired accuracy check waits for a whole validation round answered by both versions."
    elif n is None:
        need = "the estimate sits on the margin; no sample size resolves it."
    else:
        need = f"about {n} samples per arm would resolve it."
    if judged == K:
        if not live_held and (short := short_of_traffic(spec, window, verdict, elapsed, arm_rate(current, window))):
            return state("undecided", K, verdict, f"{short} {verdict.summary}")
        return state(
            "undecided",
            K,
            verdict,
            f"undecided at its last look ({K} of {K}, {elapsed:.0f} s into the stage): {need} {verdict.summary}",
        )
    ahead = "" if live_held else projection(spec, n, arm_rate(current, window), window.latency_from)
    to = window.latency_carried_to(spec)
    if (
        not live_held
        and to is not None
        and any(c.name == "latency_geomean" and c.decision == "wait" for c in verdict.checks)
    ):
        ahead += f" Undecided at the last look, the latency comparison alone is carried to the {to}% stage."
    return state("waiting", judged, verdict, f"WAIT at look {judged} of {K}: {need}{ahead} {verdict.summary}")


def short_of_traffic(
    spec: RolloutSpec, window: StageWindow, verdict: Verdict, elapsed: float, rate: float
) -> str | None:
    """The cause of a last look held by ``min_samples`` (a low-traffic hour), first in its reason,
    so that the rollback's report tells it from a candidate the statistics could not clear (as
    Flagger's progress deadline names itself); None when the arms had their samples."""
    short = next((c for c in verdict.checks if c.name == "samples" and c.decision == "wait"), None)
    if short is None:
        return None
    what = "traffic" if window.latency_from == "live" else "validation replay requests"
    need = spec.min_samples - min(short.n_baseline, short.n_canary)
    pace = (
        f"at {rate:.2g} requests/s into the slower arm the {need} more would take about {need / rate:.0f} s"
        if rate > 0
        else "one arm had none"
    )
    return (
        f"not enough {what}: baseline {short.n_baseline}, canary {short.n_canary} of the {spec.min_samples} "
        f"{window.latency_from} requests per arm the test needs before anything can pass, in {elapsed:.0f} s "
        f"(max_stage_seconds {spec.max_stage_seconds}); {pace}. No check failed: the candidate was not shown worse, "
        "only not shown within its margins (a busier hour, a longer max_stage_seconds or a smaller min_samples)."
    )


def evidence_check(samples: pd.DataFrame, seconds: float) -> Check:
    """What a look's verdict rests on, in one sentence for the reviewer."""
    live = samples[samples["source"] == "live"]
    replay = samples[samples["source"] == "replay"]
    n = {arm: int(((live["arm"] == arm) & live["error"].notna()).sum()) for arm in ("baseline", "canary")}
    labelled = {arm: int(((live["arm"] == arm) & live["correct"].notna()).sum()) for arm in ("baseline", "canary")}
    images = int(replay["pair_id"].nunique())
    rounds = int((replay["arm"] == "canary").sum())
    text = (
        f"Evidence over the first {seconds:.0f} s of the stage: live A/B arms baseline {n['baseline']}, "
        f"canary {n['canary']} requests ({labelled['baseline']} and {labelled['canary']} with feedback labels); "
        f"validation replay of {images} images through both versions ({rounds} requests per version)."
    )
    return Check(
        "evidence",
        "info",
        text,
        "prediction log records before the look's time",
        n_baseline=n["baseline"],
        n_canary=n["canary"],
        blocks_pass=False,
    )


def steady_information(seen: tuple[float, ...], looks: int, final: float) -> tuple[float, ...]:
    """The information of looks 1..``looks``: ``seen`` at the looks judged, then rising in equal
    steps to ``final`` at the last (traffic at a steady pace from here), as ``boundaries`` reads it."""
    last = seen[-1] if seen else 0.0
    ahead = looks - len(seen)
    return (*seen, *(last + (final - last) * i / ahead for i in range(1, ahead + 1)))


Reckoned = dict[str, Any]  # what a stage's judgements reckoned, by a digest of its inputs (``gates.Reckoning``)


def need_n(
    verdict: Verdict,
    spec: RolloutSpec,
    information: tuple[Information, ...],
    reckoning: Reckoning | None = None,
) -> int | None:
    """Samples per arm the waiting checks need to resolve their current estimate at the last
    look's level (None when none of them can say). ``information``: what the looks judged saw
    (``judge_stage``'s, the last the verdict's look). The last look's level is the procedure's:
    each check's boundary at its own information of every look (``check_information``), the
    looks ahead taken to reach its need in equal steps, so the need and the level are solved
    together; at the last look, that look's own level. The level of equal increments (k/K) was
    more lenient than the last look's when the stage's traffic rose, and the need it named did
    not resolve the estimate there.

    ``reckoning``: where a need of the same inputs (all it reads: the plan, the verdict's level,
    its checks the need is reckoned from and their looks' information, ``need_checks``),
    reckoned before, is taken from (``gates.Reckoning``). Reckoning takes the boundaries of every
    look ahead a few times over per information measure, about a second of CPU, and every poke
    of a look reads the same inputs; what the need does not read (a holding P99 guard's P99,
    which moves at every poke) is no input: it would reckon the need again at every poke."""
    if reckoning is None:
        return _reckoned_need(verdict, spec, information)
    checks = need_checks(verdict)
    read = [
        "need_n",
        [spec.alpha, spec.spending, spec.looks_per_stage, spec.min_samples, verdict.alpha, verdict.spending],
        [
            [c.name] if c.name == "samples" else [c.name, c.n_baseline, c.n_canary, c.ci, c.effect, c.margin]
            for c in checks
        ],
        [[float(i) for i in check_information(c.name, information)] for c in checks if c.name != "samples"],
    ]
    return reckoning(read, lambda: _reckoned_need(verdict, spec, information), is_need)


def is_need(value: Any) -> bool:
    """Whether ``value`` is a need ``need_n`` reckons: a whole number of samples or None."""
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)


def need_checks(verdict: Verdict) -> list[Check]:
    """The checks of ``verdict`` a need is reckoned from: those that wait and hold it, the sample
    minimum (its need min_samples) and those with an estimate to resolve (``ci``, ``effect``,
    ``margin``), not the paired accuracy check (the same validation images each round: more add
    nothing) nor the hard guards (no estimate)."""
    return [
        c
        for c in verdict.checks
        if c.decision == "wait"
        and c.blocks_pass
        and c.name != "accuracy_paired"
        and (c.name == "samples" or None not in (c.ci, c.effect, c.margin))
    ]


def _reckoned_need(verdict: Verdict, spec: RolloutSpec, information: tuple[Information, ...]) -> int | None:
    """``need_n``, reckoned (kept in the stage's record: a change to how bumps
    ``gates.RECKONED_VERSION``)."""
    K = spec.looks_per_stage
    fixed: list[int] = []  # needs of their own: min_samples
    # Per information measure: its looks' information, their level's z and the waiting checks'
    # largest need per final z^2.
    scaled: dict[str, tuple[tuple[float, ...], float, float]] = {}
    for c in need_checks(verdict):
        if c.name == "samples":
            fixed.append(spec.min_samples)
            continue
        assert c.ci is not None  # (need_checks': each has an estimate)
        assert c.effect is not None
        assert c.margin is not None
        n = min(c.n_baseline, c.n_canary)
        if c.name.startswith("latency"):
            lo, hi, eff, m = (math.log1p(x) for x in (*c.ci, c.effect, c.margin))
        else:
            lo, hi, eff, m = c.ci[0], c.ci[1], c.effect, c.margin
        gap = abs(m - eff)
        if gap <= 0 or n <= 0:
            return None
        seen = check_information(c.name, information)
        look_z = _z(nominal_alpha(verdict.alpha, len(seen), K, verdict.spending, seen))  # the check's own level
        measure = INFORMATION_OF.get(c.name, "latency")
        per_z2 = n * ((hi - lo) / 2 / look_z / gap) ** 2
        scaled[measure] = (seen, look_z, max(per_z2, scaled.get(measure, (seen, look_z, 0.0))[2]))
    if not fixed and not scaled:
        return None
    needs = list(fixed)
    for seen, look_z, per_z2 in scaled.values():
        if len(seen) >= K:
            needs.append(math.ceil(per_z2 * look_z**2))
            continue
        # The level given the need, the need given the level, from the level of steady traffic
        # throughout (equal increments): a round or two settle it to a sample in a thousand.
        final_z = _z(nominal_alpha(spec.alpha, K, K, spec.spending))
        for _ in range(6):
            final = max(per_z2 * final_z**2, seen[-1])  # (the information is the check's count)
            z = _z(nominal_alpha(spec.alpha, K, K, spec.spending, steady_information(seen, K, final)))
            settled = abs(math.ceil(per_z2 * z**2) - math.ceil(per_z2 * final_z**2)) <= per_z2 * z**2 / 1000
            final_z = z
            if settled:
                break
        needs.append(math.ceil(per_z2 * final_z**2))
    return max(needs)


def arm_rate(samples: pd.DataFrame, window: StageWindow) -> float:
    """Requests per second into the slower arm of the latency evidence."""
    rows = samples[(samples["source"] == window.latency_from) & samples["error"].notna()]
    if rows.empty:
        return 0.0
    span = max(1.0, float(rows["time"].max() - window.started))
    return min((rows["arm"] == arm).sum() for arm in ("baseline", "canary")) / span


def projection(spec: RolloutSpec, n: int | None, rate: float, source: str = "live") -> str:
    """When the samples still needed (``n`` per arm) come at ``rate`` a second of the ``source``
    requests (live A/B traffic, or the replay at 100%)."""
    if n is None:
        return ""
    if rate <= 0:
        return f" No {source} requests have reached one arm yet" + (
            " (the validation replay's are no live traffic)." if source == "live" else "."
        )
    eta = n / rate
    budget = spec.max_stage_seconds
    if eta > budget:
        return (
            f" At {rate:.1f} requests/s into the slower arm that takes about {eta:.0f} s: more than "
            f"max_stage_seconds ({budget} s), so this stage cannot decide in time at this traffic."
        )
    return f" At {rate:.1f} requests/s into the slower arm that takes about {eta:.0f} s."


def _z(level: float) -> float:
    from scipy import stats

    return float(stats.norm.isf(level)) if level > 0 else math.inf


# -- reading the world: the stage judge ------------------------------------------------------


RATE_WINDOW_MIN_S = 30.0  # the P99 guard's rate window, at least; else 4 scrape intervals
SHADOW_WINDOW_S = 600.0  # the shadow error guard's window, at most
MAX_P99_POINTS = 5000  # the P99 series' points a poke reads, at most (Prometheus answers 11,000)


def rate_window_s(scrape_interval_s: float) -> float:
    """A rate window that holds enough samples whatever the scrape interval: 4 intervals, at least 30 s."""
    return max(RATE_WINDOW_MIN_S, 4 * scrape_interval_s)


def guard_inputs(
    source: MetricsSource | None,
    spec: RolloutSpec,
    now: float | None = None,
    since: float | None = None,
    *,
    past: bool = False,
) -> GuardInputs:
    """The Prometheus hard guards, over windows derived from Prometheus' scrape interval and
    summed over the version's pods; the P99 series of the whole stage (from ``since``, its
    start: a breach the same version had before, in an earlier rollout of it, is not this
    stage's; without it the last ``p99_breach_seconds``), the shadow's counts and the restarts
    of the candidate's serving processes from ``since`` on (without it the last 10 minutes).
    No data for the canary's P99 or for its processes' start times sets ``missing``, and
    Prometheus unreachable or failing sets ``unavailable``: either way the stage holds, never
    passes. ``past``: ``now`` is a time gone by (a look judged again, ``rolloutctl gate``), at
    which the instant queries (the shadow's counts, the restarts) are evaluated, on Prometheus'
    clock, as a poke's were at its present; without it at Prometheus' present (a poke's ``now``)."""
    if not isinstance(source, PrometheusSource):
        return GuardInputs()
    now = now or time.time()
    series = None
    down: list[str] = []
    missing = None
    rate = RATE_WINDOW_MIN_S
    offset = 0.0
    unwatched: tuple[tuple[float, float], ...] = ()
    try:
        scrape = source.scrape_interval_s()
        rate = rate_window_s(scrape)
        window = max(spec.p99_breach_seconds, 10)
        # The whole stage at each poke: a breach that ended between two pokes (Airflow's
        # reschedules space them as its slots allow) is one all the same. On Prometheus' clock:
        # the stage's times are this worker's, which may be ahead of it or behind.
        start = now - window - 5 if since is None else min(since, now)
        offset = source.clock_offset_s()
        step = max(1.0, window / 60, (now - start) / MAX_P99_POINTS)
        if since is not None:
            unwatched = watched_gaps(source, spec, start + offset, now + offset, step, rate, scrape)
        points = source.query_range(
            PromQL.latency_quantile_ms(spec.model, spec.candidate_version, 0.99, f"{rate:g}s"),
            start + offset,
            now + offset,
            step_s=step,
        )
        series = tuple(points)
    except NoValuesFound as exc:
        missing = f"the canary's P99 has no data in Prometheus ({exc})"
    except MetricsError as exc:
        down.append(str(exc))
    errors = requests = None
    at = now + offset if past else None
    sel = f'model="{spec.model}",version="{spec.candidate_version}"'
    # The shadow's copies of the last 10 minutes of this stage (from ``since``; at least the rate
    # window): an earlier rollout's errors of the same version are not this stage's.
    span = SHADOW_WINDOW_S if since is None else min(SHADOW_WINDOW_S, max(rate, now - since))
    last = f"{math.ceil(span)}s"
    try:
        requests = _count(source, f'sum(increase(shadow_requests_total{{{sel},outcome=~"ok|error"}}[{last}]))', at)
        errors = _count(
            source, f'sum(increase(shadow_requests_total{{{sel},outcome="error"}}[{last}])) or vector(0)', at
        )
    except NoValuesFound as exc:
        log.info("no shadow counts yet: %s", exc)
    except MetricsError as exc:
        down.append(str(exc))
    restarts = None
    # The whole stage (from ``since``): what a crash lost (its requests in flight, its counters,
    # its log records not yet written) is in no other guard's numbers.
    stage = SHADOW_WINDOW_S if since is None else max(1.0, now - since)
    try:
        restarts = _count(
            source,
            PromQL.restarts(spec.model, spec.candidate_version, f"{math.ceil(stage)}s", f"{math.ceil(rate)}s"),
            at,
        )
    except NoValuesFound as exc:
        no_start = f"the start times of the candidate's serving processes have no data in Prometheus ({exc})"
        missing = f"{missing}; {no_start}" if missing else no_start
    except MetricsError as exc:
        down.append(str(exc))
    return GuardInputs(
        p99_series_ms=series,
        shadow_errors=errors,
        shadow_requests=requests,
        restarts=restarts,
        unavailable="; ".join(dict.fromkeys(down)) or None,
        missing=missing,
        unwatched=unwatched,
    )


def watched_gaps(
    source: PrometheusSource, spec: RolloutSpec, start: float, end: float, step: float, rate: float, scrape: float
) -> tuple[tuple[float, float], ...]:
    """The spans of [start, end] (Prometheus' clock) in which Prometheus holds no sample of a
    server reporting the candidate loaded within the rate window: the P99's rate, the restarts'
    and the shadow's counts are blind there, whatever they answer now. A Prometheus restarted
    without its storage holds nothing before its start (a breach that ended between two pokes,
    a restart of the candidate: gone); one down, or its scrapes failing, holds a hole. A gap of
    two steps or scrape intervals at most (the candidate's first scrape after the stage began)
    is none."""
    sel = f'model="{spec.model}",version="{spec.candidate_version}"'
    try:
        points = source.query_range(
            f"count(count_over_time(model_server_model_info{{{sel}}}[{rate:g}s]))", start, end, step
        )
    except NoValuesFound:
        points = []
    seen = {round((t - start) / step) for t, _ in points}
    gaps: list[tuple[float, float]] = []
    for k in range(int((end - start) // step) + 1):
        if k in seen:
            continue
        a, b = start + k * step, min(start + (k + 1) * step, end)
        if gaps and gaps[-1][1] >= a:
            gaps[-1] = (gaps[-1][0], b)
        else:
            gaps.append((a, b))
    if sum(b - a for a, b in gaps) <= 2 * max(step, scrape):
        return ()
    return tuple(gaps)


def tripped(guards: GuardInputs, cfg: GateConfig) -> str | None:
    """The hard guards that tripped, in one sentence; None when none did."""
    failed = [c.sentence for c in guard_checks(guards, cfg) if c.decision == "fail"]
    return "hard guard tripped: " + " ".join(failed) if failed else None


def guard_breach(
    source: MetricsSource | None, spec: RolloutSpec, since: float, now: float | None = None
) -> tuple[str | None, str | None]:
    """The last stage's hard guards on Prometheus (the P99's sustained breach over the stage
    from ``since``, its start; the shadow's error rate; the candidate's restarts), as its pokes
    read them, while its promotion awaits an approval: (the sentence of those that tripped, why
    they could not be read: Prometheus down, a query error, no data, no server seen serving the
    candidate), each None when there is none. A read that failed trips nothing by itself: ``FailedReads`` counts
    them."""
    guards = guard_inputs(source, spec, now, since)
    unread = guards.unavailable or guards.missing or unserved(source, spec)
    return tripped(guards, GateConfig.from_spec(spec)), unread


def blind_while_waiting(source: MetricsSource | None, spec: RolloutSpec, since: float) -> str | None:
    """The spans of the last stage (from ``since``, its start) and of the wait for approval since
    in which the hard guards were blind (``watched_gaps``: Prometheus restarted without its
    storage, down), in one sentence for the decision's report; None when they watched it all.
    Said, not acted on: the guards' own reads decide."""
    guards = guard_inputs(source, spec, since=since)
    if not guards.unwatched:
        return None
    return (
        f"the hard guards were blind for {guards.unwatched_s:.0f} s of the last stage and the wait for approval "
        f"({utc_spans(guards.unwatched)}: Prometheus holds no sample of a server serving the candidate then, "
        "restarted without its storage, down, or the servers unscraped): a breach, a restart or shadow errors "
        "then were not seen"
    )


def unserved(source: MetricsSource | None, spec: RolloutSpec) -> str | None:
    """Why no model server is seen serving the candidate (none scraped reports it loaded: its
    pods crash-looping, evicted, gone), None when one is. The guards read over the whole stage
    hold their last data then, while the mesh answers the candidate's share 503."""
    if not isinstance(source, PrometheusSource):
        return None
    try:
        source.query(PromQL.loaded(spec.model, spec.candidate_version))
    except NoValuesFound:
        return f"no model server scraped reports version {spec.candidate_version} of {spec.model} loaded"
    except MetricsError as exc:
        return str(exc)
    return None


def replay_breach(spec: RolloutSpec, samples: pd.DataFrame, images: int) -> str | None:
    """The accuracy-drop guard on one replay round's samples (``StageJudge.replay_round``) of
    ``images`` images: the sentence of the trip, or of a round not answered whole by both
    versions (nothing then shows the candidate as accurate as the baseline); None when it held."""
    drop = replay_drop(samples, images)
    if drop is None:
        failed = int(samples["error"].sum()) if "error" in samples else 0
        return (
            f"the validation replay could not be judged: {failed} of {len(samples)} requests through "
            f"versions {spec.baseline_version} and {spec.candidate_version} failed"
        )
    return tripped(GuardInputs(validation_drop=drop), GateConfig.from_spec(spec))


@dataclass
class FailedReads:
    """The hard guards read while a promotion awaits its approval, as Argo Rollouts' analysis
    counts a measurement that errs (``consecutiveErrorLimit``) and Flagger a check without a
    result: a read that failed is counted, one that succeeded sets the count back to 0, and the
    ``limit``-th failed read in a row ends the wait as a tripped guard does (a candidate nobody
    can measure does not keep its traffic until an answer comes)."""

    limit: int
    count: int = 0

    def judge(self, breach: str | None, unread: str | None) -> str | None:
        """What ends the wait after one read: its breach, or the sentence of the failed reads
        once they reached ``limit`` in a row; None while the wait goes on."""
        if breach:
            return breach
        if unread is None:
            self.count = 0
            return None
        self.count += 1
        if self.count < self.limit:
            return None
        return f"the hard guards could not be read {self.count} times in a row (the last time: {unread})"


def _instant(source: PrometheusSource, promql: str, at: float | None) -> float:
    """``promql`` evaluated at ``at`` (Prometheus' clock), at its present without it."""
    return source.query(promql) if at is None else source.query(promql, at=at)


def _count(source: PrometheusSource, promql: str, at: float | None = None) -> int:
    """A count from ``increase()`` (evaluated at ``at``, ``_instant``): extrapolated, so
    fractional (0.9 is a request, not none), and MetricsError for what no count is (+Inf,
    negative)."""
    value = _instant(source, promql, at)
    if not math.isfinite(value) or value < 0:
        raise MetricsError(f"not a count: {value} for {promql}")
    return round(value)


def gpu_gauges(
    source: MetricsSource | None, model: str, version: str, window_s: float, now: float | None = None
) -> dict[str, float]:
    """The peaks over the last ``window_s`` of the GPUs that serve the version: utilization,
    memory used and total bytes (empty without GPUs)."""
    if not isinstance(source, PrometheusSource):
        return {}
    window = f"{max(math.ceil(window_s), 1)}s"
    gpu = {}
    for name, gauge in (
        ("utilization", "nv_gpu_utilization"),
        ("memory_used_bytes", "nv_gpu_memory_used_bytes"),
        ("memory_total_bytes", "nv_gpu_memory_total_bytes"),
    ):
        try:
            gpu[name] = source.query(PromQL.gpu_peak(gauge, model, version, window), at=now)
        except MetricsError:
            pass  # no GPU on this server: the gauges are absent, not zero
    return gpu


def settle_time(source: MetricsSource | None, settle_s: float = SETTLE_S, at: float | None = None) -> float:
    """How long after a look's time its records are all in the log: ``settle_s``, or the longest
    flush interval a model server reports (``prediction_log_flush_seconds``) and ``WRITE_S``
    when longer. A look judged before its records are in is judged again on more at the next
    poke: a look the sequential test does not count, which spends error rate it does not have.
    ``at``: a time gone by, on this machine's clock (a look judged again): the flush interval
    reported then; without it, now."""
    if not isinstance(source, PrometheusSource):
        return settle_s
    try:
        then = None if at is None else at + source.clock_offset_s()
        flush = _instant(source, "max(prediction_log_flush_seconds)", then)
    except MetricsError:
        return settle_s
    return max(settle_s, min(flush, 60.0) + WRITE_S) if math.isfinite(flush) else settle_s


def other_log(read: str, written: str | None, same_machine: bool) -> str | None:
    """Why the prediction log ``read`` is not the one a model server says it writes
    (``written``, a ``files.location``; None: it writes none), or None where they may be one:
    the same location, or where locations cannot tell: a folder of a server on another machine,
    or in a container, whose path is not this machine's (a volume mounted at another path: only
    a folder that exists here is compared), a folder beside an object store (a FUSE mount may
    be either)."""
    from model_server.files import location

    if written is None:
        return "it writes none (it was started without --prediction-log)"
    mine = location(read)
    if mine == written:
        return None
    local = mine.startswith("file://"), written.startswith("file://")
    if local[0] != local[1]:
        return None
    if all(local) and not (same_machine and Path(written.removeprefix("file://")).is_dir()):
        return None
    return f"it writes {written}"


def loopback(address: str) -> bool:
    """Whether ``host:port`` is this machine's (its folders' paths are the model server's)."""
    host = address.rsplit(":", 1)[0].strip("[]").lower()
    return host in ("localhost", "::1") or host.startswith("127.")


def log_elsewhere(server_address: str, prediction_log: str, token: str | None = None) -> str | None:
    """Why the log ``prediction_log`` is not the one the model server at ``server_address``
    (``host:port``) writes, by where the server says it writes (``other_log``; to the admin
    ``token``'s holder by default), at once rather than once a record should have come; None
    where they agree or it cannot tell (a server that does not say, to this caller or at all, or
    does not answer: what asks it next says why)."""
    from vision_rollout.serving import AdminError, ModelServerAdmin

    try:
        written = ModelServerAdmin(f"http://{server_address}", token, timeout_s=5.0).prediction_log()
    except AdminError:
        return None
    why = other_log(prediction_log, written, loopback(server_address))
    if why is None:
        return None
    return (
        f"the prediction log {Folder(prediction_log)} is not the one the model server at {server_address} "
        f"writes: {why}; set the connection's prediction_log to the log the model server writes (its "
        "--prediction-log)"
    )


@dataclass
class StageJudge:
    """One poke: the stage judged from the log and the guards, then a replay round when due."""

    spec: RolloutSpec
    server_address: str  # host:port of the serving path
    validation: Path
    prediction_log: str  # the log's URI
    source: MetricsSource | None = None
    settle_s: float = SETTLE_S
    replay_limit: int | None = None  # images per round (None: the whole validation set)
    _labels: dict[str, int] | None = None
    cache: Folder | None = None  # where the stage's reads are kept between pokes (logcache)
    silent_after_s: float | None = None  # a log still without a record this long into the stage fails it (log_silent)
    token: str | None = field(default=None, repr=False)  # the model server's admin token (log_elsewhere)
    read_s: float = POKE_READ_S  # a poke's read of the log begins no listing nor file after this (by read_clock)
    read_clock: Callable[[], float] = time.monotonic
    read_bytes: int = MAX_POKE_BYTES  # what a poke's read of the log may hold in memory (Arrow tables)
    # What the stage's judgements reckoned (``judge_stage``): this judge's across its calls (rolloutctl
    # run), or what the stage's record keeps, given to each poke's judge (the DAG: a process per poke).
    reckoned: Reckoned = field(default_factory=dict)

    @property
    def labels(self) -> dict[str, int]:
        if self._labels is None:
            self._labels = validation_labels(self.validation)
        return self._labels

    def replay_round(self) -> pd.DataFrame:
        """A round of the validation replay through both versions: its paired samples. A
        serving path that refuses or drops the connection (a model server restarting) is an
        OSError naming the path and the versions (the stage's failure and its rollback report
        quote it)."""
        from vision_rollout.replay import replay

        arms = {"baseline": self.spec.baseline_version, "canary": self.spec.candidate_version}
        try:
            return replay(
                self.server_address,
                self.spec.model,
                arms,
                self.validation,
                self.replay_limit,
                request_prefix=f"replay-{uuid.uuid4().hex[:12]}",
            )
        except OSError as exc:
            raise OSError(
                f"the validation replay of {self.spec.model} versions {self.spec.baseline_version} and "
                f"{self.spec.candidate_version} through {self.server_address} could not be sent: {exc}"
            ) from None

    def records(self, window: StageWindow, now: float) -> pd.DataFrame:
        from datetime import UTC, datetime

        from model_server.predictionlog import GATE_COLUMNS, read
        from vision_rollout.logcache import stage_records

        start, end = datetime.fromtimestamp(window.started, UTC), datetime.fromtimestamp(now + 1, UTC)
        deadline, clock = self.read_clock() + self.read_s, self.read_clock
        if self.cache is not None:
            return stage_records(
                self.cache,
                self.prediction_log,
                start,
                end,
                self.spec.model,
                GATE_COLUMNS,
                deadline,
                clock,
                max_bytes=self.read_bytes,
            )
        return read(
            self.prediction_log,
            start,
            end,
            model=self.spec.model,
            columns=GATE_COLUMNS,
            written=True,
            max_bytes=self.read_bytes,
            deadline=deadline,
            clock=clock,
        )

    def replay_due(self, records: pd.DataFrame, window: StageWindow, now: float) -> bool:
        """No replay round of this stage in the last look interval (the log says so, not memory:
        a retried or late poke sees what earlier pokes sent)."""
        if records.empty:
            return True
        sent = records[
            (records["route"] == "version")
            & records["image_sha256"].isin(list(self.labels))
            & records["version"].isin([self.spec.baseline_version, self.spec.candidate_version])
        ]
        t = _unix(sent["time"])
        return not bool(((t >= window.started) & (t > now - look_interval(self.spec))).any())

    def silent_after(self) -> float:
        """How long into a stage a log without a record of it is taken for another's: the longest
        flush (``MAX_FLUSH_S``, or longer where a model server reports it) and its write."""
        if self.silent_after_s is not None:
            return self.silent_after_s
        flush = math.nan
        if isinstance(self.source, PrometheusSource):
            with suppress(MetricsError):
                flush = self.source.query("max(prediction_log_flush_seconds)")
        return max(MAX_FLUSH_S, flush if math.isfinite(flush) else 0.0) + WRITE_S

    def log_silent(self, window: StageWindow, answered: pd.DataFrame) -> str | None:
        """Why the stage cannot be judged when, its weights applied ``silent_after()`` ago (the
        longest flush and its write: the earlier pokes' replay rounds had time to land) and this
        poke's replay round answered, the prediction log still holds no record of the model since
        the stage started once a flush and its write (``settle_time``) passed: the log read is not
        the one the model server writes (or it writes none), and the stage would wait out
        ``max_stage_seconds`` with the candidate holding its share. None once a record is there."""
        from vision_rollout.folders import Folder

        wait_s = settle_time(self.source, self.settle_s)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                if not self.records(window, time.time()).empty:
                    return None
            except OSError:  # (a log that cannot be listed holds the stage, as in a poke)
                return None
            if time.monotonic() >= deadline:
                break
            time.sleep(min(2.0, max(deadline - time.monotonic(), 0.0)))
        ok = int((answered["error"] == 0).sum())
        return (
            f"the prediction log {Folder(self.prediction_log)} holds no record of {self.spec.model} since the stage "
            f"started ({time.time() - window.started:.0f} s), the last of its validation replay rounds answered by "
            f"the model server {wait_s:.0f} s ago ({ok} of "
            f"{len(answered)} requests to versions {self.spec.baseline_version} and {self.spec.candidate_version}): "
            "it is not the log the model server writes (where its metadata could not tell: check its "
            '--prediction-log argument, and that prediction_log_records_total{outcome="written"} grows on '
            "its /metrics), so no look could judge the stage."
        )

    def __call__(self, window: StageWindow, now: float | None = None) -> StageState:
        """Judge the looks due, then send a replay round if none went out in the last look
        interval. A log that cannot be listed (its store down, refusing) holds the stage as a
        file it cannot read does; no replay round goes out meanwhile."""
        now = now or time.time()
        listed = True
        try:
            records = self.records(window, now)
        except OSError as exc:
            listed = False
            records = pd.DataFrame(columns=["time", "model", "version", "role", "route", "request_id", "item"])
            records.attrs["skipped_file_reasons"] = {str(Folder(self.prediction_log)): f"not listed: {exc}"}
        # (at once, not a flush and a replay round later as log_silent: where the server says)
        elsewhere = (
            log_elsewhere(self.server_address, self.prediction_log, self.token) if listed and records.empty else None
        )
        if elsewhere:
            why = f"{elsewhere}, so no look could judge the stage."
            state = StageState("breach", 0, self.spec.looks_per_stage, None, why, {}, now - window.started)
        else:
            state = judge_stage(
                self.spec,
                window,
                records,
                self.labels,
                now,
                guard_inputs(self.source, self.spec, now, since=window.started),
                settle_s=settle_time(self.source, self.settle_s),
                replay_images=min(self.replay_limit or len(self.labels), len(self.labels)),
                evidence_s=self.settle_s,
                reckoned=self.reckoned,
            )
        if not state.done and listed and self.replay_due(records, window, now):
            answered = self.replay_round()
            # (requests a proxy refused before the server saw them leave no record either way)
            answered_any = answered is not None and "error" in answered and bool((answered["error"] == 0).any())
            if records.empty and answered_any and now - window.started >= self.silent_after():
                if silent := self.log_silent(window, answered):
                    state = StageState("breach", 0, self.spec.looks_per_stage, None, silent, {}, now - window.started)
        if state.done and self.cache is not None:
            from datetime import UTC, datetime

            from model_server.predictionlog import GATE_COLUMNS
            from vision_rollout.logcache import forget

            start = datetime.fromtimestamp(window.started, UTC)
            forget(self.cache, self.prediction_log, start, self.spec.model, GATE_COLUMNS)
        return state


# -- the final report's chart: the deciding stage's evidence ----------------------------------


def deciding_stage(spec: RolloutSpec, verdicts: Sequence[Mapping[str, Any] | None]) -> int | None:
    """The index of the stage that rolled the candidate back, as the rollback's report names it:
    the first of ``verdicts`` (per stage, its verdict as a dict, or None: a hard guard's breach,
    a stage not reached) that is not a pass. None where every stage given passed."""
    return next(
        (
            index
            for index, (_, verdict) in enumerate(zip(spec.stages, verdicts, strict=False))
            if not isinstance(verdict, Mapping) or verdict.get("decision") != "pass"
        ),
        None,
    )


class NoLookJudged(LookupError):
    """The stage a final report names ended before a look was judged, or has no verdict: no
    evidence of it to chart."""


def deciding_look(
    spec: RolloutSpec, verdicts: Sequence[Mapping[str, Any] | None], decided: bool = False
) -> tuple[StageWindow, float, Mapping[str, Any]] | None:
    """The stage that decided of ``verdicts`` (per stage, its verdict as a dict, or None): the
    first not a pass (``deciding_stage``), else the last judged. Its window, the evidence time of
    the look its verdict is of (its ``bake``'s ``window`` and ``until``, as its wait kept them),
    and the verdict. NoLookJudged where the first stage not a pass had no look judged (a stage
    ended at look 0), or has no verdict (a hard guard's breach, a stage not reached or not ended,
    one failed on its candidate's file changing): never an earlier stage's, which passed. None
    where no stage has a verdict (a run ended before its first), unless ``decided`` (the report
    names the stage that decided, ``deciding_stage``: the first, a hard guard's breach, say, has
    no verdict), or had a look judged, or where the stage does not say when (a verdict of an
    earlier version)."""
    stages = verdicts[: len(spec.stages)]
    if not decided and not any(isinstance(v, Mapping) for v in stages):
        return None
    if (index := deciding_stage(spec, verdicts)) is None:
        judged = [i for i, v in enumerate(stages) if isinstance(v, Mapping) and v.get("look")]
        if not judged:
            return None
        index = judged[-1]
    verdict = verdicts[index]
    if not isinstance(verdict, Mapping):
        raise NoLookJudged(f"the {spec.stages[index]}% stage has no verdict")
    if not verdict.get("look"):
        raise NoLookJudged(f"the {spec.stages[index]}% stage ended before a look was judged")
    bake = verdict.get("bake")
    times = [bake.get("window"), bake.get("until")] if isinstance(bake, Mapping) else []
    found = [float(t) for t in times if isinstance(t, (int, float)) and math.isfinite(t)]
    if len(found) < 2:
        return None
    return StageWindow(index, spec.stages[index], found[0]), found[1], verdict


def judged_samples(
    spec: RolloutSpec,
    prediction_log: str,
    validation: Path,
    window: StageWindow,
    until: float,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    max_bytes: int = MAX_POKE_BYTES,
) -> pd.DataFrame:
    """The samples the stage's look at ``until`` judged its latency on, read from the log as a poke
    reads them (bounded by ``max_bytes`` and ``deadline``, a ``clock()``): the live A/B arms below
    100%, the validation replay at 100% (``StageWindow.latency_from``), a replayed image's first
    answer per version its accuracy evidence (as the paired check counts it). Their ``arm``,
    ``latency_ms`` and ``correct`` only: nothing else of a request (no id, tenant, image).
    OSError where the stage's records cannot be read whole (the log not listed, files skipped,
    the read cut short by its time or its memory bound)."""
    from datetime import UTC

    from model_server.predictionlog import GATE_COLUMNS, read

    # (a file written after ``until`` holds no evidence of its look: ``available``)
    records = read(
        prediction_log,
        datetime.fromtimestamp(window.started, UTC),
        datetime.fromtimestamp(until + 1, UTC),
        model=spec.model,
        columns=GATE_COLUMNS,
        threads=1,  # (in this thread: a read that stalls holds no worker that interpreter exit joins)
        written=True,
        max_bytes=max_bytes,
        deadline=deadline,
        clock=clock,
    )
    if (partial := read_in_part(records)) is not None:
        raise OSError(partial)
    if skipped := records.attrs.get("skipped_file_reasons"):
        path, reason = next(iter(skipped.items()))
        raise OSError(f"{len(skipped)} prediction log file(s) of the stage cannot be read ({path}: {reason})")
    labels = validation_labels(validation) if window.latency_from == "replay" else {}
    samples = stage_samples(records, spec, window, until, labels)
    samples = samples[samples["source"] == window.latency_from].sort_values("time", kind="stable")
    repeat = samples["pair_id"].notna() & samples.duplicated(["pair_id", "arm"])
    return samples.assign(correct=samples["correct"].mask(repeat))[["arm", "latency_ms", "correct"]]


# -- the decision: promote or roll back (the DAG's decide task and rolloutctl run) ------------


def judge_evidence(
    spec: RolloutSpec,
    verdicts: Sequence[Mapping[str, Any] | None],
    audit: Mapping[str, Any] | None,
    failures: Sequence[str | None] | None = None,
) -> tuple[str, str]:
    """What the evidence says, ("promote" | "rollback", why): promote only when every planned
    stage passed and, with a mirror, the shadow audit showed the candidate agrees with the
    primary (``pass``: an audit that fails, is inconclusive, found no shadow record or did not
    run rolls back, as the form's "must be shown" says). ``verdicts``: per stage, its verdict as
    a dict (``decision``, ``summary``) or None; ``audit``: the shadow audit's ``to_dict()`` or
    None; ``failures``: per stage, why its wait failed (a tripped guard, never ready)."""
    failures = failures or []
    for i, (weight, verdict) in enumerate(zip(spec.stages, verdicts, strict=False)):
        if verdict is None:
            if i < len(failures) and failures[i]:  # its wait ended it: a tripped guard, never ready
                return "rollback", f"the {weight}% stage: {failures[i]}"
            return "rollback", f"the {weight}% stage produced no verdict: a step failed or was interrupted"
        if verdict["decision"] != "pass":
            return "rollback", f"the {weight}% stage: {verdict['summary']}"
    if len(verdicts) < len(spec.stages):
        return "rollback", f"the {spec.stages[len(verdicts)]}% stage produced no verdict: it did not run"
    if audit is not None and audit.get("verdict") == "fail":
        return "rollback", "shadow audit failed: " + "; ".join(audit.get("reasons", []))
    if spec.mirror_percent > 0 and (audit is None or audit.get("verdict") != "pass"):
        why = "; ".join(audit.get("reasons", [])) if audit else "the audit did not run"
        return "rollback", f"shadow audit did not show the candidate agrees with the primary: {why}"
    restarted = [
        f"{weight}% ({v['attempts']} attempts)"
        for weight, v in zip(spec.stages, verdicts, strict=False)
        if v and int(v.get("attempts") or 1) > 1
    ]
    again = (
        f" (its test restarted on request: {', '.join(restarted)}; each attempt a fresh test at level {spec.alpha:g})"
        if restarted
        else ""
    )
    return "promote", f"every stage passed{again}" + (f"; shadow audit: {'; '.join(audit['reasons'])}" if audit else "")


def mirrors_candidate(spec: RolloutSpec, router: Router) -> bool:
    """Whether ``router``'s routes mirror to the candidate now (True where they cannot be read)."""
    from vision_rollout.mesh import RouterError

    try:
        mirror = router.get_routes().mirror
    except RouterError as exc:
        log.warning("the routes of '%s' could not be read (%s): taken as mirroring", spec.model, exc)
        return True
    return mirror is not None and mirror.version == spec.candidate_version


def rollout_audit(
    prediction_log: str | Path, start: datetime, end: datetime, spec: RolloutSpec, mirroring: bool
) -> AuditResult:
    """A rollout's shadow audit of its records from ``start`` to ``end``, the DAG's
    shadow_consistency's and ``rolloutctl run``'s: where the routes still mirror to the candidate
    (``mirroring``), once the copies of the last primaries are written (``await_copies``: until
    the range closes at most); the spec's limits, the copies judged against its mirror share
    (and a mirror that stopped sending told from a quiet one only where it is still on: taken
    off, when is not known)."""
    from vision_rollout.audit import AuditConfig, audit, await_copies

    if spec.mirror_percent and mirroring:
        waited = await_copies(prediction_log, end, spec.model, spec.baseline_version)
        log.info("waited %.0f s for the shadow copies of the primaries before %s to be written", waited, end)
    return audit(
        prediction_log,
        start,
        end,
        spec.model,
        AuditConfig.from_spec(spec),
        mirror_percent=spec.mirror_percent,
        mirror_on_to_end=mirroring,  # (taken off since: when, it does not say)
    )


def rollout_audit_s() -> int:
    """The longest ``rollout_audit`` takes, in whole seconds: its wait for the copies
    (``await_copies``: to the range's close, ``copy_due`` after its end, the range ending as it
    starts) and its reads (``MAX_AUDIT_S``). A lease held across it (the DAG's
    shadow_consistency, ``rolloutctl run``'s audit) is held for ``LEASE_S`` beyond it: the
    report, and the next step's start."""
    from vision_rollout.audit import MAX_AUDIT_S, copy_due

    return math.ceil(copy_due().total_seconds() + MAX_AUDIT_S)


# -- the whole rollout in one process (rolloutctl run) ---------------------------------------


@dataclass
class StageOutcome:
    weight: int
    decision: str  # pass | fail
    reason: str
    looks: int
    seconds: float
    verdict: Verdict | None = None


@dataclass
class RolloutResult:
    promoted: bool
    stages: list[StageOutcome]
    reason: str
    audit: AuditResult | None = None  # the shadow audit, once every stage passed


class Rollout:
    """Stages in order, each poked every look interval until it ends; once all passed, the shadow
    audit of the rollout's records (``audit(start, end)``), and the decision the DAG takes on the
    same evidence (``judge_evidence``): with a mirror, no audit (or one that did not pass) rolls
    back. Every way out of a failed or interrupted rollout puts the stable version back at 100%.
    ``changed``: why the candidate served is not the one verified (``serving.not_as_verified``),
    None when it is; asked before each stage's weights, at each look and before promoting, as the
    DAG's steps do: a stage fails on it, a promotion does not happen."""

    def __init__(
        self,
        spec: RolloutSpec,
        router: Router,
        look: Callable[[StageWindow], StageState],
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        on_stage: Callable[[StageOutcome], None] | None = None,
        poke_s: float | None = None,
        audit: Callable[[float, float], AuditResult] | None = None,
        changed: Callable[[], str | None] = lambda: None,
    ):
        self.spec, self.router, self.look = spec, router, look
        self.clock, self.sleep, self.on_stage = clock, sleep, on_stage
        self.poke_s = poke_s if poke_s is not None else poke_interval(spec)
        self.audit = audit
        self.changed = changed

    def promote(self) -> None:
        """100% candidate, mirror off."""
        self.router.set_routes(self.spec.promoted_policy())

    def restore_stable(self) -> None:
        restore_stable(self.spec, self.router)

    def stage(self, index: int, weight: int) -> StageOutcome:
        if changed := self.changed():
            return StageOutcome(weight, "fail", f"{changed}; no more weight moves to it", 0, 0.0, None)
        self.router.set_routes(self.spec.policy_for_stage(weight))
        window = StageWindow(index, weight, self.clock())
        while not (changed := self.changed()) and not (state := self.look(window)).done:
            log.info("stage %d%%: %s", weight, state.reason)
            self.sleep(self.poke_s)
        if changed:  # (its share served by bytes no check saw)
            reason = f"{changed}; the stage's evidence is not of the file verified"
            return StageOutcome(weight, "fail", reason, 0, self.clock() - window.started, None)
        decision = "pass" if state.status == "pass" else "fail"
        return StageOutcome(weight, decision, state.reason, state.look, self.clock() - window.started, state.verdict)

    def shadow_audit(self, start: float) -> AuditResult | None:
        """The audit of the records since ``start``; None when it could not run (the DAG's
        shadow_consistency failing: its decision rolls back a rollout with a mirror). The lease's
        word on the way (``LockLost``, ``Aborted``: the audit renews it first) is the run's, not
        the audit's failure: raised."""
        if self.audit is None:
            return None
        try:
            return self.audit(start, self.clock())
        except (LockLost, Aborted):
            raise
        except Exception:
            log.exception("the shadow audit could not run")
            return None

    def run(self) -> RolloutResult:
        outcomes: list[StageOutcome] = []
        started = self.clock()
        promoting = False
        self.router.reconcile()
        try:
            for index, weight in enumerate(self.spec.stages):
                outcome = self.stage(index, weight)
                outcomes.append(outcome)
                if self.on_stage is not None:
                    self.on_stage(outcome)
                if outcome.decision != "pass":
                    self.restore_stable()
                    return RolloutResult(False, outcomes, f"stage {weight}%: {outcome.reason}")
            audit = self.shadow_audit(started)
            verdicts = [{"decision": o.decision, "summary": o.reason} for o in outcomes]
            decision, reason = judge_evidence(self.spec, verdicts, None if audit is None else audit.to_dict())
            if decision == "promote" and (changed := self.changed()):
                decision, reason = "rollback", f"{changed}; version {self.spec.candidate_version} is not promoted"
            if decision != "promote":
                self.restore_stable()
                return RolloutResult(False, outcomes, reason, audit)
            promoting = True
            self.promote()
            return RolloutResult(True, outcomes, reason, audit)
        except BaseException as exc:
            if isinstance(exc, LockLost):  # another run holds the model now: its routes are not ours
                log.error("rollout stopped: %s", exc)
                raise
            if promoting and not isinstance(exc, Exception):  # a signal once promotion was decided
                log.warning("rollout stopped (%s) while promoting: the promotion is carried out", exc)
                self.promote()
                raise
            if isinstance(exc, Aborted):
                log.warning("rollout stopped (%s): restoring the stable version", exc)
            elif isinstance(exc, Exception):
                log.exception("rollout interrupted: restoring the stable version")
            else:  # a signal, Ctrl-C: where it landed is no news
                log.warning("rollout stopped (%s): restoring the stable version", exc or type(exc).__name__)
            self.restore_stable()
            raise


def restore_stable(spec: RolloutSpec, router: Router) -> bool:
    """The rollback: the baseline at 100%, no mirror (``rolloutctl abort`` calls it too); True
    when it wrote."""
    return router.set_routes(spec.stable_policy())


def poke_interval(spec: RolloutSpec) -> float:
    """How often a stage is poked: every look interval, but at least every 10 s (the hard guards)
    and at most every 2 s."""
    return min(10.0, max(2.0, look_interval(spec)))
