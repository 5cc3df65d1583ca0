"""Shadow audit: how the candidate (shadow) answered the same requests as the primary.

From the prediction log's primary and shadow records over a time range, paired by request id
and input (a shadow record of another input than its primary's is no copy of it: left out;
nor is a copy of a request its own version served, which Istio's mirror makes: counted apart;
nor a pair whose primary's answer is no finite distribution, a NaN or Inf input's: counted apart;
a shadow answering another output dtype or shape than its primary disagrees, and is an anomaly):
top-1 agreement with a Wilson interval (the items of a batch request one unit: its counts
divided by the requests' design effect), the KL divergence of the mean output distributions and
the distribution of per-request divergences,
the primary-vs-shadow confusion matrix, anomaly samples (shadow confidence below 0.65, or
divergence above 0.18: the defaults; low confidence only where the primary's was not) with their image hashes, and the shadow error
rate; a Markdown report, CSV tables and a PNG plot, and a verdict: fail when agreement is shown
below the minimum (or the shadow fails or diverges too often), pass when shown above it,
inconclusive while the interval still straddles it (or while files of the range could not be
read: their records are missing, or no shadow record of it pairs with its primary), skip when
the range holds no records.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import signal, stats

from vision_rollout.folders import Folder
from vision_rollout.gates import cluster_sums, design_effect, limit_percent, percent_beside
from vision_rollout.settings import RUN_REPORT
from vision_rollout.spec import DEFAULTS, RolloutSpec

log = logging.getLogger(__name__)

EPS = 1e-6
OUTPUT_DIFFERS = "output dtype or shape differs"  # (an anomaly's reason)


@dataclass(frozen=True)
class AuditConfig:
    """The audit's limits (their defaults a ``RolloutSpec``'s; ``from_spec`` for a rollout) and
    what makes an answer an anomaly."""

    min_agreement: float = DEFAULTS.shadow_agreement_min  # the interval's lower end must reach it
    max_shadow_error_rate: float = DEFAULTS.shadow_error_rate_max
    max_anomaly_rate: float = DEFAULTS.shadow_anomaly_rate_max
    confidence_threshold: float = 0.65
    divergence_threshold: float = 0.18
    confidence_level: float = 0.95
    max_anomalies: int = 50  # samples kept in the report

    @classmethod
    def from_spec(cls, spec: RolloutSpec) -> AuditConfig:
        return cls(
            min_agreement=spec.shadow_agreement_min,
            max_shadow_error_rate=spec.shadow_error_rate_max,
            max_anomaly_rate=spec.shadow_anomaly_rate_max,
        )


@dataclass
class AuditResult:
    model: str | None
    start: str
    end: str
    verdict: str  # pass | fail | inconclusive (agreement not resolved yet, or unread files) | skip (no records)
    reasons: list[str]
    rows: int = 0
    shadow_errors: int = 0
    shadow_error_rate: float = 0.0
    agreement: float | None = None
    agreement_ci: tuple[float, float] | None = None
    kl_of_means: float | None = None
    divergence_quantiles: dict[str, float] = field(default_factory=dict)
    anomaly_rate: float | None = None
    versions: dict[str, list[str]] = field(default_factory=dict)
    confusion: pd.DataFrame | None = None
    anomalies: pd.DataFrame | None = None
    divergences: np.ndarray | None = None
    # What did not pair in the prediction log (set by audit()): shadow records without their
    # primary, primaries of a mirrored version without a shadow record (an upper bound when the
    # mirror samples under 100%), copies the in-process mirror dropped, shadow records whose
    # input differs from their primary's (not a mirror copy of it: excluded), and the items
    # mirrored to the version that served them (Istio mirrors the whole weighted route, the
    # candidate's own share too: no comparison, excluded; expected, not a warning).
    shadow_without_primary: int = 0
    primary_without_shadow: int = 0
    # Copies against the mirror's sampling (``copy_check``): the primaries the server's own
    # mirror sampled (``mirrored`` true) without any shadow record written by the range's close
    # (copies lost, exactly, whenever the audit runs: one whose copy came later, ``lost_late``, is
    # lost, never among ``late_records`` nor a later range's ``late_earlier`` too); and
    # behind a mirror that samples on its own (Istio's: ``mirrored`` null), the primaries of the
    # stretch its copies show it on, those of them with a copy, the configured share, and the
    # one-sided binomial p-value of so few copies (None where not tested: no share configured,
    # or no copy to show the stretch). A shortfall is a warning, not the candidate's failure.
    copies_lost: int = 0
    copies_eligible: int = 0
    copies_received: int = 0
    copies_percent: float | None = None
    copies_p: float | None = None
    # Where the mirror stopped sending (``mirror_stopped``): the time of its last copy, when the
    # primaries after it, at the share configured then, would have sent copies beyond chance.
    mirror_stopped: str | None = None
    # The range's primaries a mirror could have sampled (each request's first, answered, not
    # naming its version, nor said unsampled by the server's own mirror: ``mirrored`` not false).
    # A model's range of such primaries without a shadow record, a mirror configured, is a warning
    # in an audit of every model too (``audit``), as in its own (``with_coverage``), where they are
    # more than the mirror's sampling explains; without them (an idle model) a skip.
    primaries_mirrorable: int = 0
    # With the mirror's share asserted, the one share at which those primaries make no copy at all
    # as likely as each at its time's share does (``share_at``: none where no sample, the mirror
    # off): what ``with_coverage`` tests silence at, not the range's largest share.
    mirrorable_percent: float | None = None
    shadow_dropped: int = 0
    input_mismatch: int = 0
    self_pairs: int = 0
    # Records repeating an earlier one's key (a client re-sending its request id, a copy made
    # twice): the earliest is paired, the repeats are no second piece of evidence (left out).
    duplicates: int = 0
    # Pairs whose primary failed (a request cut by the client's timeout, a fault; a retry's first
    # attempt beside the retry compared): no answer to compare with, left out.
    primary_failed: int = 0
    # Pairs whose shadow answered another dtype or shape of output than its primary (FP16 for
    # FP32, 12 classes for 10): disagreements and anomalies, no divergence computed on them.
    output_differs: int = 0
    # Answers that were no finite distribution (NaN or Inf: a client's NaN or Inf input runs,
    # its output is NaN): pairs whose primary answered so are no comparison (left out, counted);
    # the shadow's alone, where the primary's was finite, are the candidate's (anomalies).
    primary_not_finite: int = 0
    shadow_not_finite: int = 0
    # Prediction log files of the range that could not be read (truncated, another schema):
    # their records are not in the audit, which then shows nothing (inconclusive at best).
    skipped_files: int = 0
    # Files of the range left unread once the records read reached the audit's bound
    # (``MAX_AUDIT_BYTES``), and their bytes in storage: their records are not in the audit.
    unread_files: int = 0
    unread_bytes: int = 0
    # Hour folders of the range left unlisted, and whether the files and folders left were left
    # because the audit's time (``MAX_AUDIT_S``) was spent rather than its memory bound.
    unlisted_folders: int = 0
    out_of_time: bool = False
    # Hour folders holding more files than a read lists (``MAX_LISTED_FILES``): listed in part.
    crowded_folders: int = 0
    malformed_records: int = 0  # (and records of the files read that could not be: read's skipped_records)
    # Records of the range in files written after it closed (``closes``: a flush slower than
    # ``MAX_FLUSH_S``, a clock ahead by more than ``CLOCK_SKEW_S``): left out, whenever the audit
    # runs, so a retry or a later run shows what the first one did; and (``earlier_hours``) those
    # of the ranges before it whose files came after theirs closed, by this one's close.
    late_records: int = 0
    late_earlier: int | None = None
    # Files of the ranges before it (``earlier_hours``) that could not be read (truncated, a name
    # refused): their records are not in ``late_earlier``, which then says "at least".
    earlier_skipped_files: int = 0
    # Pairs of versions of the range beyond ``MAX_VERSION_PAIRS`` (the fewest records), and
    # their records: not audited (``audit_by_versions``).
    pairs_left_out: int = 0
    records_left_out: int = 0
    config: AuditConfig = field(default_factory=AuditConfig)  # the limits it was judged against
    # A range holding the pairs of more than one pair of versions (two rollouts within it: a
    # candidate rolled back or promoted, then the next one shadowed): each pair's audit apart,
    # in the order of their first records; the range's own numbers are then only its counts.
    by_versions: list[AuditResult] = field(default_factory=list)
    # An audit of every model (``audit`` without one) of a range holding several: each model's
    # own audit (``by_models``), the worst verdict, their reasons and counts.
    by_models: list[AuditResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        apart = ("confusion", "anomalies", "divergences", "by_versions", "by_models")
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in apart}
        d["reasons"] = list(self.reasons)
        d["config"] = asdict(self.config)
        d["versions"] = {k: [shown(x) for x in v] for k, v in self.versions.items()}
        d["divergence_quantiles"] = dict(self.divergence_quantiles)
        d["agreement_ci"] = list(self.agreement_ci) if self.agreement_ci else None
        d["anomalies"] = 0 if self.anomalies is None else len(self.anomalies)
        if self.by_versions:
            d["by_versions"] = [part.to_dict() for part in self.by_versions]
        if self.by_models:
            d["by_models"] = [part.to_dict() for part in self.by_models]
        return d

    @property
    def pair_name(self) -> str:
        """The pair of versions audited: "primary 1, shadow 2" (versions joined by commas where
        the result holds several)."""
        primary, shadow = (", ".join(map(shown, self.versions[k])) for k in ("primary", "shadow"))
        return f"primary {primary}, shadow {shadow}"


def _normalise(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, None)
    return p / p.sum(axis=-1, keepdims=True)


def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) along the last axis, after smoothing zeros."""
    p, q = _normalise(p), _normalise(q)
    return np.sum(p * np.log(p / q), axis=-1)


def wilson(successes: float, n: float, level: float) -> tuple[float, float]:
    z = float(stats.norm.isf((1 - level) / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def by_request(rows: pd.DataFrame, hits: np.ndarray, level: float) -> tuple[float, float]:
    """The Wilson interval of the share of ``hits`` among ``rows``, whose items come by request
    (``request_id``): the items of a batch request (one client's images, often alike) are no
    independent pairs, so the counts are divided by the design effect of the requests
    (``gates.design_effect``). Counted as independent, 93 of 100 requests of 8 agreeing read as
    shown above 90% agreement."""
    by = (
        pd.DataFrame({"request": rows["request_id"].to_numpy(), "hit": hits})
        .groupby("request", sort=False, dropna=False)["hit"]
        .agg(["sum", "count"])
    )
    effect = design_effect(cluster_sums(by["sum"].to_numpy(float), by["count"].to_numpy(float)))
    return wilson(float(hits.sum()) / effect, len(hits) / effect, level)


CHUNK_VALUES = 4_000_000  # probabilities a chunk of _stacked holds: 32 MB in float64


def _stacked(pairs: pd.DataFrame) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The vector columns of ``pairs`` (``primary_probs``, ``shadow_probs``) as matrices, a chunk
    of rows at a time."""
    p_rows, q_rows = pairs["primary_probs"].to_numpy(), pairs["shadow_probs"].to_numpy()
    step = max(1, CHUNK_VALUES // max(len(p_rows[0]), 1))
    for i in range(0, len(p_rows), step):
        yield np.stack(p_rows[i : i + step]), np.stack(q_rows[i : i + step])


def _divergences(
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per pair KL(primary || shadow), the primary's and the shadow's confidence (each one's top
    probability), and the mean distribution of each side, from the pairs' vectors a chunk at a
    time: an hour of a thousand-class model's pairs, stacked whole in float64, took tens of GB."""
    div: list[np.ndarray] = []
    confidence: list[np.ndarray] = []  # (primary, shadow) a row
    total: np.ndarray | None = None  # (the sums of each side's vectors)
    for p32, q32 in chunks:
        p, q = p32.astype(float), q32.astype(float)
        div.append(kl(p, q))
        confidence.append(np.stack([p.max(axis=1), q.max(axis=1)], axis=1))
        sums = np.stack([p.sum(axis=0), q.sum(axis=0)])
        total = sums if total is None else total + sums
    assert total is not None  # (audit_frame passes rows)
    mean_p, mean_q = total / sum(len(d) for d in div)
    both = np.concatenate(confidence)
    return np.concatenate(div), both[:, 0], both[:, 1], mean_p, mean_q


def audit_frame(
    df: pd.DataFrame,
    config: AuditConfig | None = None,
    model: str | None = None,
    start: str = "",
    end: str = "",
    vectors: Callable[[pd.DataFrame], Iterable[tuple[np.ndarray, np.ndarray]]] | None = None,
) -> AuditResult:
    """The audit of shadow pairs (``shadow_pairs``); ``vectors`` gives the probability vectors of
    some of its rows in chunks, when ``df`` holds none (by default: its vector columns)."""
    cfg = config or AuditConfig()
    if df.empty:
        return AuditResult(model, start, end, "skip", ["no shadow records in this range: nothing to audit"])
    errors = df["shadow_error"].notna()
    ok = df[~errors]
    result = AuditResult(
        model,
        start,
        end,
        "pass",
        [],
        rows=len(df),
        config=cfg,
        shadow_errors=int(errors.sum()),
        shadow_error_rate=float(errors.mean()),
        versions={"primary": sorted(df["primary_version"].unique()), "shadow": sorted(df["shadow_version"].unique())},
    )
    if ok.empty:
        result.verdict = "fail"
        result.reasons.append(f"every one of {len(df)} shadow requests failed")
        return result
    # A shadow answer that is no finite distribution where the primary's is (the candidate's
    # NaN or Inf) is no comparison: out of the agreement and the divergences, an anomaly. One of
    # another dtype or shape than the primary's is another answer: a disagreement, an anomaly,
    # out of the divergences (its vector compares with nothing).
    finite = ok["shadow_finite"].to_numpy(bool) if "shadow_finite" in ok.columns else np.ones(len(ok), bool)
    differs = ok["output_differs"].to_numpy(bool) if "output_differs" in ok.columns else np.zeros(len(ok), bool)
    result.shadow_not_finite = int((~finite).sum())
    result.output_differs = int(differs.sum())
    answered = ok[finite]
    if answered.empty:
        result.verdict = "fail"
        result.reasons.append(f"none of the shadow's {len(ok)} answers was a finite distribution (NaN or Inf)")
        return result
    same = finite & ~differs
    compared = ok[same]
    agree = (answered["primary_top1"].to_numpy() == answered["shadow_top1"].to_numpy()) & ~differs[finite]
    result.agreement = float(agree.mean())
    result.agreement_ci = by_request(answered, agree, cfg.confidence_level)
    confidence = np.full(len(ok), np.nan)
    divergence = np.full(len(ok), np.inf)
    # (a shadow as unsure as its primary answers the input as the baseline does: no anomaly)
    primary_sure = np.zeros(len(ok), bool)
    if not compared.empty:
        div, primary_confidence, shadow_confidence, mean_primary, mean_shadow = _divergences(
            (vectors or _stacked)(compared)
        )
        result.kl_of_means = float(kl(mean_primary, mean_shadow))
        result.divergences = div
        result.divergence_quantiles = {f"p{q}": float(np.quantile(div, q / 100)) for q in (50, 90, 95, 99)}
        result.divergence_quantiles["max"] = float(div.max())
        confidence[same] = shadow_confidence
        primary_sure[same] = primary_confidence >= cfg.confidence_threshold
        divergence[same] = div
        labels = sorted(set(compared["primary_top1"]) | set(compared["shadow_top1"]))
        result.confusion = pd.crosstab(
            compared["primary_top1"], compared["shadow_top1"], rownames=["primary"], colnames=["shadow"]
        ).reindex(index=labels, columns=labels, fill_value=0)
    low_conf = same & primary_sure & (confidence < cfg.confidence_threshold)
    high_div = same & (divergence > cfg.divergence_threshold)
    flagged = low_conf | high_div | ~same
    result.anomaly_rate = float(flagged.mean())
    reason = np.where(
        ~finite,
        "no finite output",
        np.where(
            differs,
            OUTPUT_DIFFERS,
            np.where(
                low_conf & high_div,
                "low confidence and high divergence",
                np.where(low_conf, "low confidence", "high divergence"),
            ),
        ),
    )
    anomalies = ok.assign(shadow_confidence=confidence, divergence=divergence, reason=reason)[flagged]
    result.anomalies = (
        anomalies.sort_values("divergence", ascending=False)[
            [
                "time",
                "request_id",
                "item",
                "image_sha256",
                "primary_version",
                "shadow_version",
                "primary_top1",
                "shadow_top1",
                "shadow_confidence",
                "divergence",
                "reason",
            ]
        ]
        .head(cfg.max_anomalies)
        .reset_index(drop=True)
    )

    lo, hi = result.agreement_ci
    minimum = limit_percent(cfg.min_agreement)
    agreement = agreement_text(result.agreement, result.agreement_ci, cfg.min_agreement)
    if hi < cfg.min_agreement:
        result.verdict = "fail"
        result.reasons.append(f"{agreement} is shown below {minimum}%")
    elif lo < cfg.min_agreement:
        result.verdict = "inconclusive"
        result.reasons.append(f"{agreement} is not yet shown above {minimum}% ({len(ok)} records)")
    error_rate = percent_beside(result.shadow_error_rate, cfg.max_shadow_error_rate, 3)
    if result.shadow_error_rate > cfg.max_shadow_error_rate:
        result.verdict = "fail"
        result.reasons.append(f"shadow error rate {error_rate}% is above {limit_percent(cfg.max_shadow_error_rate)}%")
    anomaly_rate = percent_beside(result.anomaly_rate, cfg.max_anomaly_rate, 1)
    if result.anomaly_rate > cfg.max_anomaly_rate:
        # Failed only once the rate is shown above the limit: one odd probe is not a trend.
        low = by_request(ok, flagged, cfg.confidence_level)[0]
        over = low > cfg.max_anomaly_rate
        result.verdict = "fail" if over else ("inconclusive" if result.verdict == "pass" else result.verdict)
        result.reasons.append(
            f"{anomaly_rate}% of requests are anomalies (limit "
            f"{limit_percent(cfg.max_anomaly_rate)}%{'' if over else f', not yet shown over {len(flagged)} records'})"
        )
    if result.verdict == "pass":
        result.reasons.append(f"{agreement}, shadow error rate {error_rate}%, anomalies {anomaly_rate}%")
    if result.shadow_not_finite:
        result.reasons.append(
            f"{result.shadow_not_finite} shadow answers were no finite distribution (NaN or Inf) where the "
            "primary's was: anomalies, out of the agreement and the divergences"
        )
    if result.output_differs:
        kinds = (ok["primary_output"].astype(str) + "\0" + ok["shadow_output"].astype(str))[differs].value_counts()
        primary, shadow = (shown(k) for k in kinds.index[0].split("\0"))
        result.reasons.append(
            f"{result.output_differs} pairs' outputs differ in dtype or shape (primary {primary}, shadow {shadow}"
            f"{f'; {len(kinds) - 1} other kinds' if len(kinds) > 1 else ''}): the shadow answers otherwise, "
            "counted as disagreements and anomalies, no divergence computed on them"
        )
    return result


VERDICT_ORDER = ("fail", "inconclusive", "warning", "pass", "skip")  # the worst first
# Pairs of versions audited in one range, those with the most records (a rollout's range holds
# one or two; a log naming thousands of versions made thousands of audits, sections and blocks).
MAX_VERSION_PAIRS = 20


def version_pairs(df: pd.DataFrame, limit: int | None = None) -> tuple[list[pd.DataFrame], int, int]:
    """The rows of ``df`` (shadow pairs) by pair of versions (primary, shadow), in the order of
    their first rows (``shadow_pairs`` gives them in time order): of more than ``limit`` pairs,
    the ``limit`` with the most rows (the first of equals); and how many pairs were left out,
    and their rows."""
    if df.empty:
        return [], 0, 0
    keys = df["primary_version"].astype(str) + "\0" + df["shadow_version"].astype(str)
    codes, _ = pd.factorize(keys, sort=False)
    counts = np.bincount(codes)
    kept = np.arange(len(counts))
    if limit is not None and len(counts) > limit:
        kept = np.sort(np.argsort(-counts, kind="stable")[:limit])
    order = np.argsort(codes, kind="stable")  # (each pair's rows together, in their order)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    groups = [df.iloc[np.sort(order[bounds[c] : bounds[c + 1]])] for c in kept]
    return groups, len(counts) - len(kept), len(df) - int(counts[kept].sum())


def audit_by_versions(
    df: pd.DataFrame,
    config: AuditConfig | None = None,
    model: str | None = None,
    start: str = "",
    end: str = "",
    vectors: Callable[[pd.DataFrame], Iterable[tuple[np.ndarray, np.ndarray]]] | None = None,
) -> AuditResult:
    """``audit_frame`` of each pair of versions in ``df`` apart: a range holding one pair (or
    none) is that pair's audit; one holding several (two rollouts of the model within it) has
    each pair's in ``by_versions``, the worst verdict, each pair's verdict and reasons as its
    reasons, and its records' and shadow errors' counts; no agreement, divergence or anomaly
    figure of the pairs together, nor their versions' answers compared across pairs. Of more
    than ``MAX_VERSION_PAIRS`` pairs, those with the most records are audited, the others
    counted (``pairs_left_out``, ``records_left_out``) and named first in the reasons: such a
    range is inconclusive at best."""
    cfg = config or AuditConfig()
    groups, pairs_left_out, records_left_out = version_pairs(df, MAX_VERSION_PAIRS)
    if len(groups) < 2 and not pairs_left_out:
        return audit_frame(df, cfg, model, start, end, vectors)
    parts = [audit_frame(rows, cfg, model, start, end, vectors) for rows in groups]
    errors = int(df["shadow_error"].notna().sum())
    result = AuditResult(
        model,
        start,
        end,
        min((p.verdict for p in parts), key=VERDICT_ORDER.index),
        [f"{p.pair_name}: {p.verdict.upper()}: " + "; ".join(p.reasons) for p in parts],
        rows=len(df),
        shadow_errors=errors,
        shadow_error_rate=errors / len(df),
        shadow_not_finite=sum(p.shadow_not_finite for p in parts),
        output_differs=sum(p.output_differs for p in parts),
        versions={k: sorted({v for p in parts for v in p.versions[k]}) for k in ("primary", "shadow")},
        config=cfg,
        by_versions=parts,
        pairs_left_out=pairs_left_out,
        records_left_out=records_left_out,
    )
    if pairs_left_out:
        result.reasons.insert(
            0,
            f"{result.pairs_left_out} more pairs of versions ({result.records_left_out} records) were not "
            f"audited: over {MAX_VERSION_PAIRS} in one range, the {MAX_VERSION_PAIRS} with the most records are",
        )
        if result.verdict == "pass":
            result.verdict = "inconclusive"
    return result


# The counts an audit of every model sums over its models' audits (``by_models``).
SUMMED = (
    "rows",
    "shadow_errors",
    "shadow_without_primary",
    "primary_without_shadow",
    "copies_lost",
    "copies_eligible",
    "copies_received",
    "primaries_mirrorable",
    "shadow_dropped",
    "input_mismatch",
    "self_pairs",
    "duplicates",
    "primary_failed",
    "output_differs",
    "primary_not_finite",
    "shadow_not_finite",
    "skipped_files",
    "unread_files",
    "unread_bytes",
    "unlisted_folders",
    "crowded_folders",
    "malformed_records",
    "late_records",
    "earlier_skipped_files",
    "pairs_left_out",
    "records_left_out",
)


def by_models(parts: list[AuditResult], start: str, end: str, config: AuditConfig | None = None) -> AuditResult:
    """An audit of every model from each model's own audit (``parts``): one alone is the audit;
    of several, one of all models with those that have something to show (not skipped) in
    ``by_models``, the worst verdict, each model's verdict and reasons as its reasons, the
    skipped models named (with their notes), the counts summed (``SUMMED``), and the earliest
    time a model's mirror stopped. One model's copies hide no other's stopped mirror or lost
    copies, and no agreement is pooled across models."""
    cfg = config or AuditConfig()
    if len(parts) < 2:
        if parts:
            return parts[0]
        return AuditResult(None, start, end, "skip", ["no shadow records in this range: nothing to audit"], config=cfg)
    shown_parts = [p for p in parts if p.verdict != "skip"]
    skipped = [p for p in parts if p.verdict == "skip"]
    reasons = [f"model {shown(str(p.model))}: {p.verdict.upper()}: " + "; ".join(p.reasons) for p in shown_parts]
    if skipped:
        notes = [f"{shown(str(p.model))}: {note}" for p in skipped for note in p.reasons[1:]]
        reasons.append(
            f"model{'s' if len(skipped) > 1 else ''} {', '.join(shown(str(p.model)) for p in skipped)}: SKIP: "
            "no shadow records in this range" + "".join(f"; {note}" for note in notes)
        )
    if not shown_parts:
        reasons.insert(0, "no shadow records in this range: nothing to audit")
    result = AuditResult(
        None,
        start,
        end,
        min((p.verdict for p in parts), key=VERDICT_ORDER.index),
        reasons,
        config=cfg,
        versions={k: sorted({v for p in shown_parts for v in p.versions.get(k, [])}) for k in ("primary", "shadow")},
        by_models=shown_parts,
        **{name: sum(getattr(p, name) for p in parts) for name in SUMMED},
    )
    result.shadow_error_rate = result.shadow_errors / result.rows if result.rows else 0.0
    result.out_of_time = any(p.out_of_time for p in parts)
    late = [p.late_earlier for p in parts if p.late_earlier is not None]
    result.late_earlier = sum(late) if late else None
    result.mirror_stopped = min((p.mirror_stopped for p in shown_parts if p.mirror_stopped), default=None)
    return result


def agreement_text(agreement: float, ci: tuple[float, float], minimum: float) -> str:
    """The top-1 agreement and its interval, each shown beside the minimum without rounding onto
    or across it."""
    lo, hi = ci
    return (
        f"top-1 agreement {percent_beside(agreement, minimum)}% "
        f"(interval {percent_beside(lo, minimum)}-{percent_beside(hi, minimum)}%)"
    )


def audited_hour(end: datetime, now: datetime) -> tuple[datetime, datetime, float]:
    """The clock hour (UTC) an hourly audit run ending its data interval at ``end`` reports: the
    last one that ends at or before ``end`` (a run triggered by hand at 10:30 audits 09:00 to
    10:00, the scheduled run's hour, not 09:30 to 10:30 under its name); and the seconds to wait
    from ``now`` until its last records are written (a writer flushes every ``MAX_FLUSH_S`` at
    most, its clock up to ``CLOCK_STEP_S`` behind): the hour's close (``closes``) on a right
    clock, and the time a file named then takes to be whole (``WRITE_S``: its second begun, its
    write or PUT under way; read at the close itself, it was in a retry and in no first audit,
    nor counted late). Those written later are counted late, by its audit and the next hour's."""
    from vision_rollout.engine import WRITE_S

    if end.tzinfo is None:
        raise ValueError("end must be a timezone-aware datetime")
    # (a plain datetime: Airflow's are pendulum's, whose arithmetic with plain ones fails)
    hour_end = datetime.fromtimestamp(end.timestamp(), UTC).replace(minute=0, second=0, microsecond=0)
    settled = closes(hour_end) + timedelta(seconds=WRITE_S)
    return hour_end - timedelta(hours=1), hour_end, max(0.0, (settled - now).total_seconds())


# How far the clocks of two pods writing the log may differ: Istio's copy of a request is
# answered, and stamped, by the candidate's pod, its primary by the baseline's. (Records stamped
# up to this long after a range by a pod whose clock is right are written by the time
# ``audited_hour`` waits for.)
CLOCK_SKEW_S = 60
EARLIER_HOURS = 24  # how far back the hourly audit looks for records that came after their range closed
# What one audit's records may take in memory (Arrow tables, as read): each file is bounded
# (``MAX_READ_BYTES``), an hour of 10,000 files was not. The pairs, vectors and report come on top.
MAX_AUDIT_BYTES = 4 * 1024**3
# How long one audit's reads of the log may take together (listings and files begun until then):
# a slow store or an hour of many files ran the task past any bound (the rollout's audit holds
# the model's lease for ``LEASE_S`` beyond its wait for the copies and this: ``rollout_audit_s``).
# What is left is named; the range is inconclusive.
MAX_AUDIT_S = 480.0


def closes(end: datetime) -> datetime:
    """When a range ending at ``end`` closes: the last second a file of its records may be
    written (by its name, its pod's clock) by a pod that keeps the bounds: the copy of its last
    primary, stamped ``CLOCK_SKEW_S`` after the range by a shadow pod's clock, that waited
    ``MAX_COPY_AGE_LIMIT_S`` for idle time there and was flushed within ``MAX_FLUSH_S`` of the
    previous flush's write, its own write begun (``copy_due``, the one bound: the pods' clocks
    apart and a copy's wait, both, so that a pair split over the range's end is its primary's
    range's, once, and a copy ``copy_due`` holds due is never late); ``audited_hour`` waits for
    it. A record in a file written later is late: not in the range's audit."""
    return end + copy_due()


def copy_due() -> timedelta:
    """How long after its primary's stamp a live shadow pod may still not have written its copy
    (the record stamped at the copy's arrival): the longest wait for idle time a server may be
    given (``MAX_COPY_AGE_LIMIT_S``), a flush interval after the previous flush's write
    (``MAX_FLUSH_S``, ``WRITE_S``), its own write, and the pods' clocks apart (``CLOCK_SKEW_S``:
    the record showing the log's now may be stamped by a clock that far ahead). A pod with
    nothing written over a longer stretch before a record another pod wrote is gone (or got no
    copy in it); primaries stamped that long before the newest record without their copies
    show a mirror stopped, not copies on their way. A range closes this long after its end
    (``closes``): a copy due is never late."""
    from model_server.config import MAX_COPY_AGE_LIMIT_S, MAX_FLUSH_S
    from vision_rollout.engine import WRITE_S

    return timedelta(seconds=MAX_COPY_AGE_LIMIT_S + MAX_FLUSH_S + 2 * WRITE_S + CLOCK_SKEW_S)


COPIES_POLL_S = 2.0  # how often a rollout's audit looks again for the copies still to be written
# What a shadow pod's watermark (``shadow_watermark``) is held back by beyond what its records
# show (its copies' longest time in flight, its clock's lead on the primaries'): a copy sent
# at the same instant as its primary reaches the other pod within it.
WATERMARK_MARGIN_S = 1.0


def shadow_watermark(records: pd.DataFrame) -> pd.Timestamp | None:
    """The time before which every copy the shadow's pods were sent is in ``records`` (a
    stretch of the log's primary and shadow records, with ``replica`` and ``latency_ms``), on
    the primaries' clock; None where no shadow record says (no copy written: a shadow that is
    down, or one never sent any, leaves nothing to tell those apart, so nothing is judged).

    Each pod that wrote shadow records has written those of the copies that reached it up to
    its newest record's stamp, less the longest time one of its copies took (a copy that
    arrived earlier may still be waiting for idle time); its clock's lead on the primaries'
    (the most a copy's stamp follows its primary's, of the pairs in ``records``) and
    ``WATERMARK_MARGIN_S`` are taken off too. The earliest of the pods' is the shadow's: a copy
    may have gone to any of them; but not a pod gone (rescheduled, scaled down), whose newest
    record is older than another shadow pod's by more than a live one's can be (``copy_due``,
    and its copies' longest flight): it writes nothing more, and held the watermark at its last
    copy for as long as the log was read (a rollout's wait to the range's close, the copies test
    stopped there). A lone pod is never taken as gone. A primary stamped before the watermark
    without a copy was not mirrored (Envoy's mirror sampled it out); a copy lost on its way
    there (a pod unreachable, or gone) looks the same, and is counted as a primary without a
    shadow record, never as agreement."""
    shadow = (records["role"] == "shadow").to_numpy(bool)
    if not shadow.any():
        return None
    stamp = records["time"]
    key = pd.MultiIndex.from_frame(records[["model", "request_id", "item"]].astype(object))
    primary_at = pd.Series(stamp.to_numpy()[~shadow], index=key[~shadow], dtype=stamp.dtype)
    primary_at = primary_at[~primary_at.index.duplicated()].reindex(key[shadow])
    copies = records[shadow]
    pods = pd.DataFrame(
        {
            "replica": copies["replica"].astype(object).fillna("").to_numpy(),
            "time": copies["time"].to_numpy(),
            "flight": copies["latency_ms"].astype(float).fillna(0.0).clip(lower=0.0).to_numpy() / 1000,
            "lead": (copies["time"].to_numpy() - primary_at.to_numpy()) / np.timedelta64(1, "s"),
        }
    ).groupby("replica")
    flight = pods["flight"].max()
    held = flight + pods["lead"].max().fillna(0.0).clip(lower=0.0) + WATERMARK_MARGIN_S
    newest = pods["time"].max()
    others = pd.Series(newest.max(), index=newest.index)  # (each pod's: the newest of the others')
    others[newest.idxmax()] = newest.drop(newest.idxmax()).max() if len(newest) > 1 else pd.NaT
    gone = newest < others - copy_due() - pd.to_timedelta(flight, unit="s")
    return (newest - pd.to_timedelta(held, unit="s"))[~gone].min()


# The one-sided level of the test of a shadow's copies against the configured mirror share
# (``copies_short``): a shadow sent every copy configured is warned of at most this often.
COPIES_ALPHA = 0.001


def copies_short(received: int, eligible: int, percent: float | np.ndarray) -> float:
    """The chance of ``received`` copies or fewer of ``eligible`` primaries each sampled at
    ``percent`` (one for all, or each its own: a sum of binomials' lower tail, exact but for
    rounding): below ``COPIES_ALPHA``, fewer copies came than the mirror's sampling explains."""
    if not eligible:
        return 1.0
    shares = np.clip(np.broadcast_to(np.asarray(percent, float), (eligible,)), 0.0, 100.0) / 100
    values, counts = np.unique(shares, return_counts=True)
    if len(values) == 1:
        return float(stats.binom.cdf(received, eligible, values[0]))
    pmf = np.ones(1)
    for share, n in zip(values, counts, strict=True):
        pmf = signal.fftconvolve(pmf, stats.binom.pmf(np.arange(n + 1), n, share))
    return float(np.clip(np.clip(pmf[: received + 1], 0.0, None).sum(), 0.0, 1.0))


def silence_unlikely(mirrorable: int, percent: float) -> bool:
    """Whether no copy at all of ``mirrorable`` primaries behind a mirror of ``percent`` is more
    than its sampling explains (``copies_short`` of none, below ``COPIES_ALPHA``): a few requests
    none of which was sampled are no sign of copies lost."""
    return copies_short(0, mirrorable, percent) < COPIES_ALPHA


# A mirror's share over time, as Prometheus' samples of it: (unix time, percent), a sample every
# ``MIRROR_STEP_S``; a primary with none within a step of it (the mirror off) is not tested.
MirrorShares = Sequence[tuple[float, float]]
MIRROR_STEP_S = 60.0


def share_at(times: pd.Series, shares: float | MirrorShares) -> np.ndarray:
    """The mirror's percent at each of ``times``: the lower of the samples either side within a
    step (a change between two samples is not placed in favour of a shortfall); NaN where none."""
    if isinstance(shares, int | float):
        return np.full(len(times), float(shares))
    at = ((pd.to_datetime(times, utc=True) - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(float)
    ordered = sorted((float(t), float(p)) for t, p in shares)
    t = np.array([x for x, _ in ordered], float)
    p = np.array([y for _, y in ordered], float)
    i = np.searchsorted(t, at)
    around = []
    for j in (i - 1, i):
        ok = (j >= 0) & (j < len(t))
        near = np.full(len(at), np.nan)
        near[ok] = np.where(np.abs(t[j[ok]] - at[ok]) <= MIRROR_STEP_S, p[j[ok]], np.nan)
        around.append(near)
    both = np.vstack(around)
    return np.where(np.isnan(both).all(axis=0), np.nan, np.nanmin(np.where(np.isnan(both), np.inf, both), axis=0))


def other_input(records: pd.DataFrame, of: np.ndarray) -> np.ndarray:
    """Which of ``records`` are shadow records of another input than their primary's (``of``:
    ``copy_of``'s; both digests known and unequal: ``shadow_pairs``' ``input_mismatch``), no
    copy of it; none without an ``image_sha256`` column."""
    if "image_sha256" not in records.columns:
        return np.zeros(len(records), bool)
    mine = records["image_sha256"].astype(object).to_numpy()
    theirs = np.where(of >= 0, mine[np.maximum(of, 0)], None)
    shadow = (records["role"] != "primary").to_numpy(bool)
    return shadow & pd.notna(mine) & pd.notna(theirs) & (mine != theirs)


def copy_check(
    records: pd.DataFrame, versions: Iterable[str], watermark: pd.Timestamp | None = None
) -> tuple[int, int, int]:
    """``copy_masks``' counts: lost, eligible and received."""
    lost, eligible, copied = copy_masks(records, versions, watermark)
    return lost, int(eligible.sum()), int((eligible & copied).sum())


def copy_masks(
    records: pd.DataFrame,
    versions: Iterable[str],
    watermark: pd.Timestamp | None = None,
    keys: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[int, np.ndarray, np.ndarray]:
    """Of ``records`` (primary and shadow, with ``mirrored``, ``replica``, ``latency_ms``):
    the primaries the server's own mirror sampled (``mirrored`` true) without any shadow record,
    run, failed or dropped, of their input (lost: one of another input, ``other_input``, is no
    copy; nor is it below); and of the primaries of ``versions`` (those mirrored: the
    pairs' primary versions) a mirror sampled on its own (``mirrored`` null, not naming their
    version), those stamped after the first of them with a copy and before the shadow's
    watermark (``shadow_watermark``: the stretch the copies show the mirror on and written; of
    ``records`` unless given, as of all the records read, past the range too), and how many of
    them have a copy (which of ``records``: the eligible, and those with a copy). Each request's
    primary record counts, once. ``keys``: ``copy_keys``' request primaries and those with a
    copy, of ``records`` (else of ``records`` alone), as paired with copies left out of them
    (``audit``'s: written after the range closed, late): a copy that came late is counted late
    once, its primary neither lost nor missing, but one ``lost_late`` counts lost (due by the
    close: of a primary the server's own mirror sampled) makes its primary lost here, the same
    primary ``lost_late`` took (``copy_of`` on the same records)."""
    first, _, copied = copy_keys(records) if keys is None else (keys[0], None, keys[1])  # (of records)
    lost = int((first & records["mirrored"].eq(True).to_numpy(bool) & ~copied).sum())
    unknown = sampled_apart(records, versions, first)
    watermark = shadow_watermark(records) if watermark is None else watermark
    if watermark is None or not (unknown & copied).any():
        return lost, np.zeros(len(records), bool), copied
    stamp = records["time"]
    began = stamp[unknown & copied].min()
    eligible = unknown & (stamp > began).to_numpy(bool) & (stamp < watermark).to_numpy(bool)
    return lost, eligible, copied


def copy_keys(records: pd.DataFrame, counted: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which of ``records`` (primary and shadow) are each request's primary record (``copy_of``:
    of an id sent again, the one its copy was stamped as), which are copies (shadow records of
    their primary's input: one of another input, ``other_input``, is none), and which
    primaries have a copy (``copy_of``'s: the own mirror's copy of a request is its own
    primary's, not that of another request under its id), of the copies ``counted`` (all
    unless given)."""
    from model_server.predictionlog import copy_of

    first, of, _ = copy_of(records)
    copies = (records["role"] != "primary").to_numpy(bool) & ~other_input(records, of)
    copied = np.zeros(len(records), bool)
    copied[of[copies & (of >= 0) & (True if counted is None else counted)]] = True
    return first, copies, copied


def sampled_apart(records: pd.DataFrame, versions: Iterable[str], first: np.ndarray) -> np.ndarray:
    """Of ``records``' ``first`` (each request's first primary record), those of ``versions`` a
    mirror may have sampled on its own (Istio's: ``mirrored`` null, not naming their version)."""
    return (
        first
        & records["mirrored"].isna().to_numpy(bool)
        & records["version"].isin(list(versions)).to_numpy(bool)
        & (records["route"] != "version").to_numpy(bool)
    )


def last_copy(records: pd.DataFrame) -> pd.Timestamp | None:
    """When the newest copy in ``records`` (``copy_keys``) was stamped; None where none is."""
    copies = copy_keys(records)[1]
    return records["time"][copies].max() if copies.any() else None


def mirror_stopped(
    records: pd.DataFrame, versions: Iterable[str], since: pd.Timestamp | None, shares: float | MirrorShares
) -> tuple[int, float, float] | None:
    """Whether a mirror that samples on its own (Istio's) stopped sending rather than went
    quiet: of the primaries of ``versions`` (``sampled_apart``) stamped after ``since`` (the
    last copy the log held by the range's close, ``last_copy``: ``audit``'s, whenever it runs)
    at a share known for their time (``share_at``), how many, the share on average, and the
    chance of so few copies of them by the mirror's sampling alone (``copies_short``), when it
    is below ``COPIES_ALPHA``; None otherwise (no
    primaries after it: a quiet mirror; or too few for its silence to say anything). The
    mirror's copies came and were written up to then; its primaries went on, unmirrored past
    what its sampling explains."""
    if since is None:
        return None
    first, _, copied = copy_keys(records)
    after = sampled_apart(records, versions, first) & (records["time"] > since).to_numpy(bool)
    share = share_at(records["time"][after], shares)
    known = ~np.isnan(share)
    if not share[known].any():
        return None
    p = copies_short(int(copied[after][known].sum()), int(known.sum()), share[known])
    return (int(known.sum()), float(share[known].mean()), p) if p < COPIES_ALPHA else None


# Why a copy is dropped before it ran (the log's DROPPED records say none): the reasons of the
# model server's ``shadow_dropped_total``, which counts them.
DROPPED_WHY = (
    "queue_full: a full queue, no_idle_time: primaries left none, too_old: past its age bound, "
    "left_service: its version unloaded, shutting_down: the server stopping, given_up: Istio's stream "
    "ended first; counted by reason in shadow_dropped_total"
)


def copies_text(result: AuditResult) -> list[str]:
    """The reasons a shadow's copies give (warnings: thinner evidence, never the candidate's
    failure): copies lost, and fewer copies than the configured share explains."""
    lines = []
    if result.copies_lost:
        lines.append(
            f"{result.copies_lost} requests the server's mirror sampled have no shadow record: copies lost "
            "(a shadow pod restarting or unreachable, its records not written); the shadow evidence is thinner"
        )
    if result.copies_p is not None and result.copies_p < COPIES_ALPHA and result.copies_percent is not None:
        expected = result.copies_eligible * result.copies_percent / 100
        lines.append(
            f"the shadow received {result.copies_received} copies of {result.copies_eligible} requests behind a "
            f"mirror of {result.copies_percent:.3g}% ({expected:.0f} expected; p={result.copies_p:.2g}, "
            f"below {COPIES_ALPHA:g}): copies are lost on their way (the mirror's cluster, the shadow's pods), "
            "the shadow evidence is thinner"
        )
    return lines


def copies_pending(
    prediction_log: str | Path,
    end: datetime,
    model: str | None,
    version: str | None,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> datetime | None:
    """When the newest record stamped in the last stretch before ``end`` that its pair's other
    record may still come for (``closes``'s bound) was stamped, of those whose other record is
    not in the log yet: a primary of ``version`` (the mirrored one) without a shadow record (a
    copy, answered or dropped), or a shadow record without its primary (the pods flush apart);
    None where none. Without ``version`` (``rolloutctl audit``), the primaries of any version
    that say the server's own mirror sampled them, and those of the versions the stretch holds
    copies of (behind Istio) as of ``version``; without ``model``, every model's. A primary that says whether its process's mirror sampled it (``mirrored``)
    is waited for only when it did; one that cannot say (Istio's mirror samples, an older
    writer) while it may have been: until the shadow's pods have written their copies past it
    (``shadow_watermark``). Only that stretch is read, and only the records' keys, beginning no
    listing nor file after ``deadline`` (by ``clock``): ``end`` itself when it was not read whole
    by then (what is pending is not known: the last record may be)."""
    from model_server.predictionlog import copy_of, read

    start = end - (closes(end) - end)
    margin = timedelta(seconds=CLOCK_SKEW_S)
    records = read(
        prediction_log,
        start - margin,
        end + margin,
        model,
        columns=[
            "time",
            "model",
            "version",
            "role",
            "route",
            "replica",
            "request_id",
            "item",
            "latency_ms",
            "outcome",
            "mirrored",
            "image_sha256",
            "tenant",  # (a request id two tenants sent is two requests: ``copy_of``)
            "tenant_tag",
        ],
        roles=("primary", "shadow"),
        deadline=deadline,
        clock=clock,
    )
    if records.attrs["out_of_time"]:
        return end
    stamp = records["time"]
    recent = ((stamp >= pd.Timestamp(start)) & (stamp < pd.Timestamp(end))).to_numpy(bool)
    primary = (records["role"] == "primary").to_numpy(bool)
    said = records["mirrored"]
    # (a request naming its version is never mirrored)
    may_be = ((records["outcome"] == "ok") & (records["route"] != "version")).to_numpy(bool)
    if (watermark := shadow_watermark(records)) is not None:
        may_be = may_be & (stamp >= watermark).to_numpy(bool)
    sampled = np.where(said.isna().to_numpy(bool), may_be, said.eq(True).to_numpy(bool))
    key = pd.MultiIndex.from_frame(records[["model", "request_id", "item"]].astype(object))
    _, of, own = copy_of(records)
    copy = ~primary & ~other_input(records, of)  # (one of another input is no copy)
    # (a primary with its own copy, copy_of's: of an id sent again, a copy of one attempt is none
    # of the other's, whose copy may make it the request compared)
    copied = np.zeros(len(records), bool)
    copied[of[copy & own]] = True
    stamped = _stamped(records)  # (primaries of one id stamped alike are told apart by nothing: one copied, all)
    copied |= primary & stamped.isin(stamped[copied])
    if version:
        mirrored = (records["version"] == version).to_numpy(bool) & sampled
    else:  # (no version: those its server's own mirror said it sampled, and as a rollout's of its
        # version those of the versions whose copies the stretch holds, each of its own model:
        # Istio's mirror says nothing)
        versions = pd.MultiIndex.from_frame(records[["model", "version"]].astype(object))
        shown = versions[primary & key.isin(key[copy])]
        mirrored = said.eq(True).to_numpy(bool) | (versions.isin(shown) & sampled)
    lonely = recent & np.where(primary, mirrored & ~copied, ~key.isin(key[primary]))
    return stamp[lonely].max().to_pydatetime() if lonely.any() else None


def await_copies(
    prediction_log: str | Path,
    end: datetime,
    model: str | None,
    version: str | None,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Waits until the pairs of the records stamped shortly before ``end`` are whole in the log
    (``copies_pending``: the shadow records of the primaries of ``version``, the primaries of
    the shadow records), or until the newest record still without its other is past its close
    (``closes``: a record written later is late, in no audit; a copy the mirror's sampling never
    made is waited for that long), looking every ``COPIES_POLL_S``; the seconds it waited. A
    range audited up to now, before its last flushes, showed those records unpaired and
    compared only the copies answered and written first (a failing shadow's among them). A
    look begins no read of the log after the range's close (``clock`` is ``time.time``'s): one
    that could not read the stretch whole by then (a slow store) waits to the close."""
    began, close = clock(), closes(end).timestamp()
    while (newest := copies_pending(prediction_log, end, model, version, close, clock)) is not None:
        left = closes(newest).timestamp() - clock()
        if left <= 0:
            if newest == end:
                log.warning(
                    "the shadow copies of the records before %s could not be looked for in full by its close", end
                )
            break
        sleep(min(COPIES_POLL_S, left))
    return clock() - began


def attribution(
    records: pd.DataFrame, start: datetime, end: datetime, late: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Of ``records`` (read from ``CLOCK_SKEW_S`` before ``start`` to ``end``'s close), which are the
    range's and which an earlier range's. The range's: the primaries stamped within it, the
    shadow records of their items (whenever stamped within the margins) but of those ``late``
    (written after the range closed: its audit at the close had not read them, and a retry
    attributes as it did): a pair is its primary's range's, once, whatever its shadow's pod's
    clock said. A shadow record of an item of no primary read is the range's whose close less
    ``CLOCK_SKEW_S`` it is stamped by (from ``start``'s close to ``end``'s, each less that): each
    range reads to its close, and pairs such a copy with a primary it read that the next range's
    read, from ``CLOCK_SKEW_S`` before it, may not reach; one stamped in the close's last
    ``CLOCK_SKEW_S`` may be of a primary stamped past the close (Istio's copy, by a shadow pod
    behind), which the next range reads with it and pairs: the pair is its primary's range's,
    once. An earlier range's: the records stamped before it, the shadow records of the items of
    primaries stamped before it, and those of no primary read stamped before ``start``'s close
    less ``CLOCK_SKEW_S``. A request id a client sent again (a retry) has one copy of each request
    at most, each its own request's, in whichever range (the earlier range paired its copy, and
    the later one's is lost, not paired twice). A copy is its own attempt's primary's
    (``copy_of``), and so the range's or not as that primary is: the server's own mirror stamps
    its copy with its primary's own stamp (``shadow_record``: the request's ``received_at``);
    Istio's copy, stamped by the candidate's pod, its clock apart, is the primary's of its input
    nearest in time to it, its pod's clock offset taken off (one copy a primary). Istio's copy,
    and a copy no primary read is left for (of a primary not read), is the range's where stamped
    no earlier than the first of its item's primaries in the range less ``CLOCK_SKEW_S`` (no
    copy of it can be stamped before; one read without its primary is matched to another
    attempt's); one stamped earlier, of a primary before the range, stays that range's. A known limit behind
    Istio: a retry sent, with the same input, within twice the pods' clocks apart of its first
    request, the offset as measured taken off, may have the copies of the two swapped (each the
    other's nearest). A shadow
    record stamped within the range more than ``CLOCK_SKEW_S`` before
    its end, of a primary stamped after it (the pods' clocks further apart), is the range's too:
    the next range's read, from ``CLOCK_SKEW_S`` before it, never sees it, and the pair was lost
    to both unseen; the range counts it a shadow record without its primary."""
    from model_server.predictionlog import copy_of

    time = records["time"]
    inside = ((time >= pd.Timestamp(start)) & (time < pd.Timestamp(end))).to_numpy()
    before = (time < pd.Timestamp(start)).to_numpy()
    # (a shadow record of no primary read: the range's by its close less the pods' clocks apart,
    # where its primary, stamped up to CLOCK_SKEW_S after it, is read with it)
    skew = timedelta(seconds=CLOCK_SKEW_S)
    by_close = (time < pd.Timestamp(closes(start) - skew)).to_numpy()
    closing = ~by_close & (time < pd.Timestamp(closes(end) - skew)).to_numpy()
    primary = (records["role"] == "primary").to_numpy()
    key = pd.MultiIndex.from_frame(records[["model", "request_id", "item"]].astype(object))
    # (a copy of its own attempt, the own mirror's or Istio's: the range's where that primary
    # is: copy_of)
    _, of, own = copy_of(records)
    # (else, of a primary of the range: stamped after the first of its item's, less the pods'
    # clocks apart; one stamped earlier is an earlier request's whose id a client sent again,
    # paired there)
    rows = np.flatnonzero(primary & inside & ~late)
    rows = rows[time.iloc[rows].argsort(kind="stable").to_numpy()]
    rows = rows[~key[rows].duplicated()]
    since = time.iloc[rows].set_axis(key[rows]).reindex(key).reset_index(drop=True)
    after = (time.reset_index(drop=True) >= since - pd.Timedelta(seconds=CLOCK_SKEW_S)).to_numpy()
    # (Istio's copy, matched by time, is held to the same: one read without its primary, stamped
    # more than CLOCK_SKEW_S before its id's first primary in the range, was matched to that
    # primary, a retry, and counted in both ranges; the own mirror's, stamped as its primary,
    # needs no such check)
    stamped = time.to_numpy("datetime64[us]")
    exact = own & (stamped == stamped[np.maximum(of, 0)])
    ours = np.where(own, (primary & inside & ~late)[np.maximum(of, 0)] & (exact | after), after)
    theirs = key.isin(key[primary & ~inside])
    unpaired = ~primary & ~key.isin(key[primary])
    beyond = (time < pd.Timestamp(end - timedelta(seconds=CLOCK_SKEW_S))).to_numpy() & key.isin(
        key[primary & (time >= pd.Timestamp(end)).to_numpy()]
    )  # (of a primary after the range, stamped before the next range's read)
    mine = np.where(primary, inside, ours | (inside & (~theirs | beyond) & ~unpaired) | (unpaired & closing))
    return mine, ~mine & (before | key.isin(key[primary & before]) | (unpaired & by_close))


def least_share(mirror_percent: float | MirrorShares) -> float:
    """Of a mirror's shares over time, the lowest (the mirror may have been off)."""
    shares = [mirror_percent] if isinstance(mirror_percent, int | float) else [p for _, p in mirror_percent]
    return min(shares, default=0.0)


def _mirrorable(records: pd.DataFrame) -> pd.Series:
    """The stamps of ``records``' primaries a mirror could have sampled: each request's first,
    answered ok, not naming its version, not said unsampled by the server's own mirror."""
    return records["time"][
        copy_keys(records)[0]
        & ((records["outcome"] == "ok") & (records["route"] != "version")).to_numpy(bool)
        & ~records["mirrored"].eq(False).to_numpy(bool)
    ]


def _mirrorable_percent(at: pd.Series, mirror_percent: float | MirrorShares) -> float:
    """The one share at which primaries stamped ``at`` make no copy at all as likely as each at
    its time's (``share_at``; none where no sample says): ``AuditResult.mirrorable_percent``."""
    if isinstance(mirror_percent, int | float):
        return float(mirror_percent)
    share = np.nan_to_num(share_at(at, mirror_percent)) / 100
    with np.errstate(divide="ignore"):
        return float(100 * (1 - np.exp(np.log1p(-np.clip(share, 0.0, 1.0)).mean())))


def _kept(records: pd.DataFrame, keep: np.ndarray) -> pd.DataFrame:
    if keep.all():
        return records
    kept = records[keep].reset_index(drop=True)
    kept.attrs = records.attrs
    return kept


def lost_late(records: pd.DataFrame, close: Callable[[pd.Series], pd.Series]) -> np.ndarray:
    """Which of ``records`` (primary and shadow, read with ``written``) are copies written after
    their range's close (``close``: of their primaries' stamps) of a primary written by then that
    the server's own mirror sampled (``mirrored`` true), no copy of it written by then (a copy's
    primary: ``copy_of``'s, of the primaries written by their close, whatever the order the
    files were read in: the one it is stamped as, else its request's earliest; a copy of
    another request under its id, on time, does not make it the sampled one's). A copy
    is due by its range's close: that range's audit counts such a request lost whenever it runs
    (``copy_masks``), the one at the close and its retry alike; the copy is no late record
    besides, of that audit nor of a later one's ``late_earlier``."""
    from model_server.predictionlog import copy_of

    # (what is not written late is on time, a file named without its written second too, as to ``_late``)
    primary = (records["role"] == "primary").to_numpy(bool)
    kept = ~primary | ~(records["written"] > close(records["time"])).to_numpy(bool)
    read = _kept(records, kept)
    _, copies, _ = copy_keys(read)
    of = copy_of(read)[1]
    rows = np.flatnonzero(copies & (of >= 0))
    due = close(read["time"].iloc[of[rows]].reset_index(drop=True))
    late = (read["written"].iloc[rows].reset_index(drop=True) > due).to_numpy(bool)
    on_time = np.zeros(len(read), bool)
    on_time[of[rows[~late]]] = True  # (primaries with a copy written by their close)
    sampled = read["mirrored"].eq(True).to_numpy(bool)
    lost = np.zeros(len(read), bool)
    lost[rows[late & sampled[of[rows]] & ~on_time[of[rows]]]] = True
    out = np.zeros(len(records), bool)
    out[kept] = lost
    return out


# The columns ``lost_late`` reads of the records of earlier ranges that came late.
LOST_COLUMNS = ["time", "model", "request_id", "item", "role", "mirrored", "image_sha256", "tenant", "tenant_tag"]


def _stamped(records: pd.DataFrame) -> pd.MultiIndex:
    """Each of ``records``' request, item and stamp: a record found again in another read."""
    return pd.MultiIndex.from_frame(records[["model", "request_id", "item", "time"]].astype(object))


def _stretches(stamps: pd.Series, reach: timedelta) -> list[tuple[pd.Timestamp, pd.Timestamp]]:
    """The stretches ``reach`` either side of each of ``stamps``, those that meet as one, in order."""
    merged: list[list[pd.Timestamp]] = []
    for at in stamps.sort_values():
        if merged and at - reach <= merged[-1][1]:
            merged[-1][1] = at + reach
        else:
            merged.append([at - reach, at + reach])
    return [(since, to) for since, to in merged]


def _lost_before(
    prediction_log: str | Path,
    model: str,
    copies: pd.DataFrame,
    start: datetime,
    span: timedelta,
    until: datetime,
    max_bytes: int,
    deadline: float | None,
    clock: Callable[[], float],
) -> tuple[np.ndarray, tuple[int, int, bool], dict[str, str]]:
    """Which of ``copies`` (shadow records of ranges before ``start``: their ``model``, request id,
    item and time, in files written after the range ending at ``start`` closed and by ``until``)
    their range's audit counted lost (``lost_late``), what the reads left (files not read,
    hour folders not listed, whether out of time), and the files they skipped (why, by path:
    ``read``'s ``skipped_file_reasons``): a copy whose primary was not read is not counted lost. The log is read again ``copy_due`` either side of each copy (where its
    primary and its copies on time are), a stretch at a time, each held to ``max_bytes`` less
    what ``copies`` take and reduced to its lost copies before the next is read, none begun
    after ``deadline``: with the read that found ``copies`` (freed by then), the earlier hours'
    reads hold at most ``max_bytes`` at once."""
    from model_server.predictionlog import read

    lost, left = np.zeros(len(copies), bool), (0, 0, False)
    skipped: dict[str, str] = {}
    if not len(copies):
        return lost, left, skipped
    key = _stamped(copies)
    budget = max(max_bytes - int(copies.memory_usage(deep=True).sum()), 0)
    for lo, hi in _stretches(copies["time"], copy_due()):
        around = read(
            prediction_log,
            lo.to_pydatetime(),  # (whole: a copy's primary may be stamped before the hours looked back on)
            hi.to_pydatetime(),
            model,
            columns=LOST_COLUMNS,
            roles=("primary", "shadow"),
            written=True,
            max_bytes=budget,
            deadline=deadline,
            clock=clock,
        )
        found = (
            lost_late(around, lambda at: earlier_closes(at, start, span))
            & _late(around, closes(start))
            & ~_late(around, until)
        )
        lost |= key.isin(_stamped(around)[found])
        attrs = around.attrs
        left = left[0] + attrs["unread_files"], left[1] + attrs["unlisted_folders"], left[2] or attrs["out_of_time"]
        skipped.update(attrs["skipped_file_reasons"])
    return lost, left, skipped


def earlier_closes(at: pd.Series, start: datetime, span: timedelta) -> pd.Series:
    """The close (``closes``) of the range each of ``at`` (stamps before ``start``) is in, of the
    ranges of ``span`` one after another up to ``start`` (the hourly audit's clock hours)."""
    back = np.maximum(np.ceil((pd.Timestamp(start) - at) / pd.Timedelta(span)) - 1, 0)
    return pd.Timestamp(closes(start)) - back * pd.Timedelta(span)


def _late(records: pd.DataFrame, after: datetime) -> np.ndarray:
    """Which of ``records`` (read with ``written``) are in files written after ``after``."""
    return (records["written"] > pd.Timestamp(after)).to_numpy(bool)


def audit(
    prediction_log: str | Path,
    start: datetime,
    end: datetime,
    model: str | None = None,
    config: AuditConfig | None = None,
    earlier_hours: int = 0,
    max_bytes: int = MAX_AUDIT_BYTES,
    max_seconds: float | None = MAX_AUDIT_S,
    clock: Callable[[], float] = time.monotonic,
    mirror_percent: float | MirrorShares | None = None,
    mirror_on_to_end: bool = True,
) -> AuditResult:
    """Audit the shadow pairs of a prediction log (a folder or ``s3://`` URI) over a time range.

    Without ``model``, each model of the log is audited apart, as its own audit would be (the
    reads of each begun within this audit's ``max_seconds`` of reads: a model's computing is not
    the next one's time; each held to ``max_bytes``), and
    the audits are one (``by_models``): the worst verdict, each model's reasons and the counts.
    With ``mirror_percent`` (asserted then of every model), a model with primaries a mirror could
    have sampled (``primaries_mirrorable``) and no shadow record is a warning, as its own audit
    with the share is (``with_coverage``), where the mirror's sampling does not explain it
    (``copies_short`` of no copy, below ``COPIES_ALPHA``); an idle one, or one of a few requests
    none sampled, a skip, named.

    The range's records in files written after it closed (``closes``) are left out and counted
    (``late_records``): an audit shows the same whenever it runs (once they came, a retry or a
    catch-up would have shown more than the first audit), and says what it did not show; a range
    of such records alone is inconclusive, not empty, where they hold shadow evidence (shadow
    records, primaries the server's own mirror sampled, or, ``mirror_percent`` given, primaries a
    mirror could have sampled whose missing copies its sampling explains only without them: the
    mirror's evidence late, not lost); of other primaries alone (a model nothing mirrors, flushed
    late), a skip naming them. With ``earlier_hours``, the records of
    the ranges before it (stamped up to that many hours before it) in files written after the
    range ending at ``start`` closed and by this one's close, and the shadow records of earlier
    primaries stamped ``CLOCK_SKEW_S`` or more into this range (beyond the earlier audit's read),
    are counted too (``late_earlier``: in no audit; each once, where each range is audited once,
    in order; but the copies their range's audit counted lost, ``lost_late``: the earlier ranges
    taken as ranges of this one's length up to ``start``, the hourly audit's clock hours); a
    range holding nothing else is a ``warning``, not a silent skip.

    Shadow records whose input differs from their primary's are named in the reasons and left
    out; they do not change the verdict by themselves (anyone who reaches the data port can send
    them: the pairs that remain are the honest comparisons). Copies of requests the shadow's
    own version served (``self_pairs``) are left out and counted, named in the reasons only
    when nothing else was left to audit.

    The records read are held to ``max_bytes``: the files beyond it are left unread and counted
    (``unread_files``, ``unread_bytes``), and the range is inconclusive at best, as when files
    could not be read. The earlier hours' reads are held to it too (apart, one at a time: the
    records that came late, then the stretches around each late copy read again, ``_lost_before``):
    the files beyond it are left uncounted, and the count of what came late says "at least". Its reads (the earlier hours' too) begin no listing nor file after
    ``max_seconds`` (by ``clock``): what was left is counted the same way (``unlisted_folders``,
    ``out_of_time``), and named.

    The copies are counted against the mirror's sampling (``copy_check``): those the server's
    own mirror sampled and did not write by the range's close are lost, whenever the audit runs
    (``lost_late``: a copy written later is lost to it, as it was to the audit at the close, and
    no late record, of it nor of the next ranges' audits); behind a mirror that samples on its
    own, fewer copies than ``mirror_percent`` (the configured share, or its samples over time,
    ``share_at``: each primary tested at its time's) explains (``copies_short``) are named.
    Both are warnings in the reasons: the verdict stands on the pairs compared. A mirror whose
    copies stop while its primaries go on (``mirror_stopped``: beyond what its sampling explains,
    after its last copy) is told from one gone quiet: its stretch after the last copy is not
    compared, and a pass is inconclusive, saying so. ``mirror_on_to_end`` false: a constant
    ``mirror_percent`` held only up to a time not known (the mirror taken off since), and that
    stretch is not tested."""
    from model_server.predictionlog import models

    deadline = None if max_seconds is None else clock() + max_seconds
    if model is not None:
        return _audit_model(
            prediction_log, start, end, model, config, earlier_hours, max_bytes, max_seconds, deadline, clock,
            mirror_percent, mirror_on_to_end,
        )[0]  # fmt: skip
    parts = []
    for name in models(prediction_log):  # (each model apart, as its own audit, within this one's time)
        part, read_until = _audit_model(
            prediction_log, start, end, name, config, earlier_hours, max_bytes, max_seconds, deadline, clock,
            mirror_percent, mirror_on_to_end,
        )  # fmt: skip
        if deadline is not None:  # (its pairs' computing is no read: not the next model's time)
            deadline += clock() - read_until
        if part.verdict == "skip" and mirror_percent is not None:
            # (a model with traffic and no shadow record, behind the mirror asserted: its own audit's
            # judgement, at the least share asserted)
            part = with_coverage(part, least_share(mirror_percent))
        parts.append(part)
    return by_models(parts, start.isoformat(), end.isoformat(), config)


def _audit_model(
    prediction_log: str | Path,
    start: datetime,
    end: datetime,
    model: str,
    config: AuditConfig | None,
    earlier_hours: int,
    max_bytes: int,
    max_seconds: float | None,
    deadline: float | None,
    clock: Callable[[], float],
    mirror_percent: float | MirrorShares | None,
    mirror_on_to_end: bool,
) -> tuple[AuditResult, float]:
    """``audit`` of ``model``, its reads begun by ``deadline`` (``max_seconds``: the bound
    named); and when its reads ended (by ``clock``)."""
    from model_server.predictionlog import (
        AUDIT_COLUMNS,
        MATCHED_TIME,
        matched_times,
        pair_probabilities,
        read,
        shadow_pairs,
    )

    margin = timedelta(seconds=CLOCK_SKEW_S)
    # (to the close: a copy written by then, stamped by a clock further ahead than the margin, is
    # the range's, not lost to it and late to the next; a file's records are stamped by its name)
    records = read(
        prediction_log,
        start - margin,
        closes(end),
        model,
        columns=AUDIT_COLUMNS,
        roles=("primary", "shadow"),
        written=True,
        max_bytes=max_bytes,
        deadline=deadline,
        clock=clock,
    )
    # (each copy matched to its primary as on the read whole, in every part of it taken below:
    # the pods' clock offsets measured on a part, a copy was matched to another attempt there)
    records[MATCHED_TIME] = matched_times(records)
    late = _late(records, closes(end))
    mine, earlier = attribution(records, start, end, late)
    # (copies due by their range's close that came later: lost to its audit, whenever it runs)
    lost = np.zeros(len(records), bool)
    if (mine & late).any():
        lost[mine] = lost_late(_kept(records, mine), lambda at: pd.Series(pd.Timestamp(closes(end)), index=at.index))
    late_earlier = None
    earlier_left = (0, 0)
    earlier_skipped: dict[str, str] = {}  # (the files the earlier hours' reads could not read: why, by path)
    if earlier_hours:
        span = end - start
        if (earlier & _late(records, closes(start))).any():  # (the earlier primaries read: the range before's)
            lost[earlier] = lost_late(_kept(records, earlier), lambda at: earlier_closes(at, start, span))
        # (or stamped after the earlier range's close, in a file named without its written second:
        # never read by it)
        beyond = (records["time"] >= pd.Timestamp(closes(start))).to_numpy()
        came = earlier & (_late(records, closes(start)) | beyond) & ~late & ~lost
        before = read(
            prediction_log,
            start - timedelta(hours=earlier_hours),
            start - margin,
            model,
            columns=LOST_COLUMNS,
            roles=("primary", "shadow"),
            written=True,
            written_after=closes(start),
            max_bytes=max_bytes,  # (apart from the range's: what came late to 24 hours is no bound)
            deadline=deadline,
            clock=clock,
        )
        counted = ~_late(before, closes(end))
        late_earlier = int(came.sum()) + int(counted.sum())
        # (and those of the copies late in the margin: a primary stamped before it was not read)
        stamped = ["model", "request_id", "item", "time"]
        copies = pd.concat(
            [
                before.loc[counted & (before["role"] == "shadow").to_numpy(bool), stamped],
                records.loc[came & _late(records, closes(start)) & (records["role"] == "shadow").to_numpy(), stamped],
            ]
        )
        left = before.attrs["unread_files"], before.attrs["unlisted_folders"], before.attrs["out_of_time"]
        earlier_skipped = dict(before.attrs["skipped_file_reasons"])
        del before  # (its records counted: the stretches of their copies' primaries are read in its place)
        lost_before, again, skipped_again = _lost_before(
            prediction_log, model, copies, start, span, closes(end), max_bytes, deadline, clock,
        )  # fmt: skip
        late_earlier -= int(lost_before.sum())
        earlier_skipped.update(skipped_again)  # (a file each read skipped: counted once)
        for path in records.attrs["skipped_file_reasons"]:  # (this range's own: counted as such, not again)
            earlier_skipped.pop(path, None)
        earlier_left = left[0] + again[0], left[1] + again[1]
        earlier_why = (
            f"within this audit's {max_seconds:g} s"
            if left[2] or again[2]
            else f"over this audit's {max_bytes:,} bytes of records"
        )
    read_until = clock()
    # (of the files written by the range's close: a retry reading copies written later tests the
    # copies, and dates a stop, as the audit at the close did)
    in_time = _kept(records, ~late)
    watermark = shadow_watermark(in_time)
    since = last_copy(in_time) if mirror_percent else None
    del in_time
    # (a copy written late came: late, not lost, but a copy of a primary the server's own mirror
    # sampled, due by the close: lost; marked within the range's own records: a request id an
    # earlier range's primary had too is no copy of this range's. Paired as lost_late pairs them,
    # copy_of on the range's primaries written by the close and all its copies: a late copy it
    # counts lost makes its own primary lost, once)
    paired = mine & ~(late & (records["role"] == "primary").to_numpy(bool))
    requests, _, copied = copy_keys(_kept(records, paired), ~lost[paired])
    keys = requests[~late[paired]], copied[~late[paired]]
    # (shadow evidence written late: shadow records, primaries the server's own mirror sampled)
    late_copies = bool((mine & late & ((records["role"] == "shadow") | records["mirrored"].eq(True))).any())
    late_at = _mirrorable(_kept(records, mine & late))
    late_mirrorable = len(late_at)
    records = _kept(records, mine & ~late)
    pairs = shadow_pairs(records, vectors=False)  # (rebuilt a chunk at a time, below)
    classes = pairs.attrs.get("classes", 0)
    result = audit_by_versions(
        pairs,
        config,
        model,
        start.isoformat(),
        end.isoformat(),
        vectors=lambda rows: pair_probabilities(records, rows, classes),
    )
    result.shadow_without_primary = pairs.attrs["shadow_without_primary"]
    result.primary_without_shadow = pairs.attrs["primary_without_shadow"]
    result.shadow_dropped = pairs.attrs["shadow_dropped"]
    result.input_mismatch = pairs.attrs["input_mismatch"]
    result.self_pairs = pairs.attrs["self_pairs"]
    result.duplicates = pairs.attrs["duplicates"]
    result.primary_failed = pairs.attrs["primary_failed"]
    result.primary_not_finite = pairs.attrs["primary_not_finite"]
    result.late_records = int((mine & late & ~lost).sum())
    in_time_at = _mirrorable(records)
    in_time_mirrorable = len(in_time_at)
    result.primaries_mirrorable = in_time_mirrorable + late_mirrorable
    if mirror_percent is not None and result.primaries_mirrorable:
        result.mirrorable_percent = _mirrorable_percent(pd.concat([in_time_at, late_at]), mirror_percent)
    if mirror_percent is not None and late_mirrorable:
        # (behind a mirror asserted, primaries written late whose missing copies tip the chance
        # test, the in-time ones alone not: the mirror's evidence is late, not lost)
        percent = least_share(mirror_percent)
        late_copies |= not silence_unlikely(in_time_mirrorable, percent) and silence_unlikely(
            result.primaries_mirrorable, percent
        )
    result.late_earlier = late_earlier
    mirrored = pairs["primary_version"].unique() if len(pairs) else []
    result.copies_lost, eligible, copied = copy_masks(records, mirrored, watermark, keys)
    share = np.zeros(0)
    if mirror_percent is not None and eligible.any():
        share = share_at(records["time"][eligible], mirror_percent)
        known = ~np.isnan(share)
        eligible[eligible] = known
        share = share[known]
    result.copies_eligible, result.copies_received = int(eligible.sum()), int((eligible & copied).sum())
    if mirror_percent and result.copies_eligible and share.any():
        result.copies_percent = float(share.mean())
        result.copies_p = copies_short(result.copies_received, result.copies_eligible, share)
    if result.verdict == "skip" and (result.shadow_without_primary or result.shadow_dropped or result.copies_lost):
        # Shadow traffic, none of it compared: no empty range.
        result.verdict = "inconclusive"
        result.reasons = [
            f"no shadow record in this range pairs with its primary, nothing is shown: "
            f"{result.shadow_without_primary} shadow records without their primary (its replica's log "
            f"files not read or not written, or stamped in another range), {result.shadow_dropped} "
            f"copies dropped ({DROPPED_WHY}), {result.copies_lost} copies lost"
        ]
    skipped = records.attrs["skipped_file_reasons"]
    result.skipped_files = len(skipped)
    if skipped:
        # A replica writing another schema, or a damaged file: its records are missing, so what
        # remains may be too little or one-sided; an hour of such files alone is not an empty hour.
        path, why = next(iter(skipped.items()))
        result.reasons.insert(
            0,
            f"{len(skipped)} prediction log files in this range could not be read, their records are "
            f"not in this audit: nothing is shown (first: {printable(str(path))[-120:]}: {printable(str(why))[:200]})",
        )
        if result.verdict in ("pass", "skip"):
            result.verdict = "inconclusive"
    result.unread_files, result.unread_bytes = records.attrs["unread_files"], records.attrs["unread_bytes"]
    result.unlisted_folders, result.out_of_time = records.attrs["unlisted_folders"], records.attrs["out_of_time"]
    result.crowded_folders = records.attrs["crowded_folders"]
    if result.crowded_folders:
        from model_server.predictionlog import MAX_LISTED_FILES

        result.reasons.insert(
            0,
            f"{result.crowded_folders} hour folders of this range hold more than {MAX_LISTED_FILES:,} prediction "
            "log files (MAX_LISTED_FILES: a writer flushing far too often?): listed in part, the records of the "
            "files beyond are not in this audit: nothing is shown",
        )
        if result.verdict in ("pass", "skip"):
            result.verdict = "inconclusive"
    if result.unread_files or result.unlisted_folders:
        listed = result.unread_files + len(skipped) + records.attrs["files_read"]
        unlisted = f", and {result.unlisted_folders} of its hour folders not listed" if result.unlisted_folders else ""
        why = (
            f"this audit's reads take at most {max_seconds:g} s (MAX_AUDIT_S: a slow store, or very many files)"
            if result.out_of_time
            else f"this audit holds at most {max_bytes:,} bytes of records (MAX_AUDIT_BYTES)"
        )
        result.reasons.insert(
            0,
            f"{result.unread_files} of {listed} prediction log files of this range ({result.unread_bytes:,} bytes "
            f"stored) were not read{unlisted}: {why}, theirs are not in it: nothing is shown",
        )
        if result.verdict in ("pass", "skip"):
            result.verdict = "inconclusive"
    result.malformed_records = records.attrs["skipped_records"]
    if result.malformed_records:
        # (no writer of the log writes them: a damaged or foreign file's, missing as its files')
        result.reasons.insert(
            0,
            f"{result.malformed_records} prediction log records in the files of this range were malformed "
            "(no time, request id, outcome or known role, an output no answer can hold), not in this audit: nothing is shown",
        )
        if result.verdict in ("pass", "skip"):
            result.verdict = "inconclusive"
    if result.late_records:
        late_reason = (
            f"{result.late_records} records of this range were written after it closed "
            f"({closes(end).isoformat()}: a flush slower than the writers' bound, or a pod's clock "
            "ahead): not in this audit"
        )
        if result.verdict == "skip" and late_copies:  # (copies there were, none in time: no empty range)
            result.verdict, result.reasons = "inconclusive", [late_reason]
        else:
            result.reasons.append(late_reason)
    result.earlier_skipped_files = len(earlier_skipped)
    if earlier_skipped:
        # (as this range's files that could not be read: counted, the first named; their records
        # are not in the count of what came late to the earlier ranges)
        path, why = next(iter(earlier_skipped.items()))
        result.reasons.append(
            f"{len(earlier_skipped)} prediction log files of the {earlier_hours} hours before this range could not "
            f"be read (first: {printable(str(path))[-120:]}: {printable(str(why))[:200]}): at least {late_earlier} "
            "of their records came after their audit closed"
        )
        if result.verdict == "skip":
            result.verdict = "warning"
    if any(earlier_left):
        # (what came late to earlier ranges is a count beside this range's audit, not its evidence)
        result.reasons.append(
            f"the {earlier_hours} hours before this range were looked through in part ({earlier_left[0]} files "
            f"not read, {earlier_left[1]} hour folders not listed {earlier_why}): "
            f"at least {late_earlier} of their records came after their audit closed"
        )
        if result.verdict == "skip":
            result.verdict = "warning"
    elif late_earlier and not earlier_skipped:  # (said "at least" above where files were skipped)
        result.reasons.append(
            f"{late_earlier} records of the {earlier_hours} hours before this range came after their "
            "audit closed, or were stamped beyond its margin (a pod's clock ahead): in none"
        )
        if result.verdict == "skip":
            result.verdict = "warning"
    if result.self_pairs and not result.rows:
        result.reasons.append(
            f"{result.self_pairs} shadow copies in this range were of requests their own version served "
            "(Istio's weighted route mirrors them all): no comparison, left out"
        )
    if result.input_mismatch:
        result.reasons.append(
            f"{result.input_mismatch} shadow records were not a mirror copy of their primary "
            "(another input under its request id): excluded"
        )
    if result.duplicates:
        result.reasons.append(
            f"{result.duplicates} records repeated the request id and item of another (a client re-sending "
            "it, a copy made twice): of each request id and item one request compared (the earliest that "
            "succeeded with a copy of its own that ran, a retry where an earlier attempt failed or had none; "
            "else the earliest with such a copy, else the earliest that succeeded, else the earliest), the "
            "repeats left out"
        )
    if result.primary_failed:
        result.reasons.append(
            f"{result.primary_failed} pairs whose primary failed (the request answered with an error: its copy "
            "no comparison), left out; of a request id sent again, a request that succeeded with a copy of its "
            "own is compared"
        )
    result.reasons += copies_text(result)
    stopped = None
    if mirror_percent and (mirror_on_to_end or not isinstance(mirror_percent, int | float)):
        stopped = mirror_stopped(records, mirrored, since, mirror_percent)
    if stopped is not None and since is not None:
        after, percent, p = stopped
        result.mirror_stopped = since.isoformat()
        result.reasons.insert(
            0,
            f"the mirror stopped sending: its last copy was stamped {since.isoformat()}, and the {after} requests "
            f"after it, behind a mirror of {percent:.3g}% ({after * percent / 100:.0f} copies expected), brought "
            f"too few (p={p:.2g}, below {COPIES_ALPHA:g}): the shadow's pods stopped writing, or Envoy stopped "
            "mirroring to them; the requests since are not compared, nothing is shown of them",
        )
        if result.verdict in ("pass", "skip"):
            result.verdict = "inconclusive"
    if result.primary_not_finite:
        result.reasons.append(
            f"{result.primary_not_finite} primary answers were no finite distribution (NaN or Inf, as a "
            "client's NaN or Inf input gives): no comparison, excluded"
        )
    return result, read_until


MAX_PAIRS_PLOTTED = 6  # pairs of versions the chart shows a row of (the worst first); all in report.md


def plot(result: AuditResult) -> bytes:
    """The divergence histogram and the confusion matrix, as PNG: a row for each pair of
    versions (the worst ``MAX_PAIRS_PLOTTED``) where the range holds several."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = _pairs(result)
    parts = sorted(pairs, key=lambda p: VERDICT_ORDER.index(p.verdict))[:MAX_PAIRS_PLOTTED]
    rows = parts or [result]
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 4.2 * len(rows)), squeeze=False)
    for (ax1, ax2), part in zip(axes, rows, strict=True):
        model = f"{shown(str(part.model))}, " if result.by_models else ""
        _plot_pair(part, ax1, ax2, f"{model}{part.pair_name}: {part.verdict.upper()}; " if parts else "")
    more = f" ({len(parts)} of {len(pairs)} pairs of versions: the rest in the report)"
    fig.suptitle(
        f"Shadow audit{' of ' + result.model if result.model else ''}: {result.verdict.upper()}"
        + (more if len(pairs) > len(parts) else "")
    )
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=110)
    plt.close(fig)
    return out.getvalue()


def _plot_pair(result: AuditResult, ax1: Any, ax2: Any, title: str) -> None:
    if result.divergences is not None:
        # (bins fixed over the range shown: 40 of the data's own range, values a bit apart, fail)
        ax1.hist(np.clip(result.divergences, 0, 2), bins=np.linspace(0, 2, 41), color="#4477aa")
        ax1.axvline(AuditConfig().divergence_threshold, color="#cc3311", linestyle="--", label="anomaly threshold")
        ax1.set_yscale("log")
        ax1.legend()
    ax1.set_xlabel("KL(primary || shadow) per request")
    ax1.set_ylabel("requests")
    ax1.set_title(f"{title}output divergence" if title else "Output divergence")
    if result.confusion is not None:
        m = result.confusion.to_numpy()
        ax2.imshow(np.log1p(m), cmap="Blues")
        if len(m) <= MAX_CONFUSION_SHOWN:  # (a thousand classes: the cells without their labels)
            ax2.set_xticks(range(len(result.confusion.columns)), result.confusion.columns)
            ax2.set_yticks(range(len(result.confusion.index)), result.confusion.index)
            for (i, j), v in np.ndenumerate(m):
                if v:
                    ax2.text(j, i, str(v), ha="center", va="center", fontsize=7)
    ax2.set_xlabel("shadow top-1")
    ax2.set_ylabel("primary top-1")
    agreement = f"{100 * result.agreement:.2f}%" if result.agreement is not None else "n/a"
    ax2.set_title(f"Confusion (agreement {agreement})")


REPORT, CHART = "report.md", "divergence.png"
# An hour's mark, written once its report reached Slack or it had nothing to audit: an hour
# without it within a run's catch-up window is audited again.
AUDITED = "audited.json"
# (RUN_REPORT: the hour's report's outbox name and post, ``steps.send_once``'s: kept by write_report)
REPORT_NAMES = frozenset({REPORT, CHART, "summary.json", "confusion.csv", "anomalies.csv", AUDITED, RUN_REPORT})


def printable(text: str) -> str:
    """``text`` with each control character (a line break, a tab) as a space."""
    return "".join(c if c.isprintable() else " " for c in text)


# Characters of a value the log's writer chose (a version, a request id) that a report shows: the
# model server's request ids are 128 at most, its versions numbers; another writer's may be a megabyte.
MAX_SHOWN = 128


def shown(text: str) -> str:
    """A value the log's writer chose as a report shows it: on one line (``printable``), cut to
    ``MAX_SHOWN`` characters, an ellipsis marking the cut."""
    text = text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 1] + "…"
    return printable(text)


MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>&|~])")


def markdown_text(text: str) -> str:
    """Text holding what someone else chose (a reason naming a version the log names, a file's
    path) in a line of report.md: on one line (``printable``), each character Markdown or HTML
    would read as markup escaped, so it reads as the text it is (no heading, link, image,
    emphasis or table cell of its own; a bare URL stays one, as it reads)."""
    return MARKDOWN_SPECIAL.sub(r"\\\1", printable(text))


def code_span(text: str) -> str:
    """Text someone else chose (a version the log names) in a line of report.md as a code span,
    so nothing in it is markup (no link, image or HTML), on one line."""
    text = printable(text)
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}"


def code_cell(text: str) -> str:
    """Text someone else chose (a client's request id) as a Markdown table cell: a code span
    (``code_span``), its ``|`` escaped, so it cannot split the row into other columns."""
    return code_span(printable(text).replace("|", "\\|"))


def versions_text(result: AuditResult, between: str = ", ") -> str:
    """report.md's name of a pair of versions (``pair_name``): a version a number (as the model
    repository's are) as it is, any other the log names a ``code_span``."""

    def version(v: str) -> str:
        return v if re.fullmatch(r"[0-9]{1,20}", v) else code_span(shown(v))

    primary, shadow = (", ".join(map(version, result.versions[k])) for k in ("primary", "shadow"))
    return f"primary {primary}{between}shadow {shadow}"


def csv_cell(value: Any) -> Any:
    """A text cell of a CSV as a report shows it (``shown``: on one line, cut), led by a ``'``
    (which makes it text) where a spreadsheet would run it as a formula: it starts, after
    spaces, with ``=``, ``+``, ``-`` or ``@`` (a client's request id such as
    ``=HYPERLINK(...)``). Other values as they are."""
    if not isinstance(value, str):
        return value
    value = shown(value)
    return "'" + value if value.lstrip().startswith(("=", "+", "-", "@")) else value


def csv_frame(df: pd.DataFrame) -> bytes:
    """``df`` as CSV, its text cells as ``csv_cell`` makes them."""
    text = df.select_dtypes(include=["object", "string"]).columns
    return df.assign(**{c: df[c].map(csv_cell) for c in text}).to_csv(index=False).encode()


def digest_cell(value: Any) -> str:
    """An item's image sha256 (its first 16 characters) as a Markdown table cell: a hex digest
    as it is, anything else a writer put there as ``code_cell`` makes it."""
    digest = short_digest(value, 16)
    return digest if re.fullmatch(r"[0-9a-f]+|-", digest) else code_cell(digest)


def short_digest(value: Any, n: int) -> str:
    """The first ``n`` characters of an item's image sha256; ``-`` where it has none (no input
    was decoded, or it could not be hashed item by item: such a pair is kept, unchecked)."""
    return value[:n] if isinstance(value, str) else "-"


MAX_CONFUSION_SHOWN = 30  # classes whose confusion matrix report.md and the chart show whole


def disagreements(confusion: pd.DataFrame, top: int = 20, level: str = "##") -> list[str]:
    """report.md's lines for a confusion matrix too large to show: its most frequent
    disagreements (primary, shadow, count)."""
    m = confusion.to_numpy().copy()
    np.fill_diagonal(m, 0)
    cells = np.flatnonzero(m)
    cells = cells[np.argsort(-m.ravel()[cells], kind="stable")][:top]
    rows, cols = np.unravel_index(cells, m.shape)
    return [
        f"{level} Most frequent disagreements ({len(cells)} of {int((m > 0).sum())}; {len(confusion)} classes: "
        "the whole matrix is in confusion.csv)",
        "",
        "| primary top-1 | shadow top-1 | requests |",
        "| --- | --- | --- |",
        *(f"| {confusion.index[i]} | {confusion.columns[j]} | {m[i, j]} |" for i, j in zip(rows, cols, strict=True)),
    ]


def _pair_lines(result: AuditResult, level: str) -> list[str]:
    """report.md's lines of one pair of versions' numbers, confusion and anomaly samples, its
    sections' headings at ``level`` (``##``)."""
    cfg = result.config
    lines: list[str] = []
    if result.agreement is not None and result.agreement_ci is not None:
        lo, hi = result.agreement_ci
        lines += [
            f"- Versions: {versions_text(result, '; ')}",
            f"- Top-1 agreement: {percent_beside(result.agreement, cfg.min_agreement)}% "
            f"({100 * cfg.confidence_level:g}% Wilson interval {percent_beside(lo, cfg.min_agreement)}% to "
            f"{percent_beside(hi, cfg.min_agreement)}%; minimum {limit_percent(cfg.min_agreement)}%)",
            "- KL divergence of the mean output distributions: "
            + ("n/a (no pair's outputs compare)" if result.kl_of_means is None else f"{result.kl_of_means:.5f}"),
            "- Per-request KL(primary || shadow): "
            + ", ".join(f"{k} {v:.4f}" for k, v in result.divergence_quantiles.items()),
            f"- Anomalies (shadow confidence < {cfg.confidence_threshold:g} where the primary's was not, or divergence > "
            f"{cfg.divergence_threshold:g}): {percent_beside(result.anomaly_rate or 0, cfg.max_anomaly_rate)}% "
            f"(limit {limit_percent(cfg.max_anomaly_rate)}%)",
        ]
    if result.confusion is not None:
        if len(result.confusion) <= MAX_CONFUSION_SHOWN:
            lines += [
                "",
                f"{level} Confusion (rows: primary top-1, columns: shadow top-1)",
                "",
                result.confusion.to_markdown(),
            ]
        else:  # (a thousand classes: a table of a million cells; the whole in confusion.csv)
            lines += ["", *disagreements(result.confusion, level=level)]
    if result.anomalies is not None:
        lines += [
            "",
            f"{level} Anomaly samples ({len(result.anomalies)} shown, by divergence)",
            "",
            "| request | item | image sha256 | primary | shadow | confidence | divergence | reason |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {code_cell(str(r.request_id)[:16])} | {r.item} | {digest_cell(r.image_sha256)} | {r.primary_top1} | "
            f"{r.shadow_top1} | "
            f"{r.shadow_confidence:.3f} | {r.divergence:.3f} | {r.reason} |"
            for r in result.anomalies.itertuples()
        ]
    return lines


def _by_versions(frames: list[pd.DataFrame | None], parts: list[AuditResult]) -> pd.DataFrame | None:
    """The pairs' tables (``frames``, one a pair of ``parts``) as one, each row led by its pair's
    versions (and its model, where the pairs are of several: ``_pairs``)."""
    several = len({part.model for part in parts}) > 1
    led = [
        frame.assign(
            **({"model": part.model} if several else {}),
            primary_version=", ".join(part.versions["primary"]),
            shadow_version=", ".join(part.versions["shadow"]),
        )
        for frame, part in zip(frames, parts, strict=True)
        if frame is not None
    ]
    if not led:
        return None
    table = pd.concat(led, ignore_index=True)
    first = (["model"] if several else []) + ["primary_version", "shadow_version"]
    return table[first + [c for c in table.columns if c not in first]]


def _pairs(result: AuditResult) -> list[AuditResult]:
    """The audits of each pair of versions ``result`` holds apart (``by_versions``, of each of
    its models: ``by_models``, those with pairs); none where it is one pair's."""
    if result.by_models:
        return [pair for model in result.by_models for pair in (model.by_versions or [model]) if pair.versions]
    return result.by_versions


def _part_lines(part: AuditResult, cfg: AuditConfig) -> list[str]:
    """report.md's lines of a part of an audit (a pair of versions, a model) below its heading:
    its verdict and records."""
    return [
        f"- Verdict: **{part.verdict.upper()}**: " + "; ".join(map(markdown_text, part.reasons)),
        f"- Records: {part.rows} (shadow errors {part.shadow_errors}, "
        f"{percent_beside(part.shadow_error_rate, cfg.max_shadow_error_rate, 3)}%)",
    ]


def _sections(result: AuditResult, level: str) -> list[str]:
    """report.md's lines of ``result``'s pairs of versions: a section of each at ``level`` where
    it holds several (``by_versions``), else its numbers."""
    if not result.by_versions:
        return _pair_lines(result, level)
    lines: list[str] = []
    for part in result.by_versions:
        lines += ["", f"{level} P{versions_text(part)[1:]}: {part.verdict.upper()}", ""]
        lines += [*_part_lines(part, result.config), *_pair_lines(part, level + "#")]
    return lines


def report_files(result: AuditResult) -> dict[str, bytes]:
    """The report's files by name: report.md, summary.json, and where the audit has them
    confusion.csv, anomalies.csv and the chart (``CHART``). A range of several pairs of versions
    has a section of report.md for each, and their tables in one CSV, each row led by its pair."""
    cfg = result.config
    files: dict[str, bytes] = {}
    lines = [
        f"# Shadow audit: {result.model or 'all models'}",
        "",
        f"- Range: {result.start} to {result.end}",
        f"- Verdict: **{result.verdict.upper()}**: " + "; ".join(map(markdown_text, result.reasons)),
        f"- Records: {result.rows} (shadow errors {result.shadow_errors}, "
        f"{percent_beside(result.shadow_error_rate, cfg.max_shadow_error_rate, 3)}%; limit "
        f"{limit_percent(cfg.max_shadow_error_rate)}%)",
        f"- Unpaired: shadow records without their primary {result.shadow_without_primary}, primaries "
        f"without their shadow {result.primary_without_shadow}, copies dropped {result.shadow_dropped} "
        f"({DROPPED_WHY})",
        f"- Copies: lost (sampled by the server's mirror, no shadow record) {result.copies_lost}; behind a mirror "
        f"sampling on its own, {result.copies_received} of {result.copies_eligible} requests copied"
        + (
            ""
            if result.copies_p is None or result.copies_percent is None
            else f" ({result.copies_eligible * result.copies_percent / 100:.0f} expected at "
            f"{result.copies_percent:.3g}%, p={result.copies_p:.2g}; warned below {COPIES_ALPHA:g})"
        ),
        f"- Shadow records not a mirror copy of their primary (another input, excluded): {result.input_mismatch}",
        f"- Items mirrored to the version that served them (no comparison, excluded): {result.self_pairs}",
        f"- Records repeating an earlier one's request id and item (not audited): {result.duplicates}",
        f"- Pairs whose primary failed (no comparison, not audited): {result.primary_failed}",
        f"- Primary answers that were no finite distribution (NaN or Inf; no comparison, excluded): "
        f"{result.primary_not_finite}",
        f"- Shadow answers alone no finite distribution (anomalies, out of the agreement): {result.shadow_not_finite}",
        f"- Pairs whose outputs differ in dtype or shape (disagreements, no divergence): {result.output_differs}",
        f"- Prediction log files that could not be read (their records not audited): {result.skipped_files}",
        f"- Prediction log files not read (over the audit's "
        f"{'time' if result.out_of_time else 'memory bound'}): {result.unread_files} "
        f"({result.unread_bytes:,} bytes stored)"
        + (f", hour folders not listed: {result.unlisted_folders}" if result.unlisted_folders else "")
        + (
            f", hour folders listed in part (too many files): {result.crowded_folders}"
            if result.crowded_folders
            else ""
        ),
        f"- Malformed records in the files read (not audited): {result.malformed_records}",
        f"- Records written after this range closed (not audited): {result.late_records}",
        *(
            [
                f"- Pairs of versions not audited (over {MAX_VERSION_PAIRS}): {result.pairs_left_out} "
                f"({result.records_left_out} records)"
            ]
            if result.pairs_left_out
            else []
        ),
        *(
            [f"- Records of earlier ranges that came after theirs closed (in no audit): {result.late_earlier}"]
            if result.late_earlier is not None
            else []
        ),
        *(
            [
                "- Prediction log files of earlier ranges that could not be read (their records not counted): "
                f"{result.earlier_skipped_files}"
            ]
            if result.late_earlier is not None
            else []
        ),
    ]
    if result.by_models:
        for model in result.by_models:
            lines += ["", f"## Model {markdown_text(str(model.model))}: {model.verdict.upper()}", ""]
            lines += [*_part_lines(model, cfg), *_sections(model, "###")]
    else:
        lines += _sections(result, "##")
    parts = _pairs(result)
    if parts:
        # (each pair's matrix its own rows, of the classes any pair's answers named: 0 elsewhere)
        confusion = _by_versions([None if p.confusion is None else p.confusion.reset_index() for p in parts], parts)
        if confusion is not None:
            counts = [
                c for c in confusion.columns if c not in ("model", "primary_version", "shadow_version", "primary")
            ]
            confusion[counts] = confusion[counts].fillna(0).astype(int)
            files["confusion.csv"] = csv_frame(confusion)
        anomalies = _by_versions([p.anomalies for p in parts], parts)
    else:
        if result.confusion is not None:
            files["confusion.csv"] = result.confusion.to_csv().encode()
        anomalies = result.anomalies
    if anomalies is not None:
        files["anomalies.csv"] = csv_frame(anomalies)
    if result.verdict != "skip":
        files[CHART] = plot(result)
        lines += ["", f"![divergence and confusion]({CHART})"]
    files["summary.json"] = (json.dumps(result.to_dict(), indent=2, default=str) + "\n").encode()
    files[REPORT] = ("\n".join(lines) + "\n").encode()
    return files


def write_report(files: dict[str, bytes], folder: Folder) -> dict[str, str]:
    """``report_files`` in ``folder``, the report itself last (the rest is there once it is);
    where each is, by name. An earlier report's files go first, its ``AUDITED`` mark and then its
    report before all: a report written again is not audited until it is sent, keeps no file of
    another run, and one cut short (a full disk, a kill) leaves no earlier report beside its files."""
    folder.delete(AUDITED)
    folder.delete(REPORT)
    for stale in set(folder.names()) & REPORT_NAMES - files.keys() - {RUN_REPORT}:
        folder.delete(stale)
    return {name: folder.write(name, files[name]) for name in sorted(files, key=lambda n: n == REPORT)}


def hour_folder(audits: Folder, start: datetime) -> Folder:
    """Where the audit of the clock hour from ``start`` is kept, below a model's audits."""
    return audits / start.strftime("%Y%m%dT%H")


HOUR_NAME = re.compile(r"\d{8}T\d{2}")  # (hour_folder's names)
TEMPORARY_AGE_S = 3600  # a temporary file this old is no write in progress: one killed mid-way


def prune_hours(audits: Folder, before: datetime, limit: int = 500, dry_run: bool = False) -> list[str]:
    """The folders of the hours that start before ``before`` below a model's audits removed,
    the oldest ``limit`` at most (a year of hours the first time takes its runs' turns): their
    report's files (``REPORT_NAMES``, and those a write or removal killed mid-way left:
    ``remove_temporaries``), then the folder once empty (a file the audit did not write keeps
    it, and a folder of another name is never touched); the names of those that went (``dry_run``: of those that would, nothing removed).
    ``before`` must be earlier than any hour a run may still audit (its catch-up window): an
    hour without its ``AUDITED`` mark is audited again."""
    removed: list[str] = []
    cutoff = hour_folder(audits, before).parts[-1]  # (the names sort as their hours do)
    for name in [n for n in audits.folders() if HOUR_NAME.fullmatch(n) and n < cutoff][:limit]:
        folder = audits / name
        old = time.time() - TEMPORARY_AGE_S
        if dry_run:
            killed = set(folder.remove_temporaries(REPORT_NAMES.__contains__, old, dry_run=True))
            if set(folder.changed()) - killed <= REPORT_NAMES and not folder.folders():
                removed.append(name)
            continue
        folder.remove_temporaries(REPORT_NAMES.__contains__, old)
        for stale in set(folder.names()) & REPORT_NAMES - {AUDITED}:
            folder.delete(stale)
        folder.delete(AUDITED)  # (last: a prune cut short leaves the hour audited, not audited again)
        if folder.remove_if_empty():
            removed.append(name)
    return removed


def unaudited_hours(audits: Folder, start: datetime, hours: int) -> list[datetime]:
    """The ``hours`` clock hours before ``start`` (oldest first) whose folder holds no ``AUDITED``
    mark: missed while the scheduler was down, or reported where Slack did not take it."""
    earlier = (start - timedelta(hours=k) for k in range(hours, 0, -1))
    return [hour for hour in earlier if AUDITED not in hour_folder(audits, hour).names()]


def with_coverage(
    result: AuditResult, mirror_percent: float | None, silent_before: tuple[int, float, int] = (0, 0.0, 0)
) -> AuditResult:
    """Coverage (the share of mirrored copies that ran) in the reasons; and a model's range
    without shadow records while a mirror was configured (``mirror_percent`` > 0 during it) is a
    ``warning``, reported like any audit, never a silent skip, where its primaries a mirror could
    have sampled make no copy at all unlikely at that share (``silence_unlikely``); an idle range,
    or one of a few requests none of which was likely sampled, stays a skip (a quiet model warned
    every quiet hour), unless with those of the ranges just before it likewise silent behind a
    mirror (``silent_before``: their primaries a mirror could have sampled, their least share,
    how many ranges) no copy at all is unlikely: a mirror broken for hours on a quiet model is
    warned of once the hours make it a sign. An audit of several models (no model of its own)
    was judged model by model (``audit``), never on their requests pooled."""
    ran, dropped = result.rows, result.shadow_dropped
    if ran + dropped:
        result.reasons.append(
            f"coverage {100 * ran / (ran + dropped):.1f}%: {ran} shadow copies ran, {dropped} dropped ({DROPPED_WHY})"
        )
    if result.verdict == "skip" and mirror_percent and result.model is not None:
        # (each primary at its time's share, where the audit knew the shares over time)
        tested = mirror_percent if result.mirrorable_percent is None else result.mirrorable_percent
        if silence_unlikely(result.primaries_mirrorable, tested):
            result.verdict = "warning"
            result.reasons = [
                f"a mirror of {mirror_percent:g}% was configured during this range, but the prediction "
                "log holds no shadow record of it: the copies are dropped, not written, or no request "
                "reached the mirrored version",
                *result.reasons[1:],
            ]
        elif silent_before[2] and silence_unlikely(
            total := result.primaries_mirrorable + silent_before[0], least := min(tested, silent_before[1])
        ):
            result.verdict = "warning"
            result.reasons = [
                f"a mirror of {least:.3g}% or more was configured during this range and the {silent_before[2]} hours "
                f"before it, but the prediction log holds no shadow record of it in any: {total} requests it could "
                "have sampled, none copied: the copies are dropped, not written, or no request reached the mirrored "
                "version",
                *result.reasons[1:],
            ]
    return result
