"""Slack reports: Block Kit messages for stages, promotions, rollbacks and audits, with a chart.

A rollback message names the failing check with its numbers and the reason, not just
"canary failed". Messages go through slack-sdk (``chat.postMessage``, then the chart with
``files_upload_v2`` in the message's thread); without a token they are written to an outbox
folder as JSON (and the chart as PNG), so the one-machine setup keeps every report, and so
are those Slack did not take; ``send_waiting`` (``rolloutctl outbox send``) sends them later.
Slack's limits are enforced here: at most 50 blocks, 3000 characters per text, 2000 per field,
10,000 in all (``fit``).

Every mrkdwn text is escaped as Slack asks (``&``, ``<``, ``>``): the reports carry strings
others wrote (a server's error message, an approver's name), and in Slack ``<!channel>`` pings
a whole channel and ``<https://x|text>`` is a link that says anything. Such strings are also
put on one line (``one_line``), so that none can add a line that reads like the report's own.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import http.client
import json
import logging
import math
import os
import re
import socket
import time
import urllib.error
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

import numpy as np

from model_server.credentials import scrub
from vision_rollout.audit import OUTPUT_DIFFERS, AuditResult, printable, short_digest
from vision_rollout.folders import (
    Folder,
    NotAFile,
    TooLarge,
    WriteConflict,
    guarded_by,
    read_regular,
    temporary_of,
)
from vision_rollout.gates import Check, Verdict, limit_percent, percent_beside
from vision_rollout.spec import RolloutSpec

if TYPE_CHECKING:
    from vision_rollout.engine import StageWindow

log = logging.getLogger(__name__)

MAX_BLOCKS = 50
MAX_TEXT = 3000
MAX_FIELD = 2000  # a section's field
# All of a message's texts together: Slack refuses more (msg_blocks_too_long) at about 12,000
# characters, its block containers counted in too; undocumented, hence the margin.
MAX_TOTAL_TEXT = 10_000
# Slack's rate limit (HTTP 429): the call is made again after its Retry-After, as slack-sdk
# recommends, twice at most and only for a wait this long at most (a longer one: the outbox).
RATE_LIMIT_RETRIES = 2
MAX_RETRY_AFTER_S = 30
MAX_REPORT_BYTES = 1 << 20  # an outbox report (its texts within MAX_TOTAL_TEXT) is a few KiB
MAX_CHART_BYTES = 16 << 20  # a report's PNG chart is about 100 KiB
MAX_MARK_BYTES = 64 << 10  # a report's sent mark: Slack's answer's ids
ICONS = {
    "pass": ":large_green_circle:",
    "fail": ":red_circle:",
    "wait": ":large_yellow_circle:",
    "inconclusive": ":large_yellow_circle:",  # (an audit's)
    "warning": ":large_yellow_circle:",
    "info": ":white_circle:",
    "skip": ":white_circle:",
}


def _text(s: str) -> str:
    return s if len(s) <= MAX_TEXT else s[: MAX_TEXT - 1] + "…"


_CUT_ENTITY = re.compile(r"&[a-z]{0,3}$")


def mrkdwn(s: str, limit: int = MAX_TEXT) -> str:
    """``s`` as Slack mrkdwn text: ``&``, ``<`` and ``>`` escaped (Slack's control characters:
    mentions, links), cut to ``limit`` characters without splitting an escape."""
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return s if len(s) <= limit else _CUT_ENTITY.sub("", s[: limit - 1]) + "…"


def unescape(s: str) -> str:
    """``mrkdwn``'s escapes undone: the text as its reader sees it."""
    return s.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def redacted(message: Message, redact: Callable[[str], str]) -> Message:
    """``message`` with ``redact`` (a secrets masker's) applied to its fallback text and to each
    text of its blocks as its reader sees it: a mrkdwn text unescaped first, the masker knowing
    ``a&b`` and not ``a&amp;b``, then escaped again, never longer. A text holding a link (the
    report's own ``<url|text>``, the rest being escaped) is redacted as it is."""
    blocks = json.loads(json.dumps(message.blocks))
    for t in (t for b in blocks for t in _text_objects(b)):
        text = t.get("text", "")
        if t.get("type") == "mrkdwn" and "<" not in text:
            seen = unescape(text)
            masked = redact(seen)
            t["text"] = text if masked == seen else mrkdwn(masked, len(text))
        else:
            t["text"] = redact(text)
    return replace(message, text=redact(message.text), blocks=blocks)


def one_line(s: str) -> str:
    """Text from elsewhere on one line (line breaks and other control characters as spaces),
    without the credentials it may quote, each as ``***`` (``scrub``: found as the model server's
    masking finds them, a URL's ``user:password@`` whole). Scrubbed as it came (a private key's
    lines are lines: its last, shorter one is one only at its line's start and end) and again on
    one line (a key and its value that only a line break held apart)."""
    return scrub(" ".join(printable(scrub(s)).split()))


def header(text: str) -> dict[str, Any]:
    return {"type": "header", "text": {"type": "plain_text", "text": _text(text)[:150]}}


def section(markdown: str, fields: list[str] | None = None) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "section", "text": {"type": "mrkdwn", "text": mrkdwn(markdown)}}
    if fields:
        block["fields"] = [{"type": "mrkdwn", "text": mrkdwn(f, MAX_FIELD)} for f in fields[:10]]
    return block


def context(markdown: str) -> dict[str, Any]:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": mrkdwn(markdown)}]}


def run_url(base_url: str | None, dag_id: str, run_id: str) -> str | None:
    """The Airflow UI's page of a DAG run (its grid, its tasks and their logs):
    ``<base_url>/dags/<dag_id>/runs/<run_id>``, as Airflow 3's own task log links, each name
    URL-quoted. None without a base URL (Airflow's ``[api] base_url``): a guessed localhost link
    would lead nowhere. None too for one that is not ``http(s)://host[/path]``, or that holds a
    character a Slack link cannot carry; a ``user:password@`` part is left out."""
    if not base_url or not base_url.strip():
        return None
    try:
        parts = urlsplit(base_url.strip())
        host = parts.hostname
        parts.port  # noqa: B018 (raises ValueError on a port that is not one)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not host or re.search(r"[\s<>|&\"'`\\]", parts.path + host):
        return None
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return (
        f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"
    )


def with_run(message: Message, url: str | None = None, where: str = "") -> Message:
    """``message`` with a link to its Airflow run (``url``, ``run_url``'s) and where the rollout
    acted (``where``: its model, mesh, namespace), as fields of its first section: a click from
    Slack to the run's grid and logs, no block more (Slack takes 50). The message as it was
    where neither is known."""
    fields = []
    if url:
        fields.append(f"*Airflow run*\n<{url}|{mrkdwn(one_line(unquote(url.rsplit('/runs/', 1)[-1])), 300)}>")
    if where.strip():
        fields.append(f"*Where*\n{mrkdwn(one_line(where), MAX_FIELD - 20)}")
    first = next((i for i, b in enumerate(message.blocks) if b["type"] == "section"), None)
    if not fields or first is None:
        return message
    block = message.blocks[first]
    known = block.get("fields", [])
    if len(known) + len(fields) > 10 or len(fields[0]) > MAX_FIELD:
        return message
    blocks = list(message.blocks)
    blocks[first] = {**block, "fields": [*known, *({"type": "mrkdwn", "text": f} for f in fields)]}
    return replace(message, blocks=blocks)


def _limit(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``blocks`` within Slack's 50 blocks (the last one a note of how many more there were:
    truncated) and ``fit``."""
    if len(blocks) > MAX_BLOCKS:
        blocks = [
            *blocks[: MAX_BLOCKS - 1],
            context(
                f"… truncated to Slack's {MAX_BLOCKS} blocks: {len(blocks) - MAX_BLOCKS + 1} more in the Airflow log"
            ),
        ]
    return fit(blocks)


# The note ending a report whose texts ``fit`` cut (unless it has Slack's 50 blocks: its last is
# ``_limit``'s note then).
CUT_NOTE = "… truncated to Slack's limit on a message's length: texts ending in … are cut"


def _text_objects(block: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for t in (block.get("text"), *block.get("fields", []), *block.get("elements", [])) if t]


def fit(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``blocks`` with their texts together within ``MAX_TOTAL_TEXT`` characters: the longest
    mrkdwn texts cut to one length, as few as that takes, each ending in "…", and a last block
    saying so (``CUT_NOTE``, where there is room for a block). A header, and a text holding a
    link (``<url|text>``: only the report's own, the rest is escaped), is kept whole. New
    blocks; ``blocks`` as they were."""
    texts = [t for b in blocks for t in _text_objects(b)]
    total = sum(len(t.get("text", "")) for t in texts)
    if total <= MAX_TOTAL_TEXT:
        return blocks
    noted = any(t.get("text") == mrkdwn(CUT_NOTE) for t in texts)
    if len(blocks) < MAX_BLOCKS and not noted:  # (said, in a text of its own that is not cut)
        blocks = [*blocks, context(CUT_NOTE)]
        total += len(mrkdwn(CUT_NOTE))
        texts = [t for b in blocks for t in _text_objects(b)]

    def cuttable_text(t: dict[str, Any]) -> bool:
        return t.get("type") == "mrkdwn" and "<" not in t["text"] and t["text"] != mrkdwn(CUT_NOTE)

    cuttable = sorted(len(t["text"]) for t in texts if cuttable_text(t))
    room = MAX_TOTAL_TEXT - (total - sum(cuttable))
    cap = 0
    for i, n in enumerate(cuttable):  # the largest cap whose cut texts fit the room left
        if n * (len(cuttable) - i) > room:
            cap = max(room // (len(cuttable) - i), 2)
            break
        room -= n
    out = json.loads(json.dumps(blocks))
    for t in (t for b in out for t in _text_objects(b)):
        if cuttable_text(t) and len(t["text"]) > cap:
            t["text"] = _CUT_ENTITY.sub("", t["text"][: cap - 1]) + "…"
    return out


def _check_lines(checks: tuple[Check, ...] | list[Check]) -> list[dict[str, Any]]:
    return [section(f"{ICONS.get(c.decision, '')} *{c.name}* ({c.decision}): {c.sentence}") for c in checks]


def _audit_line(audit: AuditResult) -> dict[str, Any]:
    return section(f"{ICONS.get(audit.verdict, '')} *shadow audit* ({audit.verdict}): " + "; ".join(audit.reasons))


@dataclass(frozen=True)
class Message:
    text: str  # the notification fallback
    blocks: list[dict[str, Any]]
    chart: bytes | None = None  # PNG
    thread_ts: str | None = None  # posted as a reply in the thread of this post of its channel


def number(x: float, digits: int = 4) -> str:
    """A check's number for the report: ``n/a`` for NaN (no estimate), never ``-0``."""
    if x != x:
        return "n/a"
    return f"{x + 0.0:.{digits}g}"  # (-0.0 + 0.0 is 0.0)


def p_value(p: float) -> str:
    """A p-value: one that underflowed to 0 is below the smallest a float holds, not 0."""
    return "< 1e-300" if p == 0 else number(p, 3)


def _unit(name: str) -> str:
    """The unit of a check's numbers (``gates.Check``): ``relative`` for latency (0.05 = +5%),
    ``pp`` for a difference of proportions, ``%`` for the shadow error rate, ``ms`` for the P99
    guard; ``""`` for the rest (the rank check's probability, the restart guard's count)."""
    if name == "guard_p99":
        return "ms"
    if name == "guard_shadow_errors":
        return "%"
    if name in ("errors", "oom", "guard_accuracy_drop") or name.startswith("accuracy_"):
        return "pp"
    if name.startswith("latency_") and name != "latency_rank":
        return "relative"
    return ""


def figure(check: Check, x: float) -> str:
    """One of ``check``'s numbers in its unit, as its sentence writes it: a latency change in
    percent and a difference of proportions in pp, each signed and never rounded onto or across
    the check's margin (``percent_beside``); ``n/a`` for NaN."""
    if x != x:
        return "n/a"
    unit = _unit(check.name)
    if unit == "ms":
        return f"{number(x)} ms"
    if unit not in ("relative", "pp", "%"):
        return number(x)
    x += 0.0  # (never -0)
    decimals = 3 if unit == "%" else 2  # (as the sentences: a rate against a limit of 0.1%)
    if check.margin is not None and math.isfinite(x):
        text = percent_beside(x, check.margin, decimals)
    else:
        text = f"{100 * x:.{decimals}f}"
    if unit == "%":
        return text + "%"
    return (text if text.startswith("-") else "+" + text) + ("%" if unit == "relative" else " pp")


def margin_text(check: Check) -> str:
    """``check``'s margin or limit in its unit."""
    assert check.margin is not None
    unit = _unit(check.name)
    if unit == "relative":
        return f"+{limit_percent(check.margin)}%"
    if unit in ("pp", "%"):
        return f"{limit_percent(check.margin)}{' pp' if unit == 'pp' else '%'}"
    return f"{number(check.margin)}{' ms' if unit == 'ms' else ''}"


def _who(spec: RolloutSpec) -> str:
    return f"`{spec.model}` version {spec.candidate_version} (baseline {spec.baseline_version})"


def stage_message(spec: RolloutSpec, weight: int, verdict: Verdict, chart: bytes | None = None) -> Message:
    text = f"{spec.model} v{spec.candidate_version} at {weight}%: gate {verdict.decision.upper()}"
    blocks = [
        header(f"Stage {weight}%: {verdict.decision.upper()}"),
        section(
            f"{_who(spec)}, look {verdict.look} of {verdict.looks}, latency's one-sided level "
            f"{verdict.nominal_alpha:.4g} ({verdict.spending} spending of alpha {verdict.alpha:g})."
        ),
        *_check_lines(verdict.checks),
    ]
    return Message(text, _limit(blocks), chart)


# What a promotion report says of each stage: what it rests on, then the live and replay results,
# then (a stage run more than once: a task cleared, retried, restarted) its runs, and (Prometheus
# restarted without its storage, down) the time its guards were blind.
STAGE_EVIDENCE = ("evidence", "latency_geomean", "errors", "accuracy_live", "accuracy_paired", "runs", "guard_history")


def _preflight_lines(notes: Sequence[str]) -> list[dict[str, Any]]:
    """What the rollout's first step warned of (``engine.preflight``), under the headline."""
    return [context(f"{ICONS['warning']} *Pre-flight:* {note}") for note in notes]


def promotion_message(
    spec: RolloutSpec,
    verdicts: list[Verdict],
    audit: AuditResult | None = None,
    chart: bytes | None = None,
    reason: str = "",
    notes: Sequence[str] = (),
) -> Message:
    """``reason``: the decision's own words (the shadow audit's result, who approved); ``notes``:
    the pre-flight's warnings."""
    text = f"Promoted {spec.model} v{spec.candidate_version} to 100%"
    decision = f"\n*Decision:* {one_line(reason)}" if reason.strip() else ""
    blocks = [
        header(f"Promoted: {spec.model} v{spec.candidate_version} at 100%"),
        section(
            f"{ICONS['pass']} {_who(spec)} passed every stage ({', '.join(f'{w}%' for w in spec.stages)}); "
            f"version {spec.baseline_version} retired, mirror off.{decision}"
        ),
        *_preflight_lines(notes),
    ]
    blocks += _stage_lines(spec, verdicts)
    if audit is not None:
        blocks.append(_audit_line(audit))
    return Message(text, _limit(blocks), chart)


def _stage_lines(spec: RolloutSpec, verdicts: list[Verdict]) -> list[dict[str, Any]]:
    return [
        section(
            f"{ICONS[v.decision]} *{weight}%*: {v.decision.upper()} at look {v.look} of "
            f"{v.looks}. " + " ".join(c.sentence for c in v.checks if c.name in STAGE_EVIDENCE)
        )
        for weight, v in zip(spec.stages, verdicts, strict=False)
    ]


def approval_message(spec: RolloutSpec, verdicts: list[Verdict], reason: str, where: str, hours: float) -> Message:
    """An approver's answer is asked for (``require_approval``): the evidence, where to answer
    (``where``: the run), and what no answer within ``hours`` does."""
    text = f"Approval needed: promote {spec.model} v{spec.candidate_version} to 100%?"
    blocks = [
        header(text),
        section(
            f"{ICONS['wait']} {_who(spec)} passed every stage ({', '.join(f'{w}%' for w in spec.stages)}). "
            f"Promote or Roll back in Airflow's Required Actions ({one_line(where)}); no answer within "
            f"{hours:g} h rolls back.\n*Evidence:* {one_line(reason)}"
        ),
        *_stage_lines(spec, verdicts),
    ]
    return Message(text, _limit(blocks))


def plain_report(spec: RolloutSpec, outcome: str, reason: str) -> Message:
    """A run's decision (``promote`` or ``rollback``) and its reason, without the verdicts' details."""
    done = (
        f"promoted: version {spec.candidate_version} takes 100%"
        if outcome == "promote"
        else f"rolled back: version {spec.baseline_version} takes 100% again"
    )
    text = f"{spec.model} v{spec.candidate_version} against v{spec.baseline_version} {done}. Reason: {one_line(reason)}"
    return Message(text, [section(text)])


def sent_again(message: Message, thread_ts: str | None = None) -> Message:
    """``message``, a run's report sent once more after the run ended (notify cleared in the UI),
    marked as such in its fallback text and first section: it says nothing new happened. With
    ``thread_ts`` (the first report's post), a reply in that report's thread."""
    note = "Sent again: notify was cleared after the run ended; nothing changed since the first report."
    blocks = list(message.blocks)
    first = next((i for i, b in enumerate(blocks) if b["type"] == "section" and "text" in b), None)
    if first is not None:
        text = blocks[first]["text"]
        blocks[first] = {**blocks[first], "text": {**text, "text": mrkdwn(f"_{note}_\n{text['text']}")}}
    return replace(message, text=f"{note} {message.text}", blocks=blocks, thread_ts=thread_ts)


def not_started_message(spec: RolloutSpec, reason: str) -> Message:
    """A run that failed at its first step (the lease, the start checks, the candidate's
    verification or load): it moved no traffic, so the report claims nothing of the routes."""
    text = (
        f"{spec.model} v{spec.candidate_version} against v{spec.baseline_version} was not rolled out: "
        f"its first step failed before the run moved any traffic. Reason: {one_line(reason)}"
    )
    return Message(text, [section(text)])


def rollback_message(
    spec: RolloutSpec,
    reason: str,
    verdict: Verdict | None = None,
    weight: int | None = None,
    audit: AuditResult | None = None,
    chart: bytes | None = None,
    restored: bool = True,
    notes: Sequence[str] = (),
) -> Message:
    """``restored``: the baseline was read back at 100%; False where it was not (routes another
    run or an operator set, a restore that failed or could not be read back): the report then
    says the baseline is not shown to take the traffic, and ``reason`` says what serves.
    ``notes``: the pre-flight's warnings."""
    reason = one_line(reason)
    failing = verdict.failed if verdict is not None else []
    first = failing[0] if failing else None
    headline = f"{first.name}: {first.sentence}" if first else reason
    where = f" at the {weight}% stage" if weight is not None else ""
    if restored:
        text = f"Rolled back {spec.model} v{spec.candidate_version}: {headline}"
        title = f"Rolled back: {spec.model} v{spec.candidate_version}"
        done = f"was rolled back{where}. Version {spec.baseline_version} takes 100% of traffic again; mirror off."
    else:
        text = f"Stopped {spec.model} v{spec.candidate_version}, routes not restored: {headline}"
        title = f"Stopped, routes not restored: {spec.model} v{spec.candidate_version}"
        done = (
            f"was stopped{where}, but version {spec.baseline_version} is not shown to take 100% of traffic "
            "again: check the routes."
        )
    blocks = [
        header(title),
        section(f"{ICONS['fail']} {_who(spec)} {done}\n*Reason:* {reason}"),
        *_preflight_lines(notes),
    ]
    if first is not None:
        fields = [f"*Check*\n{first.name}", f"*Method*\n{first.method}"]
        if first.effect is not None:
            fields.append(f"*Effect*\n{figure(first, first.effect)}")
        if first.ci is not None:
            fields.append(f"*Interval*\n{figure(first, first.ci[0])} to {figure(first, first.ci[1])}")
        if first.margin is not None:
            fields.append(f"*Margin / limit*\n{margin_text(first)}")
        if first.p_value is not None:
            at = f" (level {number(first.level, 3)})" if first.level is not None else ""
            fields.append(f"*p-value*\n{p_value(first.p_value)}{at}")
        if first.n_baseline or first.n_canary:  # (a hard guard reads Prometheus, not samples)
            fields.append(f"*Samples*\nbaseline {first.n_baseline}, canary {first.n_canary}")
        blocks.append(section(f"*Failing check:* {first.sentence}", fields))
        blocks += _check_lines([c for c in failing[1:]])
    if verdict is not None:
        blocks += _check_lines([c for c in verdict.checks if c.name in ("evidence", "runs")])
    if audit is not None:
        blocks.append(_audit_line(audit))
    return Message(text, _limit(blocks), chart)


def audit_message(result: AuditResult, chart: bytes | None = None) -> Message:
    """The audit's Slack report: its verdict and reasons, then each pair of versions' numbers and
    anomaly samples (a range of several pairs: a pair's after the other's, each named)."""
    text = f"Shadow audit {result.model or ''}: {result.verdict.upper()}"
    blocks = [
        header(text),
        section(f"{ICONS.get(result.verdict, '')} {result.start} to {result.end}: " + "; ".join(result.reasons)),
    ]
    parts = result.by_versions or [result]
    for part in parts:
        named = f" ({part.pair_name}: {part.verdict.upper()})" if result.by_versions else ""
        blocks += _audit_numbers(part, named, samples=max(2, 10 // len(parts)))
    return Message(text, _limit(blocks), chart)


def _audit_numbers(result: AuditResult, named: str, samples: int) -> list[dict[str, Any]]:
    """The numbers and the first ``samples`` anomaly samples of one pair of versions' audit,
    ``named`` after their titles."""
    blocks = []
    if result.agreement is not None and result.agreement_ci is not None:
        lo, hi = result.agreement_ci
        cfg = result.config
        at = cfg.min_agreement
        blocks.append(
            section(
                f"Numbers{named}",
                [
                    f"*Records*\n{result.rows}",
                    f"*Top-1 agreement* (minimum {limit_percent(at)}%)\n{percent_beside(result.agreement, at)}% "
                    f"({percent_beside(lo, at)}-{percent_beside(hi, at)}%)",
                    "*KL of means*\n" + ("n/a" if result.kl_of_means is None else f"{result.kl_of_means:.5f}"),
                    f"*Shadow errors* (limit {limit_percent(cfg.max_shadow_error_rate)}%)\n"
                    f"{percent_beside(result.shadow_error_rate, cfg.max_shadow_error_rate, 3)}%",
                    f"*Anomalies* (limit {limit_percent(cfg.max_anomaly_rate)}%)\n"
                    f"{percent_beside(result.anomaly_rate or 0, cfg.max_anomaly_rate)}%",
                ],
            )
        )
    if result.anomalies is not None and len(result.anomalies):
        rows = [
            f"`{short_digest(r.image_sha256, 12)}` primary {r.primary_top1} / shadow {r.shadow_top1}, "
            + (
                f"confidence {r.shadow_confidence:.2f}, divergence {r.divergence:.2f}"
                if math.isfinite(r.shadow_confidence)
                else OUTPUT_DIFFERS
                if getattr(r, "reason", None) == OUTPUT_DIFFERS
                else "no finite output (NaN or Inf)"  # (no confidence, no divergence)
            )
            for r in result.anomalies.head(samples).itertuples()
        ]
        blocks.append(section(f"*Anomaly samples*{named} (image sha256)\n" + "\n".join(rows)))
    return blocks


MAX_CHART_ROWS = 20_000  # requests per arm a chart's latency histogram draws (a uniform sample of them)


def latency_accuracy_chart(samples: Any, title: str, max_rows: int = MAX_CHART_ROWS) -> bytes:
    """PNG, titled ``title`` (in its ``Title`` metadata too): baseline vs canary latency
    distributions, of a uniform sample of ``max_rows`` requests per arm at most (its p99 and
    count of all of them), and accuracy with 95% intervals (of all of them). Drawn on a figure
    of its own (no pyplot state: another thread may draw one too)."""
    import io

    from matplotlib.figure import Figure

    from vision_rollout.audit import wilson

    fig = Figure(figsize=(10, 3.8))
    ax1, ax2 = fig.subplots(1, 2)
    colours = {"baseline": "#4477aa", "canary": "#ee6677"}
    rng = np.random.default_rng(0)
    for arm, colour in colours.items():
        lat = samples[samples["arm"] == arm]["latency_ms"].dropna().to_numpy(dtype=float)
        if len(lat):
            label = f"{arm} (p99 {np.quantile(lat, 0.99):.1f} ms, n={len(lat):,}"
            if len(lat) > max_rows:
                label += f", {max_rows:,} drawn"
                lat = rng.choice(lat, max_rows, replace=False)
            bins = np.logspace(np.log10(max(lat.min(), 1e-3)), np.log10(lat.max() * 1.01), 40)
            ax1.hist(lat, bins=bins, alpha=0.55, color=colour, label=label + ")")
    ax1.set_xscale("log")
    ax1.set_xlabel("latency (ms)")
    ax1.set_ylabel("requests")
    ax1.legend(fontsize=8)
    if "correct" in samples.columns:
        for i, (arm, colour) in enumerate(colours.items()):
            c = samples[samples["arm"] == arm]["correct"].dropna()
            if len(c):
                lo, hi = wilson(int(c.sum()), len(c), 0.95)
                # (an arm right, or wrong, every time: a bound rounds a hair inside 1 or 0, a negative error)
                below, above = max(c.mean() - lo, 0.0), max(hi - c.mean(), 0.0)
                ax2.errorbar([i], [c.mean()], yerr=[[below], [above]], fmt="o", color=colour, capsize=6)
        ax2.set_xticks([0, 1], list(colours))
        ax2.set_xlim(-0.5, 1.5)
        ax2.set_ylabel("top-1 accuracy (95% interval)")
    else:
        ax2.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Title": title})
    return buf.getvalue()


CHART_BUDGET_S = 30.0  # a final report's chart is drawn within this, or the report goes without it
CHART_READ_S = 20.0  # its read of the stage's records begins no listing nor file after this


def report_chart(
    spec: RolloutSpec,
    verdicts: Sequence[dict[str, Any] | None],
    prediction_log: str,
    validation: Path,
    budget_s: float = CHART_BUDGET_S,
    decided: bool = False,
) -> tuple[bytes | None, str | None]:
    """The chart of a run's final report: the evidence of the stage that decided (``engine.
    deciding_look``: the first not a pass, else the last judged), the samples its deciding look judged read again from the prediction log
    (``engine.judged_samples``: latencies and correctness per arm, nothing else), drawn within
    ``budget_s`` (in a thread of its own: a stalled store or a drawing that hangs is left
    behind). And why there is none, in one line, where it could not be drawn (the report is sent
    without it; the stage that decided having no look judged, saying so: never an earlier stage's
    evidence); (None, None) where no stage was judged: no evidence to chart, unless the report
    names the stage that decided (``decided``: ``engine.deciding_look``)."""
    import threading

    from vision_rollout.engine import judged_samples

    found, why = _deciding(spec, verdicts, decided)
    if found is None:
        return None, why
    window, until, verdict = found
    look = f"look {verdict.get('look')} of {verdict.get('looks')}"
    source = "live A/B arms" if window.latency_from == "live" else "validation replay"
    title = (
        f"{spec.model} v{spec.candidate_version} vs v{spec.baseline_version}: {window.weight}% stage, {look}, {source}"
    )
    done: dict[str, Any] = {}

    def draw() -> None:
        try:
            deadline = time.monotonic() + min(CHART_READ_S, budget_s * 2 / 3)
            samples = judged_samples(spec, prediction_log, validation, window, until, deadline)
            if samples.empty:  # (the log pruned since, or another log than the one judged)
                raise FileNotFoundError(f"no record of them in the prediction log {prediction_log}")
            done["chart"] = latency_accuracy_chart(samples, title)
        except Exception as exc:
            done["error"] = exc

    worker = threading.Thread(target=draw, name="report-chart", daemon=True)
    worker.start()
    worker.join(budget_s)
    stage = f"the {window.weight}% stage's samples"
    if "chart" in done:
        return done["chart"], None
    if "error" not in done:
        return None, f"{stage} were not read and drawn within {budget_s:g} s"
    what = "could not be read" if isinstance(done["error"], OSError) else "could not be drawn"
    return None, f"{stage} {what}: {_failure(done['error'])[:300]}"


def _deciding(
    spec: RolloutSpec, verdicts: Sequence[dict[str, Any] | None], decided: bool = False
) -> tuple[tuple[StageWindow, float, Mapping[str, Any]] | None, str | None]:
    """The look of the stage that decided of ``verdicts`` (``engine.deciding_look``, ``decided``
    as there), or why there is none to chart, in one line; (None, None) where no stage was judged."""
    from vision_rollout.engine import NoLookJudged, deciding_look

    try:
        return deciding_look(spec, verdicts, decided), None
    except NoLookJudged as exc:
        return None, str(exc)
    except Exception as exc:  # (a verdict of another shape: the report goes, saying so)
        return None, f"its stages' verdicts do not say which samples were judged ({_failure(exc)})"


def undrawn(
    message: Message, spec: RolloutSpec, verdicts: Sequence[dict[str, Any] | None], why: str | None = None
) -> Message:
    """``message``, a final report that goes at once (while the stable version may not be back,
    or ``why``), its chart not drawn: saying so where ``charted`` would chart a stage (or say why
    not, the same line); as it was where no stage was judged: nothing to chart."""
    found, none = _deciding(spec, verdicts)
    if found is None and none is None:
        return message
    why = why or f"not drawn while version {spec.baseline_version} may not be back: this report goes at once"
    return without_chart(message, none or why)


def charted(
    message: Message,
    spec: RolloutSpec,
    verdicts: Sequence[dict[str, Any] | None],
    prediction_log: str,
    validation: Path,
    decided: bool = False,
    budget_s: float = CHART_BUDGET_S,
) -> Message:
    """``message``, a run's final report, with the chart of the stage that decided of ``verdicts``
    (``report_chart``, within its budgets: ``budget_s``), or a line saying why there is none (``without_chart``:
    the chart's code raising too, its thread not started, say: the report goes all the same);
    as it was where no stage was judged, unless it names the stage that decided (``decided``: a
    rollback's report, whose first stage has no verdict: a line saying so, as a later one's)."""
    try:
        chart, why = report_chart(spec, verdicts, prediction_log, validation, budget_s=budget_s, decided=decided)
    except Exception as exc:
        log.exception("the report's chart could not be drawn; the report is sent without it")
        chart, why = None, f"it could not be drawn: {_failure(exc)[:300]}"
    return without_chart(message, why) if why else replace(message, chart=chart)


def without_chart(message: Message, why: str) -> Message:
    """``message``, a final report whose chart could not be drawn (``report_chart``'s ``why``),
    saying so in one line under its headline."""
    blocks = list(message.blocks)
    first = next((i + 1 for i, b in enumerate(blocks) if b["type"] == "section"), len(blocks))
    line = context(f"{ICONS['info']} *No chart:* {one_line(why)}; the report is sent without it.")
    return replace(message, blocks=_limit([*blocks[:first], line, *blocks[first:]]), chart=None)


def with_besides(message: Message, besides: Sequence[str]) -> Message:
    """``message``, a run's final report, with what its promotion or rollback left undone once
    the traffic moved (``besides``: a floor released whose PodDisruptionBudget was not updated,
    with what to set it to), one line each under its headline; as it is where there is nothing."""
    if not besides:
        return message
    blocks = list(message.blocks)
    first = next((i + 1 for i, b in enumerate(blocks) if b["type"] == "section"), len(blocks))
    lines = [context(f"{ICONS['warning']} *Besides:* {one_line(note)}") for note in besides]
    return replace(message, blocks=_limit([*blocks[:first], *lines, *blocks[first:]]))


def _retry_rate_limited(client: Any) -> None:
    """Give a WebClient (its default handlers retry a refused connection only) a handler for
    Slack's 429: a rate-limited report went to the outbox and failed the run."""
    from slack_sdk.http_retry.builtin_handlers import RateLimitErrorRetryHandler

    class BoundedRateLimitRetry(RateLimitErrorRetryHandler):
        deadline: float | None = None  # (``_within``'s: no wait past it)

        def _can_retry(self, *, state: Any, request: Any, response: Any = None, error: Any = None) -> bool:
            if response is None or response.status_code != 429:
                return False
            after = next((v[0] for k, v in response.headers.items() if k.lower() == "retry-after"), "1")
            if not after.isdigit() or int(after) > MAX_RETRY_AFTER_S:
                return False
            return self.deadline is None or time.monotonic() + int(after) + MIN_CALL_S < self.deadline

    if not any(isinstance(h, RateLimitErrorRetryHandler) for h in client.retry_handlers):
        client.retry_handlers.append(BoundedRateLimitRetry(max_retry_count=RATE_LIMIT_RETRIES))


def _failure(exc: BaseException) -> str:
    """Why Slack did not take a report, in one line of 500 characters at most (slack-sdk's
    errors quote the answer: an error page of many lines). http.client's refusal of a header
    quotes the header: the token."""
    if isinstance(exc, ValueError) and "header" in str(exc).lower():
        return "the Slack client refused to send the token, which holds a line break or another control character"
    return one_line(f"{type(exc).__name__}: {exc}")[:500]


REFUSED = "refused"  # the outbox's folder of the reports Slack refused for good (``refusal``)
# chat.postMessage's errors (Slack's method reference) that sending the same report again cannot
# cure: its channel (mistyped, archived, the bot not in it, posting restricted) or its content.
# A token Slack refuses (invalid_auth, token_revoked, missing_scope, ...) is no fault of the report:
# it keeps it waiting, each round failing loudly until the connection is fixed; so do an outage,
# a rate limit, a timeout.
PERMANENT_ERRORS = frozenset(
    {
        "channel_not_found",
        "is_archived",
        "not_in_channel",
        "restricted_action",
        "restricted_action_read_only_channel",
        "restricted_action_thread_only_channel",
        "restricted_action_non_threadable_channel",
        "team_access_not_granted",
        "messages_tab_disabled",
        "ekm_access_denied",
        "msg_too_long",
        "msg_blocks_too_long",
        "no_text",
        "invalid_blocks",
        "invalid_blocks_format",
        "too_many_attachments",
        "attachment_payload_limit_exceeded",
        "invalid_arguments",
        "invalid_metadata_format",
        "invalid_metadata_schema",
        "metadata_too_large",
    }
)


# chat.postMessage's errors of a post's metadata (``report_metadata``): the report is posted without it.
METADATA_ERRORS = frozenset(
    {"invalid_metadata_format", "invalid_metadata_schema", "metadata_too_large", "metadata_must_be_sent_from_app"}
)


def _error_code(exc: BaseException) -> str | None:
    """Slack's error code where it answered a call with one, else None."""
    from slack_sdk.errors import SlackApiError

    if not isinstance(exc, SlackApiError) or not hasattr(exc.response, "get"):
        return None
    return str(exc.response.get("error") or "").split(":", 1)[0].strip()


def refusal(exc: BaseException) -> str | None:
    """Slack's error code where it refused a post for good (``PERMANENT_ERRORS``), else None."""
    code = _error_code(exc)
    return code if code in PERMANENT_ERRORS else None


# Slack's own failures it answers with HTTP 200 and ok:false (its methods' common errors): a later
# try may succeed; after the first two "it's possible some aspect of the operation succeeded".
MAYBE_DONE_ERRORS = frozenset({"internal_error", "fatal_error"})
TRANSIENT_ERRORS = MAYBE_DONE_ERRORS | {"service_unavailable", "ratelimited", "request_timeout"}


def temporary(exc: BaseException) -> bool:
    """Whether a later try may succeed where this Slack call failed: the network (a refused or
    dropped connection, a timeout, an upload URL's 5xx), or Slack answering 5xx or 429, or one of
    its own transient errors (``TRANSIENT_ERRORS``)."""
    from slack_sdk.errors import SlackApiError

    if isinstance(exc, SlackApiError):
        status = getattr(exc.response, "status_code", 0) or 0
        return status >= 500 or status == 429 or _error_code(exc) in TRANSIENT_ERRORS
    return isinstance(exc, (OSError, http.client.HTTPException))


def unsure(exc: BaseException) -> bool:
    """Whether Slack may have taken a post that failed so: its answer lost (cut off, a timeout, a
    dropped connection, a gateway's 5xx), Slack's ``MAYBE_DONE_ERRORS``; not where Slack answered itself (its error, a 429), nor
    where nothing reached it (a connection refused, a name not resolved, a header the client
    refused)."""
    from slack_sdk.errors import SlackApiError

    if isinstance(exc, SlackApiError):
        return (getattr(exc.response, "status_code", 0) or 0) >= 500 or _error_code(exc) in MAYBE_DONE_ERRORS
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, (ConnectionRefusedError, socket.gaierror)):
        return False
    return isinstance(exc, (OSError, http.client.HTTPException))


class UnreadableAnswer(http.client.HTTPException):
    """An answer to a Slack call that is not Slack's (JSON that is no object, a post's ``ok``
    without its channel and ts: a base URL that is not Slack's, a proxy): what became of the
    call is unknown (``unsure``)."""


def _slack_call(method: Callable[..., Any], **kwargs: Any) -> Any:
    """``method`` (a WebClient's) called; an answer slack-sdk cannot read as an object (its
    AttributeError) is ``UnreadableAnswer``."""
    try:
        return method(**kwargs)
    except AttributeError as exc:
        name = getattr(method, "__name__", "a call").replace("_", ".", 1)
        raise UnreadableAnswer(f"{name}: not a Slack answer: its JSON is not an object ({exc})") from exc


def _slack_failures() -> tuple[type[BaseException], ...]:
    """What a Slack call raises when Slack did not take it: slack-sdk's errors; an answer cut
    off mid-way, a status line that is not HTTP's (http.client's own); a base URL urllib cannot
    use, a header it refuses (ValueError)."""
    from slack_sdk.errors import SlackClientError

    return (SlackClientError, OSError, http.client.HTTPException, ValueError)


class SlackNotifier:
    """Posts through slack-sdk with a bot token; without one, writes to an outbox folder."""

    def __init__(
        self,
        channel: str,
        token: str | None = None,
        base_url: str | None = None,
        outbox: Folder | None = None,
        client: Any = None,
        unusable: str | None = None,
    ):
        """``client``: a ready slack_sdk WebClient, e.g. the Slack provider's ``SlackHook().client``.
        ``unusable``: why Slack is configured but cannot be used (a connection the provider
        refuses): each report goes to the outbox with it, as when Slack refuses one."""
        if token is None and outbox is None and client is None:
            raise ValueError("SlackNotifier needs a token, a client or an outbox folder")
        self.channel = channel
        self.outbox = outbox
        self.client = client
        self.unusable = unusable
        if token and client is None:
            from slack_sdk import WebClient

            self.client = WebClient(token=token, base_url=base_url or WebClient.BASE_URL)
        if self.client is not None:
            _retry_rate_limited(self.client)

    def send(self, message: Message, report_id: str | None = None) -> dict[str, Any]:
        """Post the message (its chart in the thread), with metadata naming it (``report_id``, by
        default a new outbox name: the name it has in the outbox where Slack does not take it),
        by which a later round finds it in the channel's history (``find_post``). When Slack
        fails (an outage, a refused token) and an outbox is set, the message lands there with the
        error (``slack_error`` in the answer), logged, and (``maybe_posted``) when the post was
        tried where Slack may have taken it (``unsure``): a report is never lost, and the caller
        decides what an undelivered one means (the rollout's teardown fails the run, its
        decision kept). Where the outbox fails too, ``NotKept`` (an OSError naming Slack's error, or
        that there is no token, and the outbox's), nothing posted; but for a post
        Slack may have taken, ``maybe_posted`` without ``outbox`` (``_kept_unsure``): never
        posted again in its place. A chart whose upload waits goes to the outbox with the post's mark; where
        the outbox fails then (``PostedNotKept``, logged), the post is the answer all the same,
        its ``chart_error`` saying so: never posted again."""
        message = replace(message, blocks=_limit(message.blocks))
        stem = report_id or _new_stem()
        if self.client is None:
            if self.unusable and self.outbox is not None:
                kept = self._kept(message, stem, self.unusable)
                log.warning("Slack cannot be used (%s); the report is in the outbox", self.unusable)
                return {**kept, "slack_error": self.unusable}
            assert self.outbox is not None  # (a notifier without a client has an outbox)
            try:
                return self._to_outbox(message, stem)
            except OSError as exc:
                raise NotKept(UNPOSTED, self.outbox, exc) from exc
        tried = time.time()
        try:
            posted = self._post(message, stem)
        except _slack_failures() as exc:
            if self.outbox is None:
                raise
            error = _failure(exc)
            if refusal(exc):
                kept = self._kept(message, stem, error, refused=True)
                log.warning(
                    "Slack refused the report for good (%s); it is set aside in the outbox's %s/", error, REFUSED
                )
                return {**kept, "slack_error": error, "refused": True}
            if unsure(exc):
                return self._kept_unsure(message, stem, error, tried)
            kept = self._kept(message, stem, error)
            log.warning("Slack did not take the report (%s); it is in the outbox", error)
            return {**kept, "slack_error": error}
        result: dict[str, Any] = {"channel": posted["channel"], "ts": posted["ts"]}
        result.update(self.upload_chart(result, message))
        if result.pop("chart_waits", False) and self.outbox is not None:  # (for a later round, into its thread)
            error = f"its chart was not uploaded: {result['chart_error']}"
            try:
                result.update(self._to_outbox(message, stem, error=error, posted=result))
            except OSError as exc:  # (Slack has the post: the answer; what was written of it, pruned)
                log.warning("%s; its chart does not wait there", PostedNotKept(stem, result, exc))
                result["chart_error"] += f"; it cannot wait in the outbox: {one_line(str(exc))[:300]}"
            else:
                log.warning("the report's chart waits in the outbox")
        return result

    def _kept(self, message: Message, stem: str, error: str, refused: bool = False) -> dict[str, Any]:
        """A report Slack surely did not take (``error``: why; ``refused``: for good) into the
        outbox (``_to_outbox``); where the outbox fails (a full disk), ``NotKept``: both errors."""
        assert self.outbox is not None
        try:
            return self._to_outbox(message, stem, error=error, refused=refused)
        except OSError as exc:
            raise NotKept(error, self.outbox / REFUSED if refused else self.outbox, exc) from exc

    def _kept_unsure(self, message: Message, stem: str, error: str, tried: float) -> dict[str, Any]:
        """A report a post of which, tried at ``tried``, Slack may have taken (``error``: why
        that is not known), into the outbox noting it (``maybe_posted``: a later round looks for
        that post first), logged; where the outbox fails (a full disk), never posted again in
        its place: the answer says it may be in the channel, kept nowhere (``maybe_posted``,
        no ``outbox``), with both errors."""
        try:
            kept = self._to_outbox(message, stem, error=error, maybe_posted=tried)
        except OSError as exc:
            error = f"{error}; it cannot be kept in the outbox to be looked for again: {one_line(str(exc))[:300]}"
            log.warning("Slack may have taken the report, look for it in %s (%s)", one_line(self.channel), error)
            return {"channel": self.channel, "maybe_posted": True, "slack_error": error}
        log.warning("Slack may have taken the report (%s); it is in the outbox, to be looked for first", error)
        return {**kept, "slack_error": error}

    def _post(self, message: Message, stem: str) -> Any:
        """chat.postMessage of ``message`` with its metadata; where Slack refuses the metadata (a
        token that is no app's, a limit: ``METADATA_ERRORS``), posted again without it, logged: a
        later round cannot find that post in the history, the report is not lost for it."""
        post = {"channel": self.channel, "text": mrkdwn(message.text), "blocks": message.blocks}
        if message.thread_ts:
            post["thread_ts"] = message.thread_ts
        try:
            return _posted_answer(_slack_call(self.client.chat_postMessage, **post, metadata=report_metadata(stem)))
        except _slack_failures() as exc:
            code = _error_code(exc)
            if code not in METADATA_ERRORS:
                raise
            log.warning("Slack refused report %s's metadata (%s): it is posted without its metadata", stem, code)
        return _posted_answer(_slack_call(self.client.chat_postMessage, **post))

    def upload_chart(self, posted: dict[str, Any], message: Message) -> dict[str, Any]:
        """The message's chart into the thread of its post (``posted``: its channel and ts):
        ``chart`` True, or why not (``chart_error``: the report is posted, its chart is not;
        ``chart_waits`` where a later try may succeed, ``temporary``)."""
        if not message.chart:
            return {}
        try:
            _slack_call(
                self.client.files_upload_v2,
                channel=posted["channel"],
                thread_ts=posted["ts"],
                content=message.chart,
                filename=CHART_FILE,
                title=chart_title(message),
            )
        except _slack_failures() as exc:
            log.warning("the report's chart was not uploaded: %s", _failure(exc))
            return {"chart_error": _failure(exc), **({"chart_waits": True} if temporary(exc) else {})}
        return {"chart": True}

    def _to_outbox(
        self,
        message: Message,
        stem: str,
        error: str | None = None,
        refused: bool = False,
        posted: dict[str, Any] | None = None,
        maybe_posted: float | None = None,
    ) -> dict[str, Any]:
        """``message`` into the outbox as ``<stem>.json`` (``refused``: its ``refused/``);
        ``posted`` (the post's channel and ts: only its chart waits), its ``.posted`` mark written
        first, as a sender's; ``maybe_posted``: when a post Slack may have taken was tried."""
        assert self.outbox is not None
        folder = self.outbox / REFUSED if refused else self.outbox
        record: dict[str, Any] = {"channel": self.channel, "text": message.text, "blocks": message.blocks}
        if message.thread_ts:
            record["thread_ts"] = message.thread_ts
        if error is not None:
            record["slack_error"] = error
        if maybe_posted is not None:
            record["maybe_posted"] = maybe_posted
        if posted is not None:
            folder.write(stem + POSTED, json.dumps({"channel": posted["channel"], "ts": posted["ts"]}).encode())
        if message.chart:
            folder.write(f"{stem}.png", message.chart)
            record["chart"] = f"{stem}.png"
        data = json.dumps(record, indent=2).encode()
        try:
            return {"outbox": folder.write(f"{stem}.json", data)}
        except OSError as exc:  # (renamed into place, its folder's fsync failing, say: kept all the same)
            try:
                there = _read_if_there(folder, f"{stem}.json", len(data) + 1) == data
            except OSError:
                there = False
            if not there:
                raise
            log.warning("the report is in the outbox, %s, though writing it failed: %s", folder, _failure(exc))
            return {"outbox": str(folder / f"{stem}.json")}


CHART_FILE = "rollout.png"  # a report's chart's file name in Slack


def chart_title(message: Message) -> str:
    """The title of ``message``'s chart in Slack: by it and ``CHART_FILE`` ``find_chart`` knows it."""
    return message.text[:100]


def _posted_answer(answer: Any) -> Any:
    """chat.postMessage's answer, where it names the post's channel and ts; else
    ``UnreadableAnswer``."""
    if not (isinstance(answer.get("channel"), str) and isinstance(answer.get("ts"), str)):
        raise UnreadableAnswer("chat.postMessage: not a Slack answer: an ok without the post's channel and ts")
    return answer


def _new_stem() -> str:
    """A new report's outbox name (without ``.json``), sorting in the order made: its time to the
    nanosecond, and 24 random bits."""
    now = time.time_ns()  # one reading: seconds and nanoseconds of the same instant sort in order
    return f"{time.strftime('%Y%m%dT%H%M%S', time.localtime(now // 10**9))}-{now % 10**9:09d}-{uuid.uuid4().hex[:6]}"


# Every report is posted with metadata naming it (its outbox name), so that a sender unsure
# whether an earlier post of it landed looks for it in the channel's history (``find_post``):
# Slack's chat.postMessage has no idempotency key. The history is read from the newest back to
# the earlier try (on Slack's clock, by its answers' ``Date``; less ``CLOCK_SKEW_S``: the senders'
# clocks apart), ``LOOKUP_PAGES`` pages of ``LOOKUP_PAGE`` messages and ``LOOKUP_S`` seconds at most.
REPORT_EVENT = "rollout_report_posted"
LOOKUP_PAGES = 5
LOOKUP_PAGE = 200
LOOKUP_S = 30.0
LOOKUP_WAIT_S = 150  # and this long waiting out Slack's rate limit (a minute a call, for some apps)
CLOCK_SKEW_S = 300
_CHANNEL_ID = re.compile(r"[CGD][A-Z0-9]+")  # (a channel's name is lower case)
TS = re.compile(r"\d{1,12}\.\d{1,9}")  # a post's ts, as Slack answers it (a thread's, in a report file)


def report_metadata(report_id: str) -> dict[str, Any]:
    """chat.postMessage's ``metadata`` of the report ``report_id``."""
    return {"event_type": REPORT_EVENT, "event_payload": {"report_id": report_id}}


class LookupFailed(Exception):
    """Slack could not be asked for a report's earlier post for a while (an outage, a timeout, a
    429): posting it would fail likewise, or post it twice."""


class BudgetSpent(LookupFailed):
    """A round's budget ran out before its Slack calls were done: what they were for waits."""


UNPOSTED = "there is no Slack token"  # why a report without a Slack client was not posted


class NotKept(OSError):
    """A report Slack did not take (``error``: what it said, or why it was not reached) that the
    outbox failed to keep (``where``: a full disk, an I/O error: ``failed``, whose ``errno`` it
    has): posted nowhere, kept nowhere."""

    def __init__(self, error: str, where: Folder, failed: OSError) -> None:
        super().__init__(
            f"the report is lost: Slack did not take it ({error}), and it could not be kept in the outbox "
            f"({where}): {one_line(str(failed))[:300]}"
        )
        self.errno = failed.errno
        self.made = (error, where, failed)

    def __reduce__(self) -> tuple[Any, ...]:  # (pickled, copied: made again as it was made)
        return type(self), self.made


class PostedNotKept(OSError):
    """The outbox failed (a full disk, an I/O error) once Slack took a report, or its post was
    found: ``post``, its channel and ts (``posted_before``: an earlier one's). What the sender
    left (its claim, where the mark is not written) has a later round look for that post first."""

    def __init__(self, name: str, post: dict[str, Any], error: OSError) -> None:
        super().__init__(
            f"Slack took report {name} ({post.get('channel')} {post.get('ts')}), "
            f"but the outbox failed after: {one_line(str(error))[:300]}"
        )
        self.post = post
        self.made = (name, post, error)

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), self.made


MIN_CALL_S = 1.0  # a Slack call within a budget is not begun with less time left
REPORT_MIN_S = 10.0  # a round does not begin a report with less of its budget left (nor a quarter of it)


@contextlib.contextmanager
def _within(client: Any, deadline: float | None, calls: int = 1) -> Iterator[None]:
    """``client``'s calls meanwhile (``calls`` of them, one after another) end by ``deadline``
    (a ``time.monotonic()``; None: no bound): each one's timeout the client's, or its share of
    the time left where that is less, and the client's own waits for a 429's Retry-After
    (``_retry_rate_limited``) ending before it. BudgetSpent, nothing called, with less than
    ``MIN_CALL_S`` left."""
    if deadline is None:
        yield
        return
    left = deadline - time.monotonic()
    if left < MIN_CALL_S:
        raise BudgetSpent("the round's budget ran out before Slack was asked: it waits for the next round")
    timeout = getattr(client, "timeout", None)
    handlers = [h for h in getattr(client, "retry_handlers", None) or [] if hasattr(h, "deadline")]
    if isinstance(timeout, (int, float)):
        client.timeout = max(MIN_CALL_S, min(timeout, left / calls))
    for h in handlers:
        h.deadline = deadline
    try:
        yield
    finally:
        if isinstance(timeout, (int, float)):
            client.timeout = timeout
        for h in handlers:
            h.deadline = None


def find_post(
    client: Any,
    channel: str,
    report_id: str,
    since: float,
    channels: dict[str, str] | None = None,
    deadline: float | None = None,
    thread_ts: str | None = None,
) -> dict[str, Any] | None:
    """The post of the report ``report_id`` in ``channel`` (a name or an ID) since ``since`` (unix
    seconds on this machine's clock, a sender's clock ``CLOCK_SKEW_S`` off it at most: the history
    is read from the newest back to then on Slack's clock), found by its metadata in the channel's
    history (``conversations.history``; a report posted as a reply, ``thread_ts`` its thread's
    post, in that thread's ``conversations.replies``, ``LOOKUP_PAGES`` pages at most: Slack lists
    no reply in the history; a
    channel's name resolved by ``conversations.list``, ``channels``: those known, name to ID):
    its channel ID and ts. None where none was found, or where Slack refused the look-up (a scope
    the token lacks: ``channels:history``, ``groups:history``, ``channels:read``, ``groups:read``;
    the bot not in the channel), logged: the report is then posted as before, perhaps twice.
    LookupFailed where Slack did not answer for a while, or (BudgetSpent) where the look-up could
    not end by ``deadline`` (a ``time.monotonic()``: its caller's budget; its waits and calls end
    by then): the report then waits, never posted twice for it."""
    known = channels if channels is not None else {}
    limited = _RateLimited(LOOKUP_WAIT_S, deadline)
    reading_until = time.monotonic() + LOOKUP_S
    try:
        cid = (
            channel
            if _CHANNEL_ID.fullmatch(channel)
            else known.get(channel) or _channel_id(client, channel, reading_until, limited)
        )
        if cid is None:
            log.warning(
                "report %s may have been posted already, but channel %s was not found among the bot's "
                "(conversations.list): it is posted, perhaps a second time",
                report_id,
                one_line(channel)[:100],
            )
            return None
        known[channel] = cid
        cursor = None
        where = f"the thread {thread_ts} of {cid}" if thread_ts else f"{cid}'s history"
        for page_number in range(1, LOOKUP_PAGES + 1):
            # (a thread oldest first, read to its end; the history newest first)
            method, thread = (
                (client.conversations_replies, {"ts": thread_ts}) if thread_ts else (client.conversations_history, {})
            )
            page = limited(method, channel=cid, include_all_metadata=True, limit=LOOKUP_PAGE, cursor=cursor, **thread)
            back_to = since - _ahead_of_slack(page)  # (the try's time on Slack's clock)
            messages = page.get("messages") or []
            for m in messages:
                meta = m.get("metadata") if isinstance(m, dict) else None
                if not isinstance(meta, dict) or meta.get("event_type") != REPORT_EVENT:
                    continue
                payload = meta.get("event_payload")
                if isinstance(payload, dict) and payload.get("report_id") == report_id and isinstance(m.get("ts"), str):
                    log.info("report %s was posted already (%s, ts %s): not posted again", report_id, cid, m["ts"])
                    return {"channel": cid, "ts": m["ts"]}
            cursor = (page.get("response_metadata") or {}).get("next_cursor")
            if not page.get("has_more") or not cursor or (not thread_ts and _older_than(messages, back_to)):
                return None
            if time.monotonic() - limited.waited > reading_until or page_number == LOOKUP_PAGES:
                log.warning(
                    "report %s may have been posted already; not found in %d page(s) of %s since "
                    "then (more there): it is posted, perhaps a second time",
                    report_id,
                    page_number,
                    where,
                )
                return None
    except _slack_failures() as exc:
        if temporary(exc):
            log.warning("report %s may have been posted already; Slack did not answer the look-up: it waits", report_id)
            raise LookupFailed(_failure(exc)) from exc
        log.warning(
            "report %s may have been posted already, but Slack refused to show the channel's history (%s; "
            "the bot needs channels:history and groups:history, channels:read and groups:read for a channel "
            "named by name, and to be in the channel): it is posted, perhaps a second time",
            report_id,
            _failure(exc),
        )
    return None


def find_chart(client: Any, posted: dict[str, Any], title: str, deadline: float | None = None) -> bool:
    """Whether a report's chart is in the thread of its post (``posted``: its channel ID and ts)
    already: a reply there holding a file named ``CHART_FILE`` titled ``title`` (the chart's
    upload was carried out, its answer lost or its sender killed), read by
    ``conversations.replies``, ``LOOKUP_PAGES`` pages at most. False where it is not there, or
    where Slack refused the look-up (as ``find_post``'s: logged, the chart is uploaded, perhaps a
    second time); LookupFailed where Slack did not answer for a while, or (BudgetSpent) where the
    look-up could not end by ``deadline``, as ``find_post``'s."""
    limited = _RateLimited(LOOKUP_WAIT_S, deadline)
    cursor = None
    try:
        for _ in range(LOOKUP_PAGES):
            page = limited(
                client.conversations_replies,
                channel=posted["channel"],
                ts=posted["ts"],
                limit=LOOKUP_PAGE,
                cursor=cursor,
            )
            for m in page.get("messages") or []:
                files = m.get("files") if isinstance(m, dict) else None
                if any(
                    isinstance(f, dict) and f.get("name") == CHART_FILE and f.get("title") == title
                    for f in (files if isinstance(files, list) else [])
                ):
                    log.info("the chart of the report at %s is in its thread already: not uploaded again", posted["ts"])
                    return True
            cursor = (page.get("response_metadata") or {}).get("next_cursor")
            if not page.get("has_more") or not cursor:
                return False
    except _slack_failures() as exc:
        if temporary(exc):
            log.warning("a report's chart may be in its thread already; Slack did not answer the look-up: it waits")
            raise LookupFailed(_failure(exc)) from exc
        log.warning(
            "a report's chart may be in its thread already, but Slack refused to show the thread (%s; the bot "
            "needs channels:history and groups:history): it is uploaded, perhaps a second time",
            _failure(exc),
        )
        return False
    log.warning("a report's chart was not found in %d page(s) of its thread: it is uploaded", LOOKUP_PAGES)
    return False


def _ahead_of_slack(answer: Any) -> float:
    """How far this machine's clock is ahead of Slack's, by ``answer``'s ``Date`` (a second's
    resolution, well within ``CLOCK_SKEW_S``); 0 without one."""
    headers = getattr(answer, "headers", None) or {}
    date = next((v for k, v in headers.items() if str(k).lower() == "date"), None)
    date = date[0] if isinstance(date, list) and date else date
    try:
        return time.time() - email.utils.parsedate_to_datetime(str(date)).timestamp()
    except (TypeError, ValueError, IndexError):
        return 0.0


def _older_than(messages: list[Any], since: float) -> bool:
    """Whether a page of the history (newest first) reaches back before ``since``, less
    ``CLOCK_SKEW_S``: the pages after it hold older messages only."""
    for m in reversed(messages):
        with contextlib.suppress(TypeError, ValueError, AttributeError):
            return float(m.get("ts")) < since - CLOCK_SKEW_S
    return False


class _RateLimited:
    """A look-up's Slack calls, each answered 429 (a Retry-After longer than the client's own
    retries wait: ``conversations.history`` is one call a minute for a new non-Marketplace app)
    made again after its Retry-After, ``most_s`` seconds of such waits at most; the time so waited
    moves the look-up's own deadline on. Each call and wait ends by ``deadline`` (``_within``:
    its caller's budget), else BudgetSpent."""

    def __init__(self, most_s: float, deadline: float | None = None) -> None:
        self.most_s = most_s
        self.deadline = deadline
        self.waited = 0.0

    def __call__(self, method: Callable[..., Any], **kwargs: Any) -> Any:
        from slack_sdk.errors import SlackApiError

        while True:
            try:
                with _within(getattr(method, "__self__", None), self.deadline):
                    return _slack_call(method, **kwargs)
            except (OSError, http.client.HTTPException) as exc:  # (a timeout cut to the budget's end)
                if self.deadline is None or time.monotonic() + MIN_CALL_S < self.deadline:
                    raise
                raise BudgetSpent(f"{_failure(exc)}: the round's budget ran out: it waits for the next round") from exc
            except SlackApiError as exc:
                after = _retry_after(exc.response) if getattr(exc.response, "status_code", 0) == 429 else None
                if after is None or self.waited + after > self.most_s:
                    raise
                if self.deadline is not None and time.monotonic() + after + MIN_CALL_S > self.deadline:
                    raise BudgetSpent(
                        f"Slack rate-limited the look-up for {after} s, past the round's budget: it waits for the next round"
                    ) from exc
                log.info("Slack rate-limited the look-up (%s): it waits %d s, as Slack asks", method.__name__, after)
                time.sleep(after)
                self.waited += after


def _retry_after(response: Any) -> int | None:
    """A 429's Retry-After in seconds, None where it names none."""
    headers = getattr(response, "headers", None) or {}
    after = next((v for k, v in headers.items() if str(k).lower() == "retry-after"), None)
    after = after[0] if isinstance(after, list) and after else after
    return int(after) if isinstance(after, str) and after.strip().isdigit() else None


def _channel_id(client: Any, name: str, deadline: float, limited: _RateLimited) -> str | None:
    """The ID of the channel ``name`` (``#`` or not; in any case: Slack's names are lower case)
    among those ``conversations.list`` shows, ``LOOKUP_PAGES`` pages at most; None where it is not
    among them."""
    name = name.removeprefix("#").lower()
    cursor = None
    for _ in range(LOOKUP_PAGES):
        page = limited(
            client.conversations_list,
            types="public_channel,private_channel",
            exclude_archived=True,
            limit=LOOKUP_PAGE,
            cursor=cursor,
        )
        for c in page.get("channels") or []:
            if isinstance(c, dict) and str(c.get("name")).lower() == name and isinstance(c.get("id"), str):
                return str(c["id"])
        cursor = (page.get("response_metadata") or {}).get("next_cursor")
        if not cursor or time.monotonic() - limited.waited > deadline:
            break
    return None


# A sender's claim on a waiting report (``send_waiting``): ``<stem>.claim-<ns>-<id>``. One older
# than this belongs to a sender that died (one report's post, its retries and its chart take a
# few minutes at most), and no longer holds the report; one whose sender had a budget holds it
# until that budget's end and ``CLAIM_MARGIN_S`` more at most, the time it holds (``_until``).
CLAIM_S = 900
MAX_CLAIM_BYTES = 256  # a claim holds its ``until``: a few bytes
# A claim this close to lapsing posts nothing more: the post's own time, and the workers' clocks
# apart (a claim is judged on another's clock: NTP keeps them within it, README). Not find_post's
# CLOCK_SKEW_S: a margin that wide holds a killed try's report past its retry's and the teardown's 120 s.
CLAIM_MARGIN_S = 60
POSTED = ".posted"  # ``<stem>.posted``: Slack took the report (``send_waiting``)
_CLAIM = re.compile(r"\.claim-(\d{1,20})-[0-9a-f]{1,32}$")
ANOTHER_SENDER = "another sender"  # (in a round's skip of a report another sender has, or sent)
_held: set[str] = set()  # (the claims this process's rounds hold now)


# What tells this machine, and this boot of it, from another (``_process``): two hosts, or
# containers on them, may share a host name and a pid namespace's inode number.
MACHINE_FILES = ("/etc/machine-id", "/proc/sys/kernel/random/boot_id")


def _process() -> str:
    """This process in a task's claims (``send_report``'s), 16 hex: its machine (its host name,
    pid namespace: the processes it sees, machine ID and boot ID, ``MACHINE_FILES``, those it has),
    then its pid."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    ids = []
    for file in MACHINE_FILES:
        try:
            ids.append(read_regular(Path(file), 64).strip())
        except OSError:  # (not there, or not a file: this machine's others tell it)
            ids.append(b"")
    machine = hashlib.sha256(b"\0".join([socket.gethostname().encode(), str(namespace).encode(), *ids]))
    return f"{machine.hexdigest()[:8]}{os.getpid():08x}"


def _dead_try(claim: str, sender: str) -> bool:
    """Whether ``claim`` is a dead try's of the task ``sender`` (its claims name the task, then
    the process, ``_process``): made on this machine by a process that is gone, or by this one
    and held by none of its rounds (one stopped mid-way). Any other claim, another machine's, or
    a process's still running (a try Airflow lost track of and retried meanwhile), lapses by its
    time alone (``_until``)."""
    made = claim.rsplit("-", 1)[-1]
    if made[:-16] != sender or made[-16:-8] != _process()[:8]:
        return False
    pid = int(made[-8:], 16)
    if pid == os.getpid():
        return claim not in _held
    try:
        os.kill(pid, 0)  # (no signal: whether it is there)
    except ProcessLookupError:
        return True
    except OSError:  # (there, another user's)
        return False
    return False


def _held_until(outbox: Folder, claim: str, now: float, sender: str | None) -> float | None:
    """Until when ``claim`` (``<stem>.claim-<ns>-<id>``) holds its report in ``outbox``, seen at
    ``now`` (``_until``); None where it lapsed, or is a dead try of the task ``sender``
    (``_dead_try``; None: not judged so), or is no claim."""
    m = _CLAIM.search(claim)
    if m is None:
        return None
    until = _until(outbox, claim, int(m.group(1)) / 1e9)
    return until if now < until and not (sender is not None and _dead_try(claim, sender)) else None


def _sender(stem: str) -> str:
    """The task sending the report ``stem`` in its claims (``send_report``'s tries), 16 hex."""
    return hashlib.sha256(stem.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Waiting:
    """A report in the outbox: ``name`` (``<stem>.json``), its channel and fallback text, the
    error Slack gave when it was written (None: there was no token), its chart's file name;
    ``problem`` where the file cannot be read back as a report; ``refused``: why Slack refused it
    for good, where it is set aside (the outbox's ``refused/``: no round sends it)."""

    name: str
    channel: str = ""
    text: str = ""
    slack_error: str | None = None
    chart: str | None = None
    problem: str | None = None
    refused: str | None = None
    maybe_posted: float | None = None  # when a post of it was tried that Slack may have taken

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def _waiting(outbox: Folder, name: str) -> tuple[Waiting, Message | None]:
    """The report ``name`` of the outbox, and its message (None where it cannot be sent)."""
    stem = name.removesuffix(".json")
    try:
        record = json.loads(outbox.read_within(name, MAX_REPORT_BYTES))
        channel, text, blocks = record["channel"], record["text"], record["blocks"]
        if not (isinstance(channel, str) and channel and isinstance(text, str) and isinstance(blocks, list)):
            raise ValueError("not a report")
        problem = _blocks_problem(blocks)
        if problem:
            raise ValueError(problem)
    except FileNotFoundError:
        raise
    except (
        ValueError,
        KeyError,
        TypeError,
        TooLarge,
        NotAFile,
    ) as exc:  # (JSONDecodeError, UnicodeDecodeError are ValueErrors)
        return Waiting(name, problem=f"not a report: {type(exc).__name__}: {one_line(str(exc))[:400]}"), None
    chart = record.get("chart")
    chart = chart if chart == f"{stem}.png" else None  # (another report's file is never touched)
    error = record.get("slack_error")
    maybe = record.get("maybe_posted")
    maybe = float(maybe) if isinstance(maybe, (int, float)) and math.isfinite(maybe) else None
    found = Waiting(name, channel, text, one_line(str(error))[:500] if error else None, chart, maybe_posted=maybe)
    thread = record.get("thread_ts")
    return found, Message(text, blocks, thread_ts=thread if isinstance(thread, str) and TS.fullmatch(thread) else None)


def _blocks_problem(blocks: list[Any]) -> str | None:
    """Why a report file's blocks cannot be sent as a message's (more than Slack takes, not
    Block Kit's shape: edited by hand, another writer's), else None."""
    if len(blocks) > MAX_BLOCKS:
        return f"{len(blocks)} blocks: Slack takes at most {MAX_BLOCKS}"
    for i, b in enumerate(blocks):
        if not isinstance(b, dict) or not isinstance(b.get("type"), str):
            return f"block {i} is not a block"
        if not isinstance(b.get("fields", []), list) or not isinstance(b.get("elements", []), list):
            return f"block {i}'s fields or elements are not a list"
        if any(not isinstance(t, dict) or not isinstance(t.get("text", ""), str) for t in _text_objects(b)):
            return f"block {i} holds a text that is not a text object"
    return None


def waiting_reports(outbox: Folder) -> list[Waiting]:
    """The reports waiting in the outbox, oldest first, then those set aside in its ``refused/``
    (``refused``: Slack's reason), oldest first."""
    found = []
    for folder in (outbox, outbox / REFUSED):
        for name in folder.names():
            if name.endswith(".json"):
                try:
                    w = _waiting(folder, name)[0]
                except FileNotFoundError:  # (sent meanwhile)
                    continue
                found.append(w if folder is outbox else replace(w, refused=w.slack_error or "refused"))
    return found


def _move(source: Folder, target: Folder, name: str, chart: str | None, record: bytes) -> None:
    """The report ``name`` (``record``: its file's new content) and its chart moved from ``source``
    to ``target``: written there first, chart first, then removed here; a mover killed mid-way
    leaves a copy, never a loss."""
    if chart:
        with contextlib.suppress(FileNotFoundError):
            target.write(chart, source.read_within(chart, MAX_CHART_BYTES))
    target.write(name, record)
    source.delete(name)
    if chart:
        source.delete(chart)


def _back_to_outbox(refused: Folder, name: str, chart: str | None, mark: str, error: str) -> str | None:
    """A report of the outbox's ``refused/`` that Slack took, its chart waiting, moved back to
    the outbox with its ``.posted`` mark (written there first, as a sender's: a report there
    without it would be posted again) and ``error``. A move that fails before the report is in
    the outbox takes back what it wrote there, the mark and the chart's copy (or the OSError
    says it did not): the report stays in ``refused/`` with its own. Moved back, its chart's copy
    or its mark in ``refused/`` not removed (left to ``prune_outbox``): what that removal raised."""
    outbox = Folder(refused.uri, refused.parts[:-1])
    record = json.loads(refused.read_within(name, MAX_REPORT_BYTES))
    record["slack_error"] = error
    outbox.write(mark, refused.read_within(mark, MAX_MARK_BYTES))
    try:
        _move(refused, outbox, name, chart, json.dumps(record, indent=2).encode())
    except OSError as exc:
        if not outbox.exists(name):  # (not moved: its mark and chart in the outbox are strays)
            try:
                for file in (mark, chart) if chart else (mark,):
                    outbox.delete(file)
            except OSError as back:
                raise OSError(f"{exc}; its mark's copy in the outbox was not taken back: {back}") from exc
        elif not refused.exists(name):  # (moved: its chart's copy not removed, its mark not tried)
            return _left_in_refused("its chart's copy and its mark", exc)
        raise
    try:
        refused.delete(mark)
    except OSError as exc:
        return _left_in_refused("its mark", exc)
    return None


def _left_in_refused(what: str, exc: OSError) -> str:
    """A report moved back to the outbox whose ``what`` in ``refused/`` was not removed, in words."""
    return (
        f"moved back to the outbox; {what} in {REFUSED}/ not removed (a stray: pruned later, as a "
        f"report's leftovers are): {one_line(str(exc))[:300]}"
    )


def _note(outbox: Folder, name: str, **fields: Any) -> None:
    """The report ``name`` notes ``fields``: ``maybe_posted``, when a post of it was tried that
    Slack may have taken (``unsure``); ``slack_error``, why Slack did not take it. Written only
    over the report as it was read (``write_if``): one another sender removed meanwhile (posted)
    is not written back, one it changed is left as it is."""
    try:
        raw = outbox.read_within(name, MAX_REPORT_BYTES)
        record = json.loads(raw)
        record.update(fields)
        outbox.write_if(name, json.dumps(record, indent=2).encode(), raw)
    except (FileNotFoundError, WriteConflict) as exc:
        log.info("report %s was not noted: another sender removed or changed it (%s)", name, type(exc).__name__)


def _set_aside(outbox: Folder, name: str, chart: str | None, error: str, aside: bool = False) -> str | None:
    """A report Slack refused for good moved into the outbox's ``refused/`` with Slack's reason
    (``aside``: ``outbox`` is that folder, where it stays); one whose move failed waits in the outbox
    alone, the copy written there taken back (or the OSError says it is not). Set aside, its
    chart's copy in the outbox not removed (left to ``prune_outbox``): what that removal raised."""
    record = json.loads(outbox.read_within(name, MAX_REPORT_BYTES))
    record["slack_error"] = error
    if aside:
        outbox.write(name, json.dumps(record, indent=2).encode())
        return None
    refused = outbox / REFUSED
    try:
        _move(outbox, refused, name, chart, json.dumps(record, indent=2).encode())
    except OSError as exc:  # (still in the outbox: what was written there taken back, it waits here alone)
        if not outbox.exists(name):  # (moved: only its chart's copy was left in the outbox)
            what = "its chart's copy in the outbox was not removed" if chart else "its removal from the outbox failed"
            return f"{what}: {one_line(str(exc))[:300]}"
        try:
            for file in (name, chart) if chart else (name,):
                refused.delete(file)
        except OSError as back:
            raise OSError(f"{exc}; a copy is in {REFUSED}/ too, not taken back: {back}") from exc
        raise
    return None


def send_refused(
    outbox: Folder,
    client: Any,
    names: Sequence[str] | None = None,
    clock: Any = time.time,
    budget_s: float | None = None,
) -> list[dict[str, Any]]:
    """The reports set aside in the outbox's ``refused/`` (those named, else all) sent again where
    they lie (the channel fixed, the bot invited), as ``send_waiting`` sends the outbox's: each
    Slack took is removed; each it refuses for good again stays, with its new reason
    (``refused``); each it did not take for a while (an outage, a timeout, a rate limit) stays as
    it was, no round but this one sending it; one still in the outbox too (a move into ``refused/``
    half done) is skipped, left to the outbox's rounds. A name not set aside there: FileNotFoundError."""
    refused = outbox / REFUSED
    for name in names or []:
        if not name.endswith(".json") or re.search(r"[/\\\0]|^\.", name) or not refused.exists(name):
            raise FileNotFoundError(f"{name}: no report of that name is set aside in {refused}")
    return _send_round(refused, client, clock, budget_s, set(names) if names else None, aside=True)


def drop_report(outbox: Folder, name: str) -> str:
    """The report ``name`` (``<stem>.json``) removed for good from the outbox's ``refused/`` or,
    where it is not set aside, from the outbox, with its chart (and a ``.posted`` mark); where it
    was, ``refused/<name>`` or ``<name>``. A name that is not a report's: ValueError; none there:
    FileNotFoundError; one of them a folder: NotAFile (an OSError naming it), nothing removed."""
    if not name.endswith(".json") or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"{name!r}: not a report's name (<stem>.json, as outbox list shows it)")
    stem = name.removesuffix(".json")
    for folder, where in ((outbox / REFUSED, f"{REFUSED}/{name}"), (outbox, name)):
        if folder.exists(name):  # (one look: a listing of a crowded outbox may hold it not)
            files = (name, f"{stem}.png", stem + POSTED)
            folder.check_files(*files)  # (all looked at before any is removed)
            for file in files:
                folder.delete(file)
            return where
    raise FileNotFoundError(f"{name}: no such report in {outbox}")


def send_waiting(
    outbox: Folder, client: Any, clock: Any = time.time, budget_s: float | None = None
) -> list[dict[str, Any]]:
    """Send each report waiting in the outbox through ``client`` (a slack_sdk WebClient), as
    ``SlackNotifier.send`` sends a new one, oldest first; each that Slack took is removed (its
    chart with it), each it did not stays, as it was. One line of result per report: ``sent``
    (with ``ts``), ``error`` (Slack's, or why the file is not a report), or ``skipped`` (another
    sender has it, or sent it meanwhile). ``budget_s``: no report is started once the round has
    taken this long (Slack unreachable: each report would wait out its own timeout), nor with
    less than a quarter of it (``REPORT_MIN_S`` at most) left, and no Slack call, timeout or wait
    for a 429 of the round's runs past it (``_within``): a look-up that cannot end within it
    leaves its report waiting (never posted twice for it), a chart's upload likewise; the rest
    wait for the next round.

    Two senders at once (two operators, a cron job) send no report twice: before sending one, a
    sender writes its claim beside it, then lists the folder, and sends only where its claim is
    the only live one and the report is still there; else it withdraws. Of two senders racing
    for a report, at most one sends it (the later claim sees the earlier), at worst neither
    (sent by the next run). A report is removed before its claim is, so a later sender never
    finds it unclaimed once sent. A claim older than ``CLAIM_S``, or past its own ``until`` (its
    sender's budget's end and ``CLAIM_MARGIN_S``: ``_until``), is a dead sender's and is
    ignored; a sender whose own claim came that close to lapsing (stalled), or was removed, or
    whose report is gone, withdraws right before posting. Once Slack took a report, its sender writes ``<stem>.posted`` (the post's channel
    and ts) before uploading the chart and removing the report: a sender killed there (a chart
    upload takes a while) leaves a report the next sender does not post again, it only uploads
    the chart into that thread, where it is not there already (``find_chart``: an upload Slack
    carried out, its answer lost). A sender killed between Slack's answer and that write leaves a
    claim that lapses: the next sender first looks for the report's post in the channel's
    history since that claim (``find_post``; the claim stays until the post found is marked), as for a report whose post's answer was lost
    (``maybe_posted``); only where Slack refuses that look-up is it posted a second time. None
    is lost."""
    return _send_round(outbox, client, clock, budget_s)


def _send_round(
    outbox: Folder,
    client: Any,
    clock: Any,
    budget_s: float | None,
    only: set[str] | None = None,
    aside: bool = False,
    sender: str | None = None,
    note_errors: bool = False,
) -> list[dict[str, Any]]:
    """``send_waiting``'s round in ``outbox`` (``only``: those reports; ``aside``: the outbox's
    ``refused/``, where a report refused again stays; ``sender``: this task's name in its
    claims, hex, with this process's (``_process``): a claim of the task's whose process is
    gone is an earlier try's, dead, as a lapsed one (``_dead_try``): ``send_report``;
    ``note_errors``: a report Slack did not take notes why, under its claim, as
    ``SlackNotifier.send`` keeps it: ``send_report``)."""
    results: list[dict[str, Any]] = []
    start = clock()
    deadline = None if budget_s is None else time.monotonic() + budget_s
    floor = min(REPORT_MIN_S, (budget_s or 0) / 4)  # (a report is not begun with less time left)
    _sweep_marks(outbox)
    channels: dict[str, str] = {}  # (the channels' IDs the round learnt, by name)
    names = outbox.names()
    for name in [n for n in names if n.endswith(".json") and (only is None or n in only)]:
        if deadline is not None and (clock() - start > budget_s or deadline - time.monotonic() < floor):
            break
        stem = name.removesuffix(".json")
        claim = f"{stem}.claim-{time.time_ns()}-{sender + _process() if sender else uuid.uuid4().hex[:12]}"
        until = None if deadline is None else time.time() + deadline - time.monotonic() + CLAIM_MARGIN_S
        try:
            outbox.write(claim, b"" if until is None else json.dumps({"until": until}).encode())
        except ValueError:  # (a name no folder takes, a backslash in it: not one this outbox wrote)
            results.append({"name": name, "error": "not a report: its name is not one a folder takes"})
            continue
        posting: list[bool] = []  # (true while a post of it Slack may have taken is not marked)
        posted: dict[str, Any] = {}  # (its post, once Slack took it or it was found)
        _held.add(claim)
        try:
            try:
                result = _send_claimed(
                    outbox, name, claim, client, clock(), channels, aside, deadline, posting, sender, posted
                )
                if note_errors and "error" in result and "channel" in result and not result.get("refused"):
                    _note(outbox, name, slack_error=one_line(result["error"])[:500])
                results.append(result)
            except BaseException:
                # (Stopped there, Ctrl-C, Airflow's SIGTERM, a store error: its claim stays, as a killed
                # sender's, so that once lapsed the next sender looks for that post before posting.)
                if not posting:
                    outbox.delete(claim)
                raise
            finally:
                _held.discard(claim)
            outbox.delete(claim)
        except OSError as exc:  # (once Slack took it: its post with the error, for ``send_report``)
            if not posted:
                raise
            raise PostedNotKept(name, posted, exc) from exc
    return results


def is_report_name(name: Any) -> bool:
    """Whether ``name`` is one ``report_name`` makes."""
    return isinstance(name, str) and _REPORT_NAME.fullmatch(name) is not None


_REPORT_NAME = re.compile(r"\d{8}T\d{6}-\d{9}-[0-9a-f]{6}")


def report_name() -> str:
    """A new report's outbox name (without ``.json``), for ``send_report``: its caller keeps it
    for the task's later tries."""
    return _new_stem()


def send_report(
    notifier: SlackNotifier,
    message: Message,
    stem: str,
    queued: float | None = None,
    budget_s: float | None = None,
) -> dict[str, Any]:
    """``message`` sent once by the tries of one task, as the outbox sends its reports: written to
    ``notifier``'s outbox first as ``<stem>.json`` (``report_name``: the same for every try), then sent by a round of it
    alone (its claim, the look-up of a post an earlier try may have made, its ``.posted`` mark, its
    chart looked for in the thread), within ``budget_s``; an earlier try's report still there is
    sent as it is, its claim taken for a dead sender's where its process is gone (``_dead_try``:
    on this machine; another's, or one still running, lapses by its time, ``_until``: once it
    lapsed, a try waiting for it takes the report over).
    ``queued``: when an earlier try wrote it (its caller keeps that, before writing it): one gone from the outbox since was sent (by that try
    or another round), found in the channel's history and not posted again; not found there (or
    dropped by hand), written and sent again. Without a Slack client (no token, a connection
    that cannot be used) it is written to the outbox, as ``SlackNotifier.send`` writes it.
    A report another sender's round took first (the shadow audit's, listing the outbox between
    its write and its claim) is waited for within ``budget_s`` (``SEND_BUDGET_S`` without one)
    and its post looked for once it left the outbox (``_sent_by_another``).
    The answer is ``SlackNotifier.send``'s: the post's channel and ts (``posted_before``: an
    earlier try's, or another sender's), or ``slack_error`` and ``outbox`` where the report waits
    there (``refused``: set aside in its ``refused/``; ``maybe_posted``: another sender has it,
    not done within the budget), or ``maybe_posted`` alone where another sender removed it from
    the outbox and its post was not found. Where the outbox fails once Slack took the report (its
    mark, its removal: ``PostedNotKept``), logged: the post is the answer, never lost."""
    outbox, client = notifier.outbox, notifier.client
    if outbox is None:
        raise ValueError("send_report needs an outbox")
    if client is None:
        return notifier.send(message, report_id=stem)
    name = f"{stem}.json"
    since = queued if queued is not None else time.time()  # (before it is written: any post of it is later)
    deadline = None if budget_s is None else time.monotonic() + budget_s
    if not outbox.exists(name) and queued is not None:  # (sent by an earlier try, or another round)
        try:
            found = find_post(client, notifier.channel, stem, queued, deadline=deadline, thread_ts=message.thread_ts)
        except LookupFailed as exc:  # (written again, to be looked for by a later round first)
            return notifier._kept_unsure(message, stem, f"an earlier try may have posted it: {exc}", queued)
        if found is not None:
            return {**found, "posted_before": True}
    if not outbox.exists(name):
        notifier._to_outbox(message, stem)
    sender = _sender(stem)  # (the tries' claims, with their process: 32 hex)
    while True:  # (again where the claim of another sender that held it lapsed meanwhile)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            results = _send_round(outbox, client, time.time, left, only={name}, sender=sender, note_errors=True)
        except PostedNotKept as exc:  # (Slack has it: the outbox's rounds tidy what is left, its post looked for)
            log.warning("%s; the outbox's next rounds tidy what is left of it, looking for its post first", exc)
            return exc.post
        if results:
            result = results[0]
        elif not outbox.exists(name):  # (not listed: another round sent it meanwhile)
            result = {"name": name, "skipped": f"sent meanwhile by {ANOTHER_SENDER}"}
        else:
            result = {"name": name, "error": f"not sent within its {budget_s:g} s"}
        if ANOTHER_SENDER not in result.get("skipped", ""):
            break
        until = result.get("held_until")  # (its post, once that round is done with it, or its claim lapsed)
        result = _sent_by_another(outbox, client, notifier.channel, name, since, deadline, message.thread_ts, until)
        if not result.get("lapsed"):
            break
    if result.get("sent"):
        return {k: v for k, v in result.items() if k not in ("name", "sent")}
    if result.get("maybe_posted") and "error" not in result:  # (gone from the outbox: no error to tell)
        return {"channel": notifier.channel, "maybe_posted": True}
    error = result.get("error") or result.get("skipped") or "not sent"
    where = outbox / REFUSED if result.get("refused") else outbox
    return {
        "outbox": str(where / name),
        "slack_error": error,
        **{k: True for k in ("refused", "maybe_posted") if result.get(k)},
    }


def _sent_by_another(
    outbox: Folder,
    client: Any,
    channel: str,
    name: str,
    since: float,
    deadline: float | None,
    thread_ts: str | None,
    until: float | None = None,
) -> dict[str, Any]:
    """``send_report``'s result for its report ``name`` that another sender's round has, or sent,
    since ``since``: once it left the outbox (waited for until ``deadline``, a ``time.monotonic()``,
    by default ``SEND_BUDGET_S`` from now, less the look-up's time), its post there (``find_post``),
    or as soon as that sender marked its post (``.posted``, before its chart's upload): ``sent``,
    ``posted_before``; ``lapsed`` alone where it is still there, unmarked, once that sender's claim
    lapsed (``until``, a ``time.time()``: ``_until``), for a round to take it over. Else what is
    known: still there, ``maybe_posted``, the error saying another sender has it; set aside in
    ``refused/``, ``refused``; gone, its post not found (a look-up Slack refused, a report dropped
    by hand), ``maybe_posted`` alone."""
    if deadline is None:
        from vision_rollout.settings import SEND_BUDGET_S

        deadline = time.monotonic() + SEND_BUDGET_S
    floor = min(REPORT_MIN_S, (deadline - time.monotonic()) / 4)  # (left for the look-up)
    stem = name.removesuffix(".json")

    def marked() -> dict[str, Any] | None:
        try:
            return _marked(outbox, stem)
        except (TooLarge, NotAFile):  # (not a mark a sender wrote)
            return None

    def held() -> bool:
        return until is None or time.time() < until

    while (found := marked()) is None and outbox.exists(name) and held() and deadline - time.monotonic() > floor:
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic() - floor)))
    if found is None and not held() and outbox.exists(name):
        return {"name": name, "lapsed": True}
    if found is None and outbox.exists(name):
        error = f"{ANOTHER_SENDER} is sending it: not known within the budget whether Slack took it"
        return {"name": name, "error": error, "maybe_posted": True}
    if found is None and (outbox / REFUSED).exists(name):
        return {"name": name, "error": f"{ANOTHER_SENDER} set it aside: Slack refused it for good", "refused": True}
    try:
        found = found or find_post(client, channel, stem, since, deadline=deadline, thread_ts=thread_ts)
    except LookupFailed:
        found = None
    if found is None:
        log.warning("report %s was sent by %s, its post not found: its ts is not known", stem, ANOTHER_SENDER)
        return {"name": name, "maybe_posted": True}
    return {"name": name, "sent": True, **found, "posted_before": True}


def report_left(outbox: Folder, stem: str) -> dict[str, Any] | None:
    """Where the report ``<stem>.json`` a sender wrote stands in ``outbox``, as ``send_report``
    answers it, for one whose sender's answer was lost (killed once it wrote it): its post
    (``channel``, ``ts``, ``posted_before``) where its ``.posted`` mark holds one (its chart
    waits, or its sender was killed once it removed the report, before the mark: read first);
    ``outbox`` and ``slack_error`` where it waits there (``refused``: set aside in its
    ``refused/``; ``maybe_posted``: a claim of a sender stopped mid-way is on it, or it notes a
    post Slack may have taken), the outbox's rounds sending it (a post of it Slack may have
    taken is looked for first); None where it is in neither (sent since, dropped by hand, or
    never written), or where another sender is sending it from the outbox now (a live claim,
    ``_live``: the shadow audit's round, a try on another worker), as for one sent since:
    ``send_report`` waits for that sender's post (``_sent_by_another``)."""
    name = f"{stem}.json"
    for folder in (outbox, outbox / REFUSED):
        if (posted := _marked(folder, stem)) is not None:
            return {**posted, "posted_before": True}
        try:
            found = _waiting(folder, name)[0]
        except FileNotFoundError:
            continue
        claims = folder.names(starting=f"{stem}.claim-") if folder is outbox else []
        if any(_held_until(folder, claim, time.time(), _sender(stem)) is not None for claim in claims):
            return None
        error = found.slack_error or found.problem or "its sender stopped before it marked it sent"
        maybe = bool(claims) or found.maybe_posted is not None  # (a sender stopped mid-way may have posted it)
        return {
            "outbox": str(folder / name),
            "slack_error": error,
            **({"refused": True} if folder is not outbox else {}),
            **({"maybe_posted": True} if maybe else {}),
        }
    return None


def in_outbox(outbox: Folder, stem: str) -> bool:
    """Whether the report ``<stem>.json``, a sender's claim on it or its ``.posted`` mark is in
    ``outbox`` (a sender stopped there may have posted it), or the listing is too long to tell."""
    names = outbox.names(starting=f"{stem}.")
    return not names.complete or any(n in (f"{stem}.json", stem + POSTED) or _CLAIM.search(n) for n in names)


def _sweep_marks(outbox: Folder) -> None:
    """The ``.posted`` marks whose report is gone (a sender killed after removing it, before its
    mark) removed, once older than ``CLAIM_S``: a mark is written before its report where the
    report's chart waits (``SlackNotifier._to_outbox``), and one swept in between left that
    report to be posted again; its writer writes the report within moments, or is dead."""
    changed = outbox.changed()
    if not changed.complete:  # (a mark's report may be one not listed: none swept)
        return

    def alone(name: str) -> bool:
        return name.endswith(POSTED) and name.removesuffix(POSTED) + ".json" not in changed

    outbox.remove_older(time.time() - CLAIM_S, alone, limit=len(changed), listed=changed)


def _send_claimed(
    outbox: Folder,
    name: str,
    claim: str,
    client: Any,
    now: float,
    channels: dict[str, str],
    aside: bool = False,
    deadline: float | None = None,
    posting: list[bool] | None = None,
    sender: str | None = None,
    posted: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report ``name`` sent under its sender's ``claim``, its Slack calls and look-ups ending
    by ``deadline`` (``_within``: the round's budget): one that cannot leaves it waiting.
    ``posting`` holds True from its post until its mark is written; ``posted`` the post once
    Slack took it, or it was found (``PostedNotKept``); a claim of ``sender``'s whose process is
    gone (``_dead_try``) is an earlier try's, dead: taken as lapsed."""
    posting = [] if posting is None else posting
    posted = {} if posted is None else posted
    stem = name.removesuffix(".json")
    names = outbox.names(starting=f"{stem}.")  # (its own files: its claims, ``<stem>.claim-...``)
    if not names.complete:  # (another sender's claim may be one not listed: not sent, never twice)
        return {"name": name, "skipped": f"{outbox} holds more files than a listing takes (MAX_LISTED): not sent"}
    if name not in names:
        return {"name": name, "skipped": f"sent meanwhile by {ANOTHER_SENDER}"}
    if aside and Folder(outbox.uri, outbox.parts[:-1]).exists(name):  # (a move into refused/ half done)
        return {"name": name, "skipped": "it waits in the outbox too: the outbox's rounds send it"}
    dead: dict[str, float] = {}  # (dead senders' claims, when made: each may have posted it)
    for other in names:
        m = _CLAIM.search(other)
        if other != claim and m and other[: m.start()] == stem:
            until = _held_until(outbox, other, now, sender)
            if until is not None:
                held = {"held_until": until} if sender is not None else {}  # (for ``send_report``'s wait)
                return {"name": name, "skipped": f"{ANOTHER_SENDER} is sending it", **held}
            dead[other] = int(m.group(1)) / 1e9
    try:
        found, message = _waiting(outbox, name)
    except FileNotFoundError:
        return {"name": name, "skipped": f"sent meanwhile by {ANOTHER_SENDER}"}
    if message is None:
        return {"name": name, "error": found.problem}
    mark = stem + POSTED
    try:
        chart = _read_if_there(outbox, found.chart, MAX_CHART_BYTES) if found.chart else None
        raw = _read_if_there(outbox, mark, MAX_MARK_BYTES)
    except (TooLarge, NotAFile) as exc:  # (this report's: the others are sent all the same)
        return {"name": name, "error": f"not a report: {one_line(str(exc))[:400]}"}
    sent = _posted(raw) if raw is not None else None
    notifier = SlackNotifier(found.channel, client=client)
    tries = [*dead.values(), *([found.maybe_posted] if found.maybe_posted is not None else [])]
    if sent is None and tries:  # (an earlier post of it may have landed: looked for first)
        try:
            sent = find_post(client, found.channel, stem, min(tries), channels, deadline, message.thread_ts)
        except LookupFailed as exc:  # (the dead senders' claims stay: the next round looks first)
            return {"name": name, "channel": found.channel, "error": str(exc)}
        if sent is not None:
            posted.update(sent, posted_before=True)
            outbox.write(mark, json.dumps(sent).encode())
            sent = dict(sent)
    for other in dead:  # (removed once their post is marked, or known not made: never looked for again)
        outbox.delete(other)
    if sent is None and not _holds(outbox, name, claim):
        return {"name": name, "skipped": f"{ANOTHER_SENDER} took it over: this one's claim lapsed before it posted"}
    if sent is None:  # (no mark, or not one: the report is sent, the mark written)
        posting.append(True)
        tried = time.time()
        try:
            with _within(client, deadline, calls=2):  # (a post refused for its metadata is made again)
                sent = notifier.send(message, report_id=stem)
        except BudgetSpent as exc:
            return {"name": name, "channel": found.channel, "error": str(exc)}
        except Exception as exc:  # (Slack's refusal, a network failure, blocks Slack does not take)
            if refusal(exc):  # (for good: set aside, so that no later round fails on it again)
                try:
                    left = _set_aside(outbox, name, found.chart, _failure(exc), aside)
                except OSError as failed:  # (a full disk, an I/O error: it waits, Slack's reason said)
                    why = f"{_failure(exc)}; not set aside in {REFUSED}/: {one_line(str(failed))[:300]}"
                    return {"name": name, "channel": found.channel, "error": why}
                why = f"{_failure(exc)}; set aside in {REFUSED}/, {left}" if left else _failure(exc)
                return {"name": name, "channel": found.channel, "error": why, "refused": True}
            if unsure(exc) and found.maybe_posted is None:  # (the next round looks for it first)
                _note(outbox, name, maybe_posted=tried)
            return {"name": name, "channel": found.channel, "error": _failure(exc)}
        channels[found.channel] = sent["channel"]
        posted.update(channel=sent["channel"], ts=sent["ts"])
        outbox.write(mark, json.dumps(sent).encode())
        posting.clear()
    else:
        sent["posted_before"] = True
        posted.update(sent)
    try:  # (marked before this round: a sender before it may have uploaded the chart)
        there = bool(chart) and raw is not None and find_chart(client, sent, chart_title(message), deadline)
        if not there:
            with _within(client, deadline, calls=3):  # (the upload URL, the upload, its completion)
                sent.update(notifier.upload_chart(sent, replace(message, chart=chart)))
        else:
            sent["chart"] = True
    except LookupFailed as exc:
        sent.update(chart_error=f"its chart's upload waits: {exc}", chart_waits=True)
    if sent.pop("chart_waits", False):  # (posted: the chart waits, with the mark, for a later round)
        if aside:  # (no longer refused: the outbox's rounds upload its chart)
            try:
                left = _back_to_outbox(
                    outbox, name, found.chart, mark, f"its chart was not uploaded: {sent['chart_error']}"
                )
                if left:  # (it waits in the outbox: only a stray is left in refused/)
                    log.warning("report %s, posted, its chart waiting: %s", name, left)
                    sent["chart_error"] = f"{sent['chart_error']}; {left}"
            except (OSError, ValueError) as exc:  # (a full disk, a folder it may not write: it stays, marked)
                try:  # (written to the outbox first, then removed from refused/: either, or both)
                    kept, back = outbox.exists(name), Folder(outbox.uri, outbox.parts[:-1]).exists(name)
                    where = (
                        f"it waits in the outbox and in {REFUSED}/, each with its mark"
                        if kept and back
                        else f"it waits in {REFUSED}/ with its mark"
                        if kept
                        else "it waits there"
                    )
                except OSError:
                    where = "where it waits is not known"
                why = f"not moved back to the outbox ({where}): {one_line(str(exc))[:300]}"
                log.warning("report %s, posted, its chart waiting: %s", name, why)
                sent["chart_error"] = f"{sent['chart_error']}; {why}"
        return {"name": name, "sent": True, **sent}
    if found.chart:
        outbox.delete(found.chart)
    outbox.delete(name)
    outbox.delete(mark)
    return {"name": name, "sent": True, **sent}


def _until(outbox: Folder, claim: str, made: float) -> float:
    """When ``claim``, made at ``made``, no longer holds its report (unix seconds, its sender's
    clock): ``CLAIM_S`` after it was made, or sooner where it holds its sender's ``until`` (its
    round's budget's end, ``CLAIM_MARGIN_S`` after: no Slack call of the round runs past it,
    ``_within``). A claim without one (a sender without a budget, or an earlier version's), or
    that cannot be read (gone meanwhile), holds for ``CLAIM_S``."""
    try:
        until = json.loads(outbox.read_within(claim, MAX_CLAIM_BYTES))["until"]
    except (OSError, ValueError, TypeError, KeyError):
        return made + CLAIM_S
    if not isinstance(until, (int, float)) or isinstance(until, bool) or not math.isfinite(until):
        return made + CLAIM_S
    return min(made + CLAIM_S, float(until))


def _read_if_there(folder: Folder, name: str, limit: int) -> bytes | None:
    """``name`` in ``folder``, ``limit`` bytes at most; None where it is not there."""
    try:
        return folder.read_within(name, limit)
    except FileNotFoundError:
        return None


def _holds(outbox: Folder, name: str, claim: str) -> bool:
    """Whether a sender's ``claim`` on the report ``name`` still holds it, right before it posts:
    younger than ``CLAIM_S`` (older, another sender takes it for a dead one's), still there (not
    removed by one that did), and the report still waiting. A sender stalled that long withdraws."""
    m = _CLAIM.search(claim)
    if m is None or time.time() - int(m.group(1)) / 1e9 >= CLAIM_S - CLAIM_MARGIN_S:
        return False
    return outbox.exists(claim) and outbox.exists(name)


LEFTOVER_AGE_S = 3600  # a report is written a moment after its chart: a chart alone this old has none


def prune_outbox(outbox: Folder, now: float, limit: int = 500, dry_run: bool = False) -> list[str]:
    """What senders and writers killed mid-way left in the outbox, an hour old, removed: the
    claims, ``.posted`` marks and charts of reports no longer there (a report is written a
    moment after its chart), and the temporary files of writes and guard files of locks
    (``.<name>.lock``: a note or a removal killed under its lock); never a report, nor what one
    still there has; likewise in its ``refused/`` (a chart whose report was dropped), named
    ``refused/<name>``. The oldest ``limit`` at most of each, their names (``dry_run``: those that
    would go, none removed)."""
    aside = outbox / REFUSED
    gone = _prune_leftovers(outbox, now, limit, dry_run)
    return gone + [f"{REFUSED}/{n}" for n in _prune_leftovers(aside, now, limit, dry_run)]


def _prune_leftovers(outbox: Folder, now: float, limit: int, dry_run: bool) -> list[str]:
    changed = outbox.changed()
    names = set(changed)

    def left(name: str) -> bool:
        claim = _CLAIM.search(name)
        if temporary_of(name) is not None:
            return True
        if guarded_by(name) is not None:  # (a killed note's or removal's lock: its file's guard file)
            return guarded_by(name) not in names
        if claim:
            stem = name[: claim.start()]
        elif name.endswith((POSTED, ".png")):
            stem = name.rsplit(".", 1)[0]
        else:
            return False
        return f"{stem}.json" not in names

    return outbox.remove_older(now - max(CLAIM_S, LEFTOVER_AGE_S), left, limit, dry_run, changed)


def _marked(folder: Folder, stem: str) -> dict[str, Any] | None:
    """The post the report ``stem``'s ``.posted`` mark in ``folder`` holds; None without one."""
    raw = _read_if_there(folder, stem + POSTED, MAX_MARK_BYTES)
    return _posted(raw) if raw is not None else None


def _posted(raw: bytes) -> dict[str, Any] | None:
    """A ``.posted`` mark's channel and ts, or None where it is not one."""
    try:
        mark = json.loads(raw)
        if isinstance(mark.get("channel"), str) and isinstance(mark.get("ts"), str):
            return {"channel": mark["channel"], "ts": mark["ts"]}
    except (ValueError, AttributeError):
        pass
    return None
