"""Shadow audit over a real prediction log: agreement, divergence, anomalies, report files."""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Callable
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import binom

from model_server import predictionlog
from tests.support import DataReads, SlowStore, shadow_log
from vision_rollout.audit import (
    CHART,
    CLOCK_SKEW_S,
    COPIES_ALPHA,
    COPIES_POLL_S,
    REPORT,
    AuditConfig,
    audit,
    audit_frame,
    await_copies,
    closes,
    copies_pending,
    copies_short,
    copy_check,
    copy_due,
    kl,
    report_files,
    with_coverage,
    write_report,
)
from vision_rollout.folders import Folder

NOW = datetime.now(UTC)


def around_now() -> tuple[datetime, datetime]:
    """Five minutes either side of the time the log was written (now, not the module's import:
    in the whole suite a test runs many minutes after collection)."""
    now = datetime.now(UTC)
    return now - timedelta(minutes=5), now + timedelta(minutes=5)


def paired_log(tmp_path: Path, folder: str, answers: list[tuple[np.ndarray, np.ndarray]]) -> Path:
    """A prediction log in ``tmp_path / folder`` written by the real writer (a fixed key in
    ``tmp_path / "keys.json"``, one for the folder's logs): for each ``(primary, shadow)`` output
    of ``answers`` a request ``r<i>`` (image ``img-<i>``) of version 1's primary record and
    version 2's shadow record. The log's folder."""
    from model_server.masking import KeyRing, Masker
    from model_server.predictionlog import Inference, PredictionLog

    keys = tmp_path / "keys.json"
    if not keys.exists():
        keys.write_text(json.dumps({"default": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}))
    log = PredictionLog(tmp_path / folder, Masker(KeyRing(keys)), replica="pod")
    for i, (p, q) in enumerate(answers):
        image = np.array([f"img-{i}".encode()], dtype=object)
        for version, role, scores in (("1", "primary", p), ("2", "shadow", q)):
            log.append(
                Inference(
                    time.time(),
                    "digits",
                    version,
                    role,
                    "route",
                    f"r{i}",
                    "0" * 32,
                    "0" * 16,
                    1.0,
                    "ok",
                    scores,
                    image,
                    True,
                    {},
                )
            )
    log.flush()
    return tmp_path / folder


def test_kl_is_zero_for_equal_and_positive_otherwise():
    p = np.array([0.7, 0.2, 0.1])
    assert kl(p, p) == pytest.approx(0.0, abs=1e-9)
    assert kl(p, np.array([0.1, 0.2, 0.7])) > 0.5


def test_agreeing_shadow_passes_with_an_interval(tmp_path):
    log = shadow_log(tmp_path, 400, disagree=0.01)
    result = audit(log, *around_now(), "digits")
    assert result.verdict == "pass"
    assert result.rows == 400
    assert 0.97 < result.agreement <= 1.0
    lo, hi = result.agreement_ci
    assert lo < result.agreement < hi
    assert result.confusion.to_numpy().sum() == 400
    assert len(result.anomalies) == round(400 * (1 - result.agreement))  # every disagreement diverges


def test_disagreeing_and_unsure_shadow_fails_with_reasons_and_anomaly_hashes(tmp_path):
    log = shadow_log(tmp_path, 300, disagree=0.2, low_confidence=0.3, errors=2)
    result = audit(log, *around_now())
    assert result.verdict == "fail"
    assert any("agreement" in r and "shown below" in r for r in result.reasons)
    assert any("shadow error rate" in r for r in result.reasons)
    assert set(result.anomalies["reason"]) <= {
        "low confidence",
        "high divergence",
        "low confidence and high divergence",
    }
    assert result.anomalies["image_sha256"].str.len().eq(64).all()
    paths = write_report(report_files(result), Folder(str(tmp_path / "report")))
    text = Path(paths[REPORT]).read_text()
    assert "**FAIL**" in text
    assert "Top-1 agreement" in text
    assert pd.read_csv(paths["anomalies.csv"]).shape[0] == len(result.anomalies)
    with Image.open(paths[CHART]) as img:
        assert img.format == "PNG"
        assert img.size[0] > 600
    assert json.loads(Path(paths["summary.json"]).read_text())["verdict"] == "fail"
    assert list(paths)[-1] == REPORT  # written last: the rest is there once it is


@pytest.mark.parametrize("store", ["folder", "s3"])
def test_a_report_written_again_keeps_no_file_of_the_earlier_one(tmp_path, request, store):
    """An hour audited again (by hand, or caught up) wrote its new files beside the earlier
    run's: an anomalies.csv of another verdict stayed beside the new report, and the hour's
    audited mark said the new report was sent before it was."""
    from vision_rollout.audit import AUDITED

    folder = (Folder(request.getfixturevalue("s3").uri()) if store == "s3" else Folder(str(tmp_path / "run"))) / "h"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    failing = audit(shadow_log(tmp_path / "a", 300, disagree=0.2), *around_now())
    write_report(report_files(failing), folder)
    folder.write(AUDITED, b"{}")
    folder.write("notes.txt", b"kept")  # (not a report's file)
    assert {"anomalies.csv", AUDITED} <= set(folder.names())
    passing = audit(shadow_log(tmp_path / "b", 300, disagree=0.0), *around_now())
    assert passing.anomalies is None or passing.anomalies.empty
    files = report_files(passing)
    write_report(files, folder)
    assert set(folder.names()) == set(files) | {"notes.txt"}
    assert b"**PASS**" in folder.read(REPORT)


def test_an_empty_range_is_skipped_not_failed(tmp_path):
    result = audit(tmp_path / "nothing", NOW - timedelta(hours=2), NOW - timedelta(hours=1))
    assert result.verdict == "skip"
    assert "no shadow records" in result.reasons[0]
    paths = write_report(report_files(result), Folder(str(tmp_path / "report")))
    assert "SKIP" in Path(paths[REPORT]).read_text()
    assert CHART not in paths


def test_thresholds_are_configurable():
    df = pd.DataFrame(
        {
            "primary_version": ["1"] * 4,
            "shadow_version": ["2"] * 4,
            "shadow_error": [None] * 4,
            "primary_top1": [0, 0, 0, 0],
            "shadow_top1": [0, 0, 0, 1],
            "primary_probs": [np.eye(2)[0]] * 4,
            "shadow_probs": [np.eye(2)[0]] * 3 + [np.eye(2)[1]],
            "time": [NOW] * 4,
            "request_id": list("abcd"),
            "item": [0] * 4,
            "image_sha256": ["0" * 64] * 4,
        }
    )
    strict = audit_frame(df, AuditConfig(min_agreement=0.9, max_anomaly_rate=0.5))
    lenient = audit_frame(df, AuditConfig(min_agreement=0.1, max_anomaly_rate=0.5))
    impossible = audit_frame(df, AuditConfig(min_agreement=0.999, max_anomaly_rate=0.5))
    assert strict.verdict == "inconclusive"  # 3 of 4 agree: 90% is neither shown nor ruled out
    assert lenient.verdict == "pass"
    assert impossible.verdict == "fail"


def test_an_anomaly_rate_fails_only_once_shown_above_the_limit(tmp_path):
    """A few unsure answers among few records hold the verdict; the same share over many fails it."""
    window = (NOW - timedelta(hours=1), NOW + timedelta(hours=1))
    (tmp_path / "few").mkdir()
    (tmp_path / "many").mkdir()
    few = audit(shadow_log(tmp_path / "few", 30, 0.0, low_confidence=0.13, seed=3), *window)
    many = audit(shadow_log(tmp_path / "many", 600, 0.0, low_confidence=0.2, seed=3), *window)
    assert few.anomaly_rate > 0.10
    assert few.verdict == "inconclusive"
    assert "not yet shown over 30 records" in " ".join(few.reasons)
    assert many.anomaly_rate > 0.10
    assert many.verdict == "fail"
    assert any("anomalies (limit 10%)" in r and "not yet" not in r for r in many.reasons)


def test_the_audit_reports_what_did_not_pair(tmp_path):
    log = shadow_log(tmp_path, 100, disagree=0.0, dropped=3, orphans=2)
    result = audit(log, *around_now(), "digits")
    assert result.rows == 100  # dropped copies and orphan shadows are not audited pairs
    assert result.shadow_errors == 0  # a dropped copy is not a shadow error
    assert result.shadow_dropped == 3
    assert result.shadow_without_primary == 2
    assert result.primary_without_shadow == 3
    summary = result.to_dict()
    assert (summary["shadow_dropped"], summary["shadow_without_primary"]) == (3, 2)


def test_shadow_records_of_another_input_are_excluded_and_named_without_moving_the_verdict(tmp_path):
    """Anyone who reaches the data port can send a -shadow Host under a served request id: 40
    such records, disagreeing, before the real copies, neither move the agreement nor fail it."""
    (tmp_path / "clean").mkdir()
    (tmp_path / "forged").mkdir()
    clean = audit(shadow_log(tmp_path / "clean", 100, disagree=0.0), *around_now(), "digits")
    result = audit(shadow_log(tmp_path / "forged", 100, disagree=0.0, forged=40), *around_now(), "digits")
    assert (result.rows, result.agreement, result.verdict) == (clean.rows, clean.agreement, clean.verdict)
    assert result.agreement == 1.0
    assert result.input_mismatch == 40
    assert clean.input_mismatch == 0
    assert result.to_dict()["input_mismatch"] == 40
    assert "40 shadow records were not a mirror copy of their primary" in result.reasons[-1]
    assert not any("mirror copy" in r for r in clean.reasons)
    files = report_files(result)
    assert "not a mirror copy of their primary (another input, excluded): 40" in files[REPORT].decode()
    assert json.loads(files["summary.json"])["input_mismatch"] == 40


def test_copies_of_the_candidates_own_requests_are_no_comparison(tmp_path):
    """Istio mirrors every request of the weighted route, those it sends to the candidate too:
    such a pair agrees by construction and would lift an 87% agreement (and dilute the anomaly
    rate). They are left out and counted: the audit is the baseline-served requests' alone."""
    (tmp_path / "baseline").mkdir()
    (tmp_path / "istio").mkdir()
    kw = {"disagree": 0.13, "low_confidence": 0.1}
    clean = audit(shadow_log(tmp_path / "baseline", 200, **kw), *around_now(), "digits")
    result = audit(shadow_log(tmp_path / "istio", 200, **kw, self_mirrored=75), *around_now(), "digits")
    assert clean.agreement is not None
    assert clean.agreement < 0.9
    assert (result.rows, result.agreement, result.anomaly_rate, result.agreement_ci, result.verdict) == (
        clean.rows,
        clean.agreement,
        clean.anomaly_rate,
        clean.agreement_ci,
        clean.verdict,
    )
    assert result.versions == {"primary": ["1"], "shadow": ["2"]}
    assert (result.self_pairs, clean.self_pairs) == (75, 0)
    assert (result.primary_without_shadow, result.shadow_dropped) == (0, 0)
    assert result.reasons == clean.reasons  # expected under Istio: reported, not a warning
    files = report_files(result)
    assert "mirrored to the version that served them (no comparison, excluded): 75" in files[REPORT].decode()
    assert json.loads(files["summary.json"])["self_pairs"] == 75


def test_a_range_of_self_copies_only_says_so(tmp_path):
    result = audit(shadow_log(tmp_path, 0, disagree=0.0, self_mirrored=5), *around_now(), "digits")
    assert (result.verdict, result.rows, result.self_pairs) == ("skip", 0, 5)
    assert "5 shadow copies in this range were of requests their own version served" in result.reasons[-1]


def test_a_range_without_shadow_records_behind_a_mirror_warns_where_its_traffic_makes_that_unlikely():
    """A range without shadow records while a mirror was configured was a warning however little
    traffic it had: a model quiet at night warned every hour. It warns where its requests a
    mirror could have sampled make no copy at all unlikely at the share (``silence_unlikely``);
    an idle range, or one of a few requests none of which was likely sampled, stays a skip."""
    from vision_rollout.audit import AuditResult

    def empty(mirrorable: int) -> AuditResult:
        reasons = ["no shadow records in this range: nothing to audit"]
        return AuditResult("digits", "s", "e", "skip", reasons, primaries_mirrorable=mirrorable)

    assert with_coverage(empty(1000), None).verdict == "skip"  # no mirror: nothing was expected
    assert with_coverage(empty(0), 100.0).verdict == "skip"  # idle
    quiet = with_coverage(empty(20), 10.0)  # (none of 20 at 10%: p = 0.12)
    assert quiet.verdict == "skip"
    assert not any("copies are dropped" in r for r in quiet.reasons)
    for mirrorable, percent in ((200, 10.0), (10, 100.0)):
        warned = with_coverage(empty(mirrorable), percent)
        assert warned.verdict == "warning"
        assert f"a mirror of {percent:g}% was configured" in warned.reasons[0]


def test_coverage_counts_the_dropped_copies():
    from vision_rollout.audit import AuditResult, with_coverage

    result = with_coverage(AuditResult("digits", "s", "e", "pass", [], rows=90, shadow_dropped=10), 100.0)
    assert result.verdict == "pass"
    assert "coverage 90.0%: 90 shadow copies ran, 10 dropped" in result.reasons[-1]


def test_the_coverage_and_the_report_name_every_reason_a_copy_is_dropped(tmp_path):
    """The coverage said the copies were dropped for "no idle time or a full queue": a copy that
    waited past its age bound (too_old) or whose Istio stream ended first (given_up) read as one
    of those, and a reader could not tell why copies were missing."""
    from vision_rollout.audit import AuditResult, with_coverage

    result = with_coverage(AuditResult("digits", "s", "e", "pass", [], rows=90, shadow_dropped=10), 100.0)
    report = report_files(result)[REPORT].decode()
    for reason in ("queue_full", "no_idle_time", "too_old", "left_service", "shutting_down", "given_up"):
        assert reason in result.reasons[-1]
        assert reason in report.split("- Unpaired:")[1].splitlines()[0]
    assert "shadow_dropped_total" in result.reasons[-1]
    lonely = audit(shadow_log(tmp_path, 0, disagree=0.0, dropped=3), *around_now(), "digits")
    assert lonely.verdict == "inconclusive"
    assert "too_old" in lonely.reasons[0]
    assert "given_up" in lonely.reasons[0]


def test_a_shadow_answering_in_another_dtype_or_shape_disagrees_with_its_reason_in_the_report(tmp_path):
    """The log kept no output's dtype or shape: a candidate answering FP16 where the primary
    answered FP32 (its clients' parsing broken), or 12 classes where it had 10 (the vectors
    compared as whatever fitted, the top-k spread over the classes of the longer one), agreed
    and passed. Such pairs are disagreements and anomalies, no divergence is computed on them,
    and the reasons and report.md say how many and what each side answered."""
    half = audit(
        shadow_log(tmp_path, 400, disagree=0.0, shadow_output=lambda i, q: q.astype(np.float16)), *around_now()
    )
    assert (half.verdict, half.output_differs, half.agreement) == ("fail", 400, 0.0)
    assert any(
        "400 pairs' outputs differ in dtype or shape (primary FP32[10], shadow FP16[10]" in r for r in half.reasons
    )
    assert set(half.anomalies["reason"]) == {"output dtype or shape differs"}
    assert half.kl_of_means is None
    report = report_files(half)[REPORT].decode()
    assert "- Pairs whose outputs differ in dtype or shape (disagreements, no divergence): 400" in report
    assert "FP16\\[10\\]" in report  # (as report.md escapes the text the log holds)
    from vision_rollout.notify import audit_message

    slack = json.dumps(audit_message(half, None).blocks)
    assert "KL of means*\\nn/a" in slack
    assert "/ shadow 0, output dtype or shape differs" in slack or "output dtype or shape differs\\n" in slack

    (tmp_path / "wide").mkdir()
    wider = np.zeros((1, 2), np.float32)
    some = audit(
        shadow_log(
            tmp_path / "wide",
            400,
            disagree=0.0,
            shadow_output=lambda i, q: np.concatenate([q, wider], axis=1) if i < 60 else q,
        ),
        *around_now(),
    )
    assert (some.output_differs, some.agreement) == (60, 340 / 400)
    assert some.verdict == "fail"
    assert any("primary FP32[10], shadow FP32[12]" in r for r in some.reasons)
    assert some.kl_of_means == pytest.approx(0.0, abs=1e-6)  # (of the 340 whose outputs compare)
    assert some.divergence_quantiles["max"] == pytest.approx(0.0, abs=1e-6)
    assert some.confusion.to_numpy().sum() == 340
    assert (some.anomalies["reason"] == "output dtype or shape differs").sum() == 50  # (max_anomalies)


def test_a_shadow_as_unsure_as_its_primary_is_no_anomaly(tmp_path):
    """A shadow's answer below the confidence threshold was an anomaly whatever its primary
    answered: a candidate identical to the baseline, on inputs where both are unsure (a third
    of them at 0.55), had a third of its answers anomalies and failed (limit 10%). Low
    confidence is the shadow's anomaly where its primary was sure; a shadow unsure where its
    primary was sure still is one."""

    def written(folder: str, shadow_unsure_alone: bool) -> Path:
        answers = []
        for i in range(600):
            unsure = i % 3 == 0
            p = np.full((1, 10), (0.45 if unsure else 0.09) / 9, np.float32)
            p[0, i % 10] = 0.55 if unsure else 0.91
            q = p.copy()
            if shadow_unsure_alone:
                p = np.full((1, 10), 0.01, np.float32)
                p[0, i % 10] = 0.91
            answers.append((p, q))
        return paired_log(tmp_path, folder, answers)

    alike = audit(written("alike", False), *around_now(), "digits")
    assert (alike.verdict, alike.agreement, alike.anomaly_rate) == ("pass", 1.0, 0.0)
    unsure = audit(written("unsure", True), *around_now(), "digits")
    assert unsure.verdict == "fail"
    assert unsure.anomaly_rate == pytest.approx(200 / 600)


def test_nan_answers_neither_count_as_agreement_nor_turn_the_statistics_to_nan(tmp_path):
    """A client may send NaN in a binary FP32 tensor: both versions answer NaN. Such pairs were
    compared as if the NaN were class 0 (agreeing) and no anomaly: 2 of them turned an hour of
    463/500 agreement (interval 89.97-94.58%: inconclusive) into a pass, and one made the KL of
    means and every divergence quantile NaN (summary.json then held a bare NaN)."""
    start, end = around_now()
    (tmp_path / "honest").mkdir()
    (tmp_path / "nan").mkdir()
    honest = audit(shadow_log(tmp_path / "honest", 500, 0.0), start, end)
    log = shadow_log(tmp_path / "nan", 500, 0.0, not_finite=2)
    records = predictionlog_records(log, start, end)
    assert int(records["top1"].isna().sum()) == 4
    assert records["top1_prob"].isna().sum() == 4
    result = audit(log, start, end)
    assert result.rows == honest.rows == 500
    assert result.primary_not_finite == 2
    assert result.shadow_not_finite == 0
    assert result.agreement == honest.agreement
    assert result.verdict == honest.verdict
    assert result.kl_of_means == pytest.approx(honest.kl_of_means)
    assert all(np.isfinite(v) for v in result.divergence_quantiles.values())
    assert any("2 primary answers were no finite distribution" in r for r in result.reasons)
    files = report_files(result)
    json.loads(files["summary.json"], parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
    assert "no finite distribution (NaN or Inf; no comparison, excluded): 2" in files[REPORT].decode()


def test_two_nan_requests_no_longer_turn_an_inconclusive_hour_into_a_pass(tmp_path):
    """463 of 500 agreeing: the interval's lower end 89.97%, under the 90% minimum. Two NaN
    requests (agreeing as class 0) raised it to 90.01%: pass."""
    start, end = around_now()
    rng = np.random.default_rng(0)
    log = shadow_log(tmp_path, 500, 0.0, not_finite=2)
    records = predictionlog_records(log, start, end)
    pairs = predictionlog.shadow_pairs(records)
    assert len(pairs) == 500
    assert pairs.attrs["primary_not_finite"] == 2
    flip = rng.choice(500, 37, replace=False)  # 37 disagreements: 463 of 500 agree
    pairs.loc[flip, "shadow_top1"] = (pairs.loc[flip, "primary_top1"] + 1) % 10
    result = audit_frame(pairs, AuditConfig(min_agreement=0.90))
    assert result.agreement == pytest.approx(0.926)
    assert result.verdict == "inconclusive"


def test_a_candidate_answering_nan_alone_is_an_anomaly_not_an_agreement(tmp_path):
    """The candidate's NaN for an input the baseline answered (an overflow): it was compared as
    class 0 and no anomaly (confidence NaN < 0.65 is False); now no comparison and an anomaly."""
    start, end = around_now()
    result = audit(shadow_log(tmp_path, 300, 0.0, shadow_not_finite=100), start, end)
    assert result.rows == 400
    assert result.shadow_not_finite == 100
    assert result.primary_not_finite == 0
    assert result.agreement == 1.0  # of the 300 comparisons
    assert result.anomaly_rate == pytest.approx(0.25)
    assert result.verdict == "fail"
    assert (result.anomalies["reason"] == "no finite output").sum() == min(100, AuditConfig().max_anomalies)
    assert all(np.isfinite(v) for v in result.divergence_quantiles.values())
    assert any("100 shadow answers were no finite distribution" in r for r in result.reasons)


def predictionlog_records(log: Path, start: datetime, end: datetime) -> pd.DataFrame:
    columns = [*predictionlog.SHADOW_PAIR_COLUMNS, "top1_prob"]
    return predictionlog.read(log, start, end, columns=columns, roles=("primary", "shadow"))


def pairs(n: int, agree: int) -> pd.DataFrame:
    """``n`` shadow pairs, the first ``agree`` of them agreeing (sure answers, no errors)."""
    same, other = np.array([0.91, 0.09]), np.array([0.09, 0.91])
    return pd.DataFrame(
        {
            "primary_version": ["1"] * n,
            "shadow_version": ["2"] * n,
            "shadow_error": [None] * n,
            "primary_top1": [0] * n,
            "shadow_top1": [0] * agree + [1] * (n - agree),
            "primary_probs": [same] * n,
            "shadow_probs": [same] * agree + [other] * (n - agree),
            "time": [NOW] * n,
            "request_id": [f"r{i}" for i in range(n)],
            "item": [0] * n,
            "image_sha256": ["0" * 64] * n,
        }
    )


def test_numbers_beside_a_limit_are_never_rounded_onto_or_across_it():
    """An interval whose upper end was 89.9994% beside a 90% minimum read "interval
    87.29-90.00% is shown below 90%", and a 99.5% minimum read "100%"."""
    from vision_rollout.gates import percent_beside
    from vision_rollout.notify import audit_message

    config = AuditConfig(min_agreement=0.9, max_anomaly_rate=1.0)
    result = audit_frame(pairs(2091, 1855), config)  # Wilson 95% upper end 0.8999942
    assert result.verdict == "fail"
    assert result.reasons == ["top-1 agreement 88.71% (interval 87.29-89.999%) is shown below 90%"]
    report = report_files(result)[REPORT].decode()
    assert "Wilson interval 87.29% to 89.999%; minimum 90%" in report
    assert "90.00" not in report
    slack = json.dumps(audit_message(result).blocks)
    assert "88.71% (87.29-89.999%)" in slack
    assert "90.00" not in slack
    assert json.loads(report_files(result)["summary.json"])["config"]["min_agreement"] == 0.9

    unresolved = audit_frame(pairs(200, 200), AuditConfig(min_agreement=0.995, max_anomaly_rate=1.0))
    assert unresolved.reasons[0].endswith("is not yet shown above 99.5% (200 records)")
    assert percent_beside(0.0010004, 0.001, 3) == "0.10004"  # above a 0.1% limit, not "0.100"
    assert percent_beside(0.0504, 0.05, 1) == "5.04"  # above a 5% limit, not "5.0"
    assert percent_beside(0.05, 0.05, 1) == "5.0"
    assert percent_beside(0.123456, 0.9) == "12.35"


def test_a_request_id_cannot_shift_or_mark_up_the_reports_anomaly_table():
    """Request ids are the client's (printable ASCII): one with ``|`` split its row of report.md
    into other columns (the next cell showing "y" as the image hash), one with ``![a](url)`` or
    ``<img ...>`` rendered as an image fetched from anywhere."""
    from markdown_it import MarkdownIt

    df = pairs(20, 10)
    df.loc[15, "request_id"] = "x|y|z|<img src=x"
    df.loc[16, "request_id"] = "`|![a](http://e)"
    report = report_files(audit_frame(df))[REPORT].decode()
    html = MarkdownIt("gfm-like").render(report)
    assert re.findall(r"<img[^>]*>", html) == ['<img src="divergence.png" alt="divergence and confusion" />']
    assert "<a " not in html
    rows = [
        re.findall(r"<td>(.*?)</td>", row)
        for row in re.findall(r"<tr>(.*?)</tr>", html, re.S)
        if "high divergence" in row
    ]
    assert len(rows) == 10
    ids = {row[0]: row[1:] for row in rows}
    assert ids["<code>x|y|z|&lt;img src=x</code>"][:4] == ["0", "0" * 16, "0", "1"]
    assert ids["<code>`|![a](http://e)</code>"][:4] == ["0", "0" * 16, "0", "1"]


def test_anomalies_of_items_without_an_image_digest_are_reported(tmp_path):
    """A pair whose records have no image sha256 (no input was decoded, or it could not be
    hashed item by item) is kept, unchecked: its anomaly row cut the missing digest
    (``NaN[:16]``), a TypeError that left the hour with neither a report nor a Slack message."""
    from vision_rollout.notify import audit_message

    log = shadow_log(tmp_path, 40, disagree=0.5, hashed=False)
    result = audit(log, *around_now(), "digits")
    assert result.verdict == "fail"
    assert len(result.anomalies) > 0
    assert result.anomalies["image_sha256"].isna().all()
    report = report_files(result)[REPORT].decode()
    rows = [line for line in report.splitlines() if line.endswith("| high divergence |")]
    assert len(rows) == len(result.anomalies)
    assert all(row.split(" | ")[2] == "-" for row in rows)
    samples = next(b for b in audit_message(result).blocks if "Anomaly samples" in b["text"]["text"])
    assert "`-` primary" in samples["text"]["text"]


def test_a_request_id_is_never_a_formula_nor_a_line_break_in_the_anomalies_csv():
    """Request ids are the client's and reach anomalies.csv as they are (unless a detector masks
    them): one such as ``=HYPERLINK(...)`` was a live formula for whoever opened the CSV in a
    spreadsheet. (The server takes printable ASCII ids only; a control character, from a log
    some other writer wrote, is a space, so no cell ends its row.)"""
    import csv
    import io

    df = pairs(20, 10)
    hostile = ['=HYPERLINK("http://e","x")', "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(1)", "\t=1", "\r=1", " =1"]
    for i, rid in enumerate(hostile):
        df.loc[10 + i, "request_id"] = rid
    df.loc[17, "request_id"] = "plain-id"
    text = report_files(audit_frame(df))["anomalies.csv"].decode()
    assert "\r" not in text
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert len(rows) == 10
    assert {row["reason"] for row in rows} == {"high divergence"}
    ids = {row["request_id"] for row in rows}
    assert {'\'=HYPERLINK("http://e","x")', "'+1+cmd|' /C calc'!A0", "'-2+3", "'@SUM(1)", "' =1", "plain-id"} <= ids
    assert not [i for i in ids if i.lstrip()[:1] in ("=", "+", "-", "@")]


def test_a_version_is_never_a_formula_in_the_confusion_csv():
    """The versions lead each row of confusion.csv where a range holds several pairs; a log
    some other writer wrote can name one ``=HYPERLINK(...)``: anomalies.csv led it by ``'``,
    confusion.csv left it a live formula."""
    import csv

    from vision_rollout.audit import audit_by_versions

    df = pd.concat([pairs(20, 20), pairs(20, 20).assign(shadow_version='=HYPERLINK("http://e","x")')])
    confusion = report_files(audit_by_versions(df.reset_index(drop=True)))["confusion.csv"].decode()
    versions = [row["shadow_version"] for row in csv.DictReader(io.StringIO(confusion))]
    assert versions == ["2", '\'=HYPERLINK("http://e","x")']


@pytest.mark.parametrize("with_records", [True, False])
def test_files_it_could_not_read_keep_an_hour_from_passing_or_being_skipped(tmp_path, with_records):
    """A replica's file that cannot be read (truncated, or written with another schema) took its
    records out of the audit without a word: the rest passed, or an hour of such files alone was
    skipped as one without shadow records."""
    log = shadow_log(tmp_path, 400, disagree=0.01)
    [written] = log.rglob("part-*.parquet")
    data = written.read_bytes()
    other = written.with_name(written.name.replace("part-audit-test-", "part-replica-b-"))
    other.write_bytes(data[: len(data) // 2])
    if not with_records:
        written.unlink()
    result = audit(log, *around_now(), "digits")
    assert result.verdict == "inconclusive"
    assert result.skipped_files == 1
    assert result.reasons[0].startswith("1 prediction log files in this range could not be read")
    assert other.name in result.reasons[0]
    assert result.rows == (400 if with_records else 0)
    report = report_files(result)[REPORT].decode()
    assert "could not be read (their records not audited): 1" in report


@pytest.mark.parametrize("second", ["20991231T235959", "20261399T999999"])
def test_a_file_named_with_no_written_second_or_a_future_one_is_refused_not_obeyed(tmp_path, second):
    """A file's written second, by its name, decides whether its records are a range's (written by
    its close) or late, left out of its audit whenever it runs. A name with a second far in the
    future (no writer has written it yet) kept its records out of every audit, counted late, and
    one with no such second (a foreign file's ``-20261399T999999Z-``) had them audited as on
    time whenever they came: the name, anyone's to choose, decided. Such a file is refused (not
    read, named), as one that cannot be read: the hour does not pass on the others."""
    log = shadow_log(tmp_path, 400, disagree=0.01)
    [written] = log.rglob("part-*.parquet")
    named = re.sub(r"-\d{8}T\d{6}Z-", f"-{second}Z-", written.name)
    assert named != written.name
    written.rename(written.with_name(named))
    result = audit(log, *around_now(), "digits")
    assert (result.verdict, result.skipped_files, result.late_records) == ("inconclusive", 1, 0)
    assert result.reasons[0].startswith("1 prediction log files in this range could not be read")
    assert f"its name's written second {second}" in result.reasons[0]


def test_a_file_named_as_written_before_its_records_is_refused_and_counted_not_hidden(tmp_path):
    """A file's name whose written second lies before its records (before the hour its folder
    holds: no writer names a file before the records in it) was never listed by a read of a
    range starting over a minute after that second: its records left out of the audit without a
    word, the hour skipped as one without records. Such a file is refused, as a name ahead of
    its records is: named, its records of the range counted in the reason, the hour
    inconclusive."""
    import pyarrow.parquet as pq

    log = shadow_log(tmp_path, 400, disagree=0.01)
    [written] = log.rglob("part-*.parquet")
    records = pq.read_metadata(written).num_rows
    second = datetime.strptime(re.search(r"-(\d{8}T\d{6})Z-", written.name).group(1), "%Y%m%dT%H%M%S")
    named = re.sub(r"-\d{8}T\d{6}Z-", f"-{second - timedelta(hours=2):%Y%m%dT%H%M%S}Z-", written.name)
    written.rename(written.with_name(named))
    result = audit(log, *around_now(), "digits")
    assert (result.verdict, result.skipped_files, result.rows) == ("inconclusive", 1, 0), result.reasons
    assert result.reasons[0].startswith("1 prediction log files in this range could not be read")
    assert named in result.reasons[0]
    assert "lies before its records" in result.reasons[0]
    assert f"its {records} records of this range" in result.reasons[0]
    report = report_files(result)[REPORT].decode()
    assert "could not be read (their records not audited): 1" in report


def test_a_record_stamped_past_the_year_9999_in_a_named_file_is_dropped_not_the_audit(tmp_path):
    """The check of a file's written second against its newest record turned that record's time
    into a datetime before malformed rows were dropped: one row stamped 2**62 us (past the year
    9999) raised OverflowError out of ``read``, every audit of the hour with it. It is one bad
    row, dropped as before; the hour is judged on the others."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    log = shadow_log(tmp_path, 400, disagree=0.01)
    [written] = log.rglob("part-*.parquet")
    table = pq.read_table(written)
    times = table["time"].cast(pa.int64()).to_pylist()
    times[-1] = 2**62
    column = pa.array(times, pa.int64()).cast(table.schema.field("time").type)
    pq.write_table(table.set_column(table.schema.get_field_index("time"), "time", column), written)
    result = audit(log, *around_now(), "digits")
    assert (result.verdict, result.skipped_files) == ("pass", 0), result.reasons


def test_the_divergences_take_memory_by_the_chunk_not_by_the_hour(monkeypatch):
    """An hour of a thousand-class model's pairs was stacked whole and copied to float64 several
    times over (64,000 pairs of the real log: 3.8 GB at the peak): a large hour's audit ran out of
    memory on every try. Now a chunk of rows at a time, with the same numbers."""
    import tracemalloc

    from vision_rollout import audit as audit_module

    n, classes = 2000, 5000
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(classes, 0.01), n).astype(np.float32)
    q = np.roll(p, 1, axis=1)
    q[: n // 2] = p[: n // 2]
    df = pairs(n, n)
    df["primary_probs"], df["shadow_probs"] = list(p), list(q)
    monkeypatch.setattr(audit_module, "CHUNK_VALUES", 100_000)  # 20 rows a chunk
    tracemalloc.start()
    try:
        result = audit_frame(df, AuditConfig(max_anomaly_rate=1.0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * n * classes / 4  # a quarter of the pairs in float64 (it held several wholes)
    p64, q64 = p.astype(float), q.astype(float)
    assert np.allclose(result.divergences, kl(p64, q64))
    assert result.kl_of_means == pytest.approx(float(kl(p64.mean(axis=0), q64.mean(axis=0))))
    assert result.agreement == 1.0  # (the top-1 columns of pairs(): all agree)
    flagged = ((q64.max(axis=1) < 0.65) & (p64.max(axis=1) >= 0.65)) | (kl(p64, q64) > 0.18)
    assert result.anomaly_rate == pytest.approx(flagged.mean())


def test_an_hours_pairs_are_not_rebuilt_whole_from_their_top_k(monkeypatch, tmp_path):
    """A thousand-class model's log keeps each answer's top-k; pairing rebuilt every pair's two
    vectors whole (8 KB a pair: 8 GB for a million pairs an hour) before the audit read them by
    the chunk. The audit now rebuilds them a chunk at a time, with the same numbers."""
    import tracemalloc

    from model_server import predictionlog
    from model_server.predictionlog import SHADOW_PAIR_COLUMNS, read, shadow_pairs

    n, classes = 12_000, 1000
    log = shadow_log(tmp_path, n, disagree=0.1, low_confidence=0.2, classes=classes)
    audit(tmp_path / "nothing", *around_now())  # (what its first call imports is not its memory)
    monkeypatch.setattr(predictionlog, "PROBS_CHUNK_VALUES", 100_000)  # 100 pairs a chunk
    whole = 2 * 4 * n * classes  # a pair's two float32 vectors, every pair
    tracemalloc.start()
    try:
        result = audit(log, *around_now(), "digits")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < whole / 4, (peak, whole)  # (it held several wholes: 3.4 of them)
    records = read(log, *around_now(), "digits", columns=SHADOW_PAIR_COLUMNS)
    at_once = audit_frame(shadow_pairs(records), None, "digits")
    assert result.rows == at_once.rows == n
    assert np.allclose(result.divergences, at_once.divergences)
    assert result.kl_of_means == pytest.approx(at_once.kl_of_means)
    assert (result.agreement, result.anomaly_rate) == (at_once.agreement, at_once.anomaly_rate)
    assert result.anomaly_rate > 0.1


def test_a_thousand_class_confusion_is_summed_up_in_the_report_and_whole_in_its_csv():
    """A 1,000-class model's (resnet_bench's) confusion matrix went whole into report.md: a
    table of a million cells (7.9 MB for 20,000 pairs), and a tick label for every class on the
    chart. report.md now lists the most frequent disagreements; confusion.csv keeps the whole."""
    import io

    n, classes = 3000, 1000
    rng = np.random.default_rng(0)
    primary = rng.integers(classes, size=n)
    shadow = primary.copy()
    shadow[:300] = rng.integers(classes, size=300)
    shadow[300:340] = (primary[300:340] + 1) % classes  # the most frequent: 7 -> 8, 40 times
    primary[300:340], shadow[300:340] = 7, 8
    vectors = np.full((n, classes), 0.5 / classes, np.float32)
    df = pairs(n, n)
    df["primary_top1"], df["shadow_top1"] = primary, shadow
    df["primary_probs"], df["shadow_probs"] = list(vectors), list(vectors)
    result = audit_frame(df)
    files = report_files(result)
    report = files[REPORT].decode()
    assert len(report) < 20_000
    assert "## Confusion (rows" not in report
    lines = report.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("## Most frequent disagreements (20 of "))
    assert lines[at + 4] == "| 7 | 8 | 40 |"
    assert len(files["confusion.csv"].decode().splitlines()) == len(result.confusion) + 1
    assert int(result.confusion.to_numpy().sum()) == n
    Image.open(io.BytesIO(files[CHART])).verify()


def test_the_items_of_a_batch_request_are_one_unit_of_the_agreement():
    """Agreement's interval counted each item of a batch request as an independent pair: 93 of
    100 requests of 8 images agreeing (their items alike) read as 744 of 800 pairs, shown above
    the 90% minimum, and passed the candidate. The counts are divided by the requests' design
    effect now: 93 of 100 shows nothing yet; the same pairs one a request still pass."""
    batch = pairs(800, 744).assign(request_id=[f"r{i // 8}" for i in range(800)], item=[i % 8 for i in range(800)])
    result = audit_frame(batch, AuditConfig())
    assert result.verdict == "inconclusive", result.reasons
    assert result.agreement == pytest.approx(0.93)
    assert result.agreement_ci[0] < 0.9
    assert audit_frame(pairs(800, 744), AuditConfig()).verdict == "pass"


@pytest.mark.parametrize("later", [("1", "3"), ("2", "3")])
def test_each_pair_of_versions_in_a_range_is_audited_apart(tmp_path, later):
    """Two rollouts of one model in one hour (version 2 shadowed, then 3 after 2 was rolled back
    or promoted): their pairs made one agreement, one divergence and one verdict, 3's
    disagreement shared with 2's agreement (86.7%: inconclusive, 2 blamed with 3). Each pair of
    versions is audited apart now, with its own numbers, anomalies and verdict; the range's
    verdict is the worst of them."""
    from vision_rollout.notify import audit_message

    shadow_log(tmp_path, 400, disagree=0.0)
    shadow_log(tmp_path, 200, disagree=0.4, seed=1, versions=later)
    result = audit(tmp_path / "log", *around_now(), "digits")
    assert [(p.versions["primary"], p.versions["shadow"]) for p in result.by_versions] == [
        (["1"], ["2"]),
        ([later[0]], ["3"]),
    ]
    first, second = result.by_versions
    assert (first.rows, first.agreement, first.verdict) == (400, 1.0, "pass")
    assert (second.rows, second.verdict) == (200, "fail")
    assert second.agreement < 0.7
    assert first.anomalies.empty
    assert set(second.anomalies["shadow_version"]) == {"3"}
    assert (result.verdict, result.rows, result.agreement) == ("fail", 600, None)
    assert result.reasons[0].startswith("primary 1, shadow 2: PASS: top-1 agreement 100")
    assert result.reasons[1].startswith(f"primary {later[0]}, shadow 3: FAIL: top-1 agreement")
    summary = result.to_dict()
    assert [p["verdict"] for p in summary["by_versions"]] == ["pass", "fail"]
    files = report_files(result)
    report = files[REPORT].decode()
    assert "## Primary 1, shadow 2: PASS" in report
    assert f"## Primary {later[0]}, shadow 3: FAIL" in report
    assert report.count("Top-1 agreement") == 2
    assert json.loads(files["summary.json"])["by_versions"][1]["shadow_error_rate"] == 0.0
    anomalies = pd.read_csv(io.BytesIO(files["anomalies.csv"]))
    assert len(anomalies) == len(second.anomalies)
    confusion = pd.read_csv(io.BytesIO(files["confusion.csv"]))
    assert confusion.groupby("shadow_version").size().to_dict() == {2: 10, 3: 10}
    Image.open(io.BytesIO(files[CHART])).verify()
    slack = json.dumps(audit_message(result).blocks)
    assert "primary 1, shadow 2" in slack
    assert f"primary {later[0]}, shadow 3" in slack
    assert slack.count("Top-1 agreement") == 2


@pytest.mark.parametrize("store", ["folder", "s3"])
def test_hour_folders_before_a_time_are_removed_and_nothing_else(tmp_path, request, store):
    """Every audited hour keeps a folder (an hour without records its mark alone): 24 a day and
    a model, never removed. The hours before a time lose what the audit wrote in them, and their
    folder once empty; a file of someone else's, and a folder of another name, stay."""
    import os
    import time

    from vision_rollout.audit import AUDITED, hour_folder, prune_hours

    audits = (Folder(request.getfixturevalue("s3").uri()) if store == "s3" else Folder(str(tmp_path / "run"))) / "a"
    hour = datetime(2026, 3, 10, 7, tzinfo=UTC)
    old, kept_file, recent = (hour_folder(audits, hour - timedelta(hours=k)) for k in (50, 49, 1))
    for folder in (old, kept_file, recent):
        folder.write(AUDITED, b"{}")
    write_report(report_files(audit_frame(pairs(20, 18))), old)
    kept_file.write("notes.txt", b"someone else's")
    (audits / "scratch").write("x", b"not an hour")
    if store == "folder":  # (a write killed mid-way: on a disk alone)
        tmp = Path(str(old)) / f".{REPORT}.123.tmp"
        tmp.write_bytes(b"half")
        os.utime(tmp, (time.time() - 7200, time.time() - 7200))
    assert prune_hours(audits, hour - timedelta(hours=2), limit=1, dry_run=True) == [old.parts[-1]]
    assert audits.folders() == sorted([old.parts[-1], kept_file.parts[-1], recent.parts[-1], "scratch"])
    assert prune_hours(audits, hour - timedelta(hours=2), limit=1) == [old.parts[-1]]  # the oldest first
    assert audits.folders() == sorted([kept_file.parts[-1], recent.parts[-1], "scratch"])
    assert kept_file.names() == [AUDITED, "notes.txt"]
    assert prune_hours(audits, hour - timedelta(hours=2), dry_run=True) == []  # (someone else's file keeps it)
    assert kept_file.names() == [AUDITED, "notes.txt"]
    assert prune_hours(audits, hour - timedelta(hours=2)) == []
    assert audits.folders() == sorted([kept_file.parts[-1], recent.parts[-1], "scratch"])
    assert kept_file.names() == ["notes.txt"]
    assert recent.names() == [AUDITED]


def test_a_guard_file_a_killed_removal_left_does_not_keep_an_hour_folder(tmp_path):
    """A removal on a disk locks ``.<name>.lock`` beside the file and removes it once done: a
    prune killed after removing an hour's report, before removing its guard, left the guard,
    which kept the hour's folder for good (not empty), the dry run counting it as someone
    else's file. Once over an hour old it goes under its lock, and the folder with it."""
    import os
    import time

    from vision_rollout.audit import AUDITED, hour_folder, prune_hours

    audits = Folder(str(tmp_path / "run")) / "a"
    hour = datetime(2026, 3, 10, 7, tzinfo=UTC)
    old = hour_folder(audits, hour - timedelta(hours=50))
    old.write(AUDITED, b"{}")
    guard = Path(str(old)) / f".{REPORT}.lock"  # (a prune killed under the lock of the report it removed)
    guard.write_bytes(b"")
    os.utime(guard, (time.time() - 7200, time.time() - 7200))
    assert prune_hours(audits, hour - timedelta(hours=2), dry_run=True) == [old.parts[-1]]
    assert audits.folders() == [old.parts[-1]]
    assert prune_hours(audits, hour - timedelta(hours=2)) == [old.parts[-1]]
    assert audits.folders() == []


def test_a_link_among_the_hour_folders_is_not_followed_out_of_the_store(tmp_path):
    """An hour's name that is a link to a folder elsewhere (on a shared volume, anyone's) is no
    hour folder of the audit's: what lies there is not removed."""
    from vision_rollout.audit import AUDITED, prune_hours

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for name in (REPORT, "summary.json", AUDITED):
        (outside / name).write_text("not the audit's")
    audits = Folder(str(tmp_path / "run")) / "audits" / "a"
    audits.write("x", b"")
    (tmp_path / "run/audits/a/20200101T00").symlink_to(outside)
    assert prune_hours(audits, datetime(2026, 1, 1, tzinfo=UTC)) == []
    assert sorted(p.name for p in outside.iterdir()) == sorted([REPORT, "summary.json", AUDITED])
    assert audits.folders() == []


@pytest.mark.parametrize("one_side", ["orphans", "dropped"])
def test_a_range_of_shadow_records_none_of_which_pairs_is_not_an_empty_one(tmp_path, one_side):
    """300 shadow records without their primary (its pod's files lost, or its clock in another
    hour), or 300 copies all dropped: the audit said "no shadow records in this range" and
    skipped it, and the hourly run marked the hour audited without a word where Prometheus
    did not say a mirror was configured. The shadow traffic was there and nothing was shown."""
    from vision_rollout.audit import with_coverage

    result = audit(shadow_log(tmp_path, 0, disagree=0.0, **{one_side: 300}), *around_now(), "digits")
    assert result.verdict == "inconclusive"
    assert result.rows == 0
    assert "no shadow records" not in result.reasons[0]
    assert "300" in result.reasons[0]
    assert with_coverage(result, None).verdict == "inconclusive"
    report = report_files(result)[REPORT].decode()
    assert "**INCONCLUSIVE**" in report
    orphans, dropped = (300, 0) if one_side == "orphans" else (0, 300)
    assert f"shadow records without their primary {orphans}, " in report
    assert f"copies dropped {dropped}" in report


def test_a_pair_whose_records_two_pods_stamped_either_side_of_the_hour_is_audited_once(tmp_path):
    """Istio's copy runs on the candidate's pod, whose clock may differ from the baseline pod's
    by seconds: a request answered at 10:59:50 whose copy was stamped 11:00:20 was a primary
    without its shadow in one hour's audit and a shadow without its primary in the next, in
    neither compared. It is the pair of the hour of its primary, once."""
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    log = shadow_log(tmp_path, 200, disagree=0.0, at=(hour - timedelta(seconds=10)).timestamp(), skew=30)
    before = audit(log, hour - timedelta(hours=1), hour, "digits")
    assert (before.verdict, before.rows, before.primary_without_shadow) == ("pass", 200, 0)
    after = audit(log, hour, hour + timedelta(hours=1), "digits")
    assert (after.verdict, after.rows, after.shadow_without_primary) == ("skip", 0, 0)
    (tmp_path / "b").mkdir()
    earlier = shadow_log(tmp_path / "b", 200, disagree=0.0, at=(hour + timedelta(seconds=10)).timestamp(), skew=-30)
    assert audit(earlier, hour, hour + timedelta(hours=1), "digits").rows == 200
    assert audit(earlier, hour - timedelta(hours=1), hour, "digits").verdict == "skip"


def test_records_written_after_their_hour_closed_are_counted_not_audited_nor_dropped(tmp_path):
    """A writer that flushed late (a starved thread, a slow PUT) put an hour's records in files
    that came after its audit had read it: the audit showed 100 pairs, a retry or a catch-up
    once they came 125, and the next hour's audit dropped them without a word. They are left out of
    their hour's audit whenever it runs, and counted in it; the next hour counts those that came
    after its predecessor's audit, once. Copies a pod's clock 90 s ahead stamped past the hour's
    margin, written by its close, were lost to their hour (not read: its primaries without a
    shadow) and late in the next: the hour reads what was written by its close, stamped by then,
    and pairs them; the next hour does not count them."""
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)

    def audit_of(k: int, **kw):
        start = hour + timedelta(hours=k)
        return audit(tmp_path / "log", start, start + timedelta(hours=1), "digits", **kw)

    shadow_log(tmp_path, 100, disagree=0.0, at=(hour + timedelta(minutes=30)).timestamp())
    on_time = audit_of(0)
    assert (on_time.verdict, on_time.rows, on_time.late_records) == ("pass", 100, 0)

    def written_late(n: int, seed: int, shadow: str, into_hour: timedelta, **late: float) -> None:
        """``n`` agreeing pairs of version 1 and ``shadow``, ``into_hour`` after the hour began,
        flushed or stamped late as ``late`` says."""
        at = (hour + into_hour).timestamp()
        shadow_log(tmp_path, n, disagree=0.0, seed=seed, versions=("1", shadow), at=at, **late)

    # 20 pairs of the hour's last minute flushed 4 minutes later, 5 of its tenth minute 55 minutes later.
    written_late(20, 1, "3", timedelta(minutes=59, seconds=30), flushed=240)
    written_late(5, 2, "4", timedelta(minutes=10), flushed=55 * 60)
    # (written by the close: the hour's pairs, 10 of them too few to show agreement)
    written_late(10, 3, "5", timedelta(minutes=59, seconds=50), skew=90)
    again = audit_of(0)
    assert (again.verdict, again.rows, again.late_records) == ("inconclusive", 110, 50)
    assert again.primary_without_shadow == 0
    assert "primary 1, shadow 5: INCONCLUSIVE: top-1 agreement 100.00% (interval 72.25-100.00%)" in again.reasons[1]
    assert any("50 records of this range were written after it closed" in r for r in again.reasons)
    assert "- Records written after this range closed (not audited): 50" in report_files(again)[REPORT].decode()
    nxt = audit_of(1, earlier_hours=24)
    assert (nxt.verdict, nxt.rows, nxt.late_earlier, nxt.shadow_without_primary) == ("warning", 0, 50, 0)
    assert any("50 records of the 24 hours before this range came after their audit closed" in r for r in nxt.reasons)
    assert audit_of(2, earlier_hours=24).late_earlier == 0  # (counted once)
    assert audit_of(1).late_earlier is None
    (tmp_path / "b").mkdir()
    only_late = shadow_log(tmp_path / "b", 30, disagree=0.0, at=(hour + timedelta(minutes=5)).timestamp(), flushed=7200)
    alone = audit(only_late, hour, hour + timedelta(hours=1), "digits")
    assert (alone.verdict, alone.late_records) == ("inconclusive", 60)
    assert alone.reasons[0].startswith("60 records of this range were written after it closed")


def test_a_model_without_a_shadow_whose_records_came_late_keeps_an_audit_of_all_models_passing(tmp_path):
    """A model with no shadow configured (its primaries say nothing of a mirror) whose last
    records were written after the hour closed made its audit inconclusive, as if copies had been
    late, and an audit of every model with it: a PASS turned INCONCLUSIVE by a slow flush of a
    model nothing mirrors. Records written late make a range inconclusive where they are shadow
    evidence (shadow records, or primaries the server's own mirror sampled); primaries alone
    are a skip, the late records named."""
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    log = shadow_log(tmp_path, 100, disagree=0.0, at=(hour + timedelta(minutes=30)).timestamp())
    at = (hour + timedelta(minutes=59, seconds=55)).timestamp()
    for model, mirrored in (("plain", None), ("sampled", True)):
        late = {"primary-pod": ("primary", {i: at + i for i in range(3)})}
        pods_log(tmp_path, late, mirrored, model=model, written=at + 200)
    plain, sampled = (audit(log, hour, hour + timedelta(hours=1), m) for m in ("plain", "sampled"))
    assert (plain.verdict, plain.late_records) == ("skip", 3)
    assert any(r.startswith("3 records of this range were written after it closed") for r in plain.reasons)
    assert (sampled.verdict, sampled.late_records) == ("inconclusive", 3)
    assert sampled.reasons[0].startswith("3 records of this range were written after it closed")
    every = audit(log, hour, hour + timedelta(hours=1), None)
    assert [(p.model, p.verdict) for p in every.by_models] == [("digits", "pass"), ("sampled", "inconclusive")]
    (tmp_path / "other").mkdir()
    alone = shadow_log(tmp_path / "other", 100, disagree=0.0, at=(hour + timedelta(minutes=30)).timestamp())
    pods_log(
        tmp_path / "other", {"primary-pod": ("primary", {i: at + i for i in range(3)})}, model="plain", written=at + 200
    )
    assert audit(alone, hour, hour + timedelta(hours=1), None).verdict == "pass"


def test_behind_istio_a_model_whose_primaries_all_came_late_is_inconclusive_not_lost(tmp_path):
    """Behind Istio (primaries saying nothing of the mirror) with a share asserted, a model whose
    primaries of the range were all written after it closed, no copy of them yet: the mirror's
    evidence is late, not lost. The late primaries were not counted for the chance test (an audit
    of every model left the model out, a skip: PASS), and its own audit, with coverage, read them
    as dropped copies (WARNING). Both are inconclusive, the late records named first."""
    from vision_rollout.audit import with_coverage

    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    end = hour + timedelta(hours=1)
    log = shadow_log(tmp_path, 100, disagree=0.0, at=(hour + timedelta(minutes=30)).timestamp())
    late = {i: (hour + timedelta(minutes=40)).timestamp() + i for i in range(200)}
    pods_log(tmp_path, {"primary-pod": ("primary", late)}, model="plain", written=end.timestamp() + 200)
    every = audit(log, hour, end, None, mirror_percent=10)
    assert [(p.model, p.verdict) for p in every.by_models] == [("digits", "pass"), ("plain", "inconclusive")]
    assert every.verdict == "inconclusive"
    alone = with_coverage(audit(log, hour, end, "plain", mirror_percent=10), 10)
    assert (alone.verdict, alone.late_records) == ("inconclusive", 200)
    assert alone.reasons[0].startswith("200 records of this range were written after it closed")
    assert not any("the copies are dropped" in r for r in alone.reasons)


def test_the_hours_first_audit_waits_for_a_file_named_at_its_close_to_be_whole(tmp_path):
    """A file named by its writer up to the hour's close (``closes``) is in time: in the hour's
    audit, not late. The first audit read the log at that very second, while a file named then
    (its second begun, its write or PUT under way) was not there yet: that audit showed fewer
    records than a retry, and the next hour's count of late records never counted them. It now
    waits until such a file is whole (``WRITE_S`` after its second, as the stage gate takes it)."""
    from vision_rollout.audit import audited_hour
    from vision_rollout.engine import WRITE_S

    ten = datetime(2026, 3, 1, 10, tzinfo=UTC)
    close = closes(ten)
    start, end, wait = audited_hour(ten + timedelta(minutes=2), close)
    assert (start, end, wait) == (ten - timedelta(hours=1), ten, WRITE_S)
    assert audited_hour(ten, ten)[2] == (close - ten).total_seconds() + WRITE_S
    # (what the wait is for: the hour's records in a file named at its close are the hour's own)
    shadow_log(
        tmp_path, 10, disagree=0.0, at=(ten - timedelta(seconds=1)).timestamp(), flushed=(close - ten).seconds + 1
    )
    named = audit(tmp_path / "log", start, end, "digits")
    assert (named.rows, named.late_records) == (10, 0)


def test_an_hour_of_malformed_records_is_not_an_empty_one(tmp_path):
    """Records read skips as malformed (a damaged or foreign file's: no request id, an output
    no answer can hold) were dropped without a word: an hour of them alone was skipped and
    marked audited unreported, one with pairs beside them passed on what was left."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    log = shadow_log(tmp_path, 200, disagree=0.0)
    assert audit(log, *around_now(), "digits").verdict == "pass"
    (path,) = log.rglob("part-*.parquet")
    table = pq.read_table(path)
    damaged = table.set_column(
        table.schema.get_field_index("request_id"), "request_id", pa.nulls(table.num_rows, pa.string())
    )
    pq.write_table(damaged, path.with_name(path.name.replace("audit-test", "other")))
    result = audit(log, *around_now(), "digits")
    assert (result.verdict, result.rows, result.malformed_records) == ("inconclusive", 200, 400)
    assert result.reasons[0].startswith("400 prediction log records in the files of this range were malformed")
    assert "- Malformed records in the files read (not audited): 400" in report_files(result)[REPORT].decode()
    path.unlink()
    alone = audit(log, *around_now(), "digits")
    assert (alone.verdict, alone.rows, alone.malformed_records) == ("inconclusive", 0, 400)


def test_a_range_audited_up_to_now_waits_for_its_last_copies_and_no_longer_than_they_can_come(tmp_path):
    """Audited up to now, a range's last primaries had no shadow record yet (pods flush every
    few seconds, a copy's after its primary's, or the other way round): a short range showed
    nothing, a long one its last minute's records unpaired and only the copies written first
    compared. ``await_copies`` looks again until the pairs are whole; a primary whose copy never
    comes (a mirror sampling under 100%) is waited for until its close, no longer."""
    now = time.time()
    end = datetime.fromtimestamp(now, UTC)
    log = shadow_log(tmp_path, 30, disagree=0.0, at=now - 5, roles=("primary",))
    assert audit(log, end - timedelta(minutes=10), end, "digits").rows == 0
    clock = [now]
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        clock[0] += seconds
        if len(naps) == 3:  # (the candidate's pod flushes)
            shadow_log(tmp_path, 30, disagree=0.0, at=now - 5, roles=("shadow",), flushed=4)

    assert await_copies(log, end, "digits", "1", lambda: clock[0], sleep) == pytest.approx(3 * COPIES_POLL_S)
    result = audit(log, end - timedelta(minutes=10), end, "digits")
    assert (result.rows, result.primary_without_shadow) == (30, 0)
    assert copies_pending(log, end, "digits", "2") is None  # (the candidate's own primaries: none)

    (tmp_path / "b").mkdir()
    never = shadow_log(tmp_path / "b", 10, disagree=0.0, at=now - 5, roles=("primary",))
    clock, naps = [now], []
    waited = await_copies(never, end, "digits", "1", lambda: clock[0], sleep)
    assert waited == pytest.approx((closes(end) - end).total_seconds() - 5)
    assert max(naps) <= COPIES_POLL_S
    assert await_copies(tmp_path / "none", end, "digits", "1", lambda: clock[0], sleep) == 0

    (tmp_path / "c").mkdir()  # the candidate's pod flushed first: its copies wait for their primaries
    first = shadow_log(tmp_path / "c", 30, disagree=0.0, at=now - 5, roles=("shadow",))
    assert audit(first, end - timedelta(minutes=10), end, "digits").shadow_without_primary == 30
    clock, naps = [now], []

    def flush_primaries(seconds: float) -> None:
        naps.append(seconds)
        clock[0] += seconds
        shadow_log(tmp_path / "c", 30, disagree=0.0, at=now - 5, roles=("primary",), flushed=3)

    assert await_copies(first, end, "digits", "1", lambda: clock[0], flush_primaries) == COPIES_POLL_S
    result = audit(first, end - timedelta(minutes=10), end, "digits")
    assert (result.rows, result.shadow_without_primary) == (30, 0)


def test_the_pairs_of_versions_audited_in_a_range_are_bounded_and_those_left_out_named():
    """A log naming thousands of versions (a foreign writer, forged records) made an audit, a
    report section, a reason and a Slack block of each pair: thousands of each. The pairs with
    the most records are audited, up to ``MAX_VERSION_PAIRS``; the rest are counted with their
    records, named in the reasons, and keep a range from passing."""
    from vision_rollout.audit import MAX_VERSION_PAIRS, audit_by_versions
    from vision_rollout.notify import audit_message

    many = [pairs(3, 3).assign(shadow_version=f"x{k}") for k in range(MAX_VERSION_PAIRS + 40)]
    df = pd.concat([*many, pairs(400, 400)]).reset_index(drop=True)
    result = audit_by_versions(df)
    assert len(result.by_versions) == MAX_VERSION_PAIRS
    assert ["2"] in [p.versions["shadow"] for p in result.by_versions]  # (the most records)
    assert (result.pairs_left_out, result.records_left_out) == (41, 123)
    assert result.verdict == "inconclusive"
    assert result.reasons[0].startswith("41 more pairs of versions (123 records) were not audited")
    assert len(result.reasons) == MAX_VERSION_PAIRS + 1
    assert len(result.versions["shadow"]) == MAX_VERSION_PAIRS
    assert json.loads(report_files(result)["summary.json"])["pairs_left_out"] == 41
    assert len(json.dumps(audit_message(result).blocks)) < 40_000


@pytest.mark.parametrize("pairs_of_versions", [1, 2])
def test_versions_and_image_digests_of_another_writer_cannot_mark_up_or_forge_the_report(pairs_of_versions):
    """The versions and the image digests are whatever wrote the log: a version with a line
    break wrote a heading of its own into report.md (and a line into Slack), ``<img ...>`` or
    ``[x](url)`` rendered an image fetched from anywhere or a link, and a digest with ``|``
    split its anomaly row. Each is now text: escaped, on one line, in its cell."""
    from urllib.parse import unquote

    from markdown_it import MarkdownIt

    from vision_rollout.audit import audit_by_versions
    from vision_rollout.notify import audit_message

    evil = "9\n## PASS <img src=http://e/x> [click](http://e) *b* `c` \x1b[31m"
    df = pairs(20, 10).assign(shadow_version=evil, image_sha256="ab|cd|<img src=x")
    if pairs_of_versions == 2:
        df = pd.concat([pairs(20, 20), df]).reset_index(drop=True)
    report = report_files(audit_by_versions(df))[REPORT].decode()
    assert "\x1b" not in report
    assert not [line for line in report.splitlines() if line.startswith("## PASS")]
    html = MarkdownIt("gfm-like").render(report)
    assert re.findall(r"<img[^>]*>", html) == ['<img src="divergence.png" alt="divergence and confusion" />']
    links = re.findall(r'<a href="([^"]*)">(.*?)</a>', html)  # (a bare URL is one, reading as it leads)
    assert "[click](" in html
    assert all(unquote(href) == text for href, text in links)
    assert "<strong>b</strong>" not in html
    assert "<em>b</em>" not in html
    rows = [
        re.findall(r"<td>(.*?)</td>", r) for r in re.findall(r"<tr>(.*?)</tr>", html, re.S) if "divergence</td>" in r
    ]
    assert len(rows) == 10
    assert {row[2] for row in rows} == {"<code>ab|cd|&lt;img src=x</code>"}
    slack = json.dumps(audit_message(audit_by_versions(df)).blocks)
    assert "\\n## PASS" not in slack


def test_records_repeating_a_request_id_are_counted_and_named_not_dropped_silently(tmp_path):
    """A client re-sending its request ids (a retry, a replay) gives each key a second primary
    and shadow record: the earliest pair is compared, the repeats are no second piece of
    evidence. The audit left them out without a word (a range of half repeats read as whole);
    they are now counted and named in the reasons and report.md, the verdict unchanged."""
    log = shadow_log(tmp_path, 200, disagree=0.0)
    shadow_log(tmp_path, 200, disagree=0.5, seed=1)  # (the same request ids and images again)
    result = audit(log, *around_now(), "digits")
    assert (result.verdict, result.rows, result.duplicates) == ("pass", 200, 400)
    assert any(r.startswith("400 records repeated the request id and item of another") for r in result.reasons)
    assert "- Records repeating an earlier one's request id and item (not audited): 400" in (
        report_files(result)[REPORT].decode()
    )
    assert json.loads(report_files(result)["summary.json"])["duplicates"] == 400


def test_huge_versions_and_request_ids_of_another_writer_are_cut_where_shown():
    """The model server's request ids are 128 characters at most and its versions numbers,
    but another writer's log may hold a version of 200,000 characters and request ids of a
    megabyte: the chart laid out titles that long (minutes), anomalies.csv held each id whole
    (megabytes), summary.json (the task's XCom too) and report.md each version whole. What is
    shown of each is cut (``MAX_SHOWN``), marked by an ellipsis."""
    from vision_rollout.audit import MAX_SHOWN, audit_by_versions

    big = "9" * 200_000
    rids = ["R" * 1_000_000 + str(i) for i in range(20)]
    df = pd.concat([pairs(20, 20), pairs(20, 10).assign(shadow_version=big, request_id=rids)]).reset_index(drop=True)
    result = audit_by_versions(df)
    assert all(len(r) < 2_000 for r in result.reasons)
    files = report_files(result)
    assert {k: v for k, v in files.items() if len(v) > 100_000} == {}
    summary = json.loads(files["summary.json"])
    assert summary["versions"]["shadow"] == ["2", "9" * (MAX_SHOWN - 1) + "…"]
    assert {row.split(",")[3] for row in files["anomalies.csv"].decode().splitlines()[1:]} == {
        "R" * (MAX_SHOWN - 1) + "…"
    }


def test_a_primary_its_mirror_did_not_sample_is_not_waited_for(tmp_path):
    """With a mirror under 100%, the rollout's audit waited out the range's close (about two
    minutes) for the copies of primaries the mirror never sampled: a record did not say so. A
    primary that says it was not sampled (``mirrored`` false) is no longer waited for; one that
    says it was still is, as is one of an older writer (no field, the test above)."""
    now = time.time()
    end = datetime.fromtimestamp(now, UTC)
    clock, naps = [now], []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        clock[0] += seconds

    unsampled = shadow_log(tmp_path, 10, disagree=0.0, at=now - 5, roles=("primary",), mirrored=False)
    assert copies_pending(unsampled, end, "digits", "1") is None
    assert await_copies(unsampled, end, "digits", "1", lambda: clock[0], sleep) == 0
    assert naps == []

    (tmp_path / "b").mkdir()
    sampled = shadow_log(tmp_path / "b", 10, disagree=0.0, at=now - 5, roles=("primary",), mirrored=True)
    assert copies_pending(sampled, end, "digits", "1") is not None
    assert await_copies(sampled, end, "digits", "1", lambda: clock[0], sleep) > 0


def test_an_hours_audit_reads_of_the_next_hours_folder_only_the_files_of_its_margin(tmp_path, monkeypatch):
    """An hour's audit reads the records stamped up to a minute after it (a pod's clock behind,
    a copy stamped late): it read every file of the next hour's folder, the probability vectors
    too, only to find those (in a catch-up or a retry, every hour's folder read whole twice).
    The files and row groups whose ``time`` statistics (in their footer) hold no record of the
    range are left unread; those that hold some are read, their pairs audited."""
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    next_hour = hour + timedelta(hours=1)
    shadow_log(tmp_path, 100, disagree=0.0, at=(hour + timedelta(minutes=30)).timestamp())
    for k in range(5):  # the next hour's own pairs: five files of its folder
        shadow_log(
            tmp_path,
            50,
            disagree=0.0,
            seed=k + 1,
            versions=("1", str(k + 3)),
            at=(next_hour + timedelta(minutes=10 + k)).timestamp(),
        )
    # Pairs of the hour's last seconds whose copies another pod's clock stamped after it: a
    # file of the next hour's folder that holds records of the margin.
    shadow_log(
        tmp_path,
        100,
        disagree=0.0,
        seed=9,
        versions=("1", "9"),
        at=(next_hour - timedelta(seconds=10)).timestamp(),
        skew=30,
    )
    folder = tmp_path / "log" / "model=digits" / f"dt={next_hour:%Y-%m-%d}" / f"hour={next_hour:%H}"
    assert len(list(folder.glob("part-*.parquet"))) == 6
    reads = DataReads()
    monkeypatch.setattr(predictionlog, "filesystem", reads.filesystem)
    result = audit(tmp_path / "log", hour, next_hour, "digits")
    assert (result.verdict, result.rows, result.skipped_files) == ("pass", 200, 0), result.reasons
    opened = sorted(Path(p).parent.name for p in reads.reads)
    assert opened == ["hour=10", "hour=10", "hour=11"], opened  # the hour's two files, the margin's one


def test_an_audit_holds_what_its_budget_allows_and_names_the_files_left_unread(tmp_path):
    """Each file's read was bounded (``MAX_READ_BYTES``), the hour's none: an hour of 10,000
    files was read whole into one audit's memory. What one audit holds is bounded
    (``max_bytes``); the files beyond it are left unread, counted with their bytes, and the
    range is inconclusive, never a pass on what fitted."""
    from itertools import combinations

    for k in range(4):
        shadow_log(tmp_path, 200, disagree=0.0, seed=k, versions=("1", str(k + 3)))
    log = tmp_path / "log"
    sizes = [p.stat().st_size for p in log.rglob("part-*.parquet")]
    assert len(sizes) == 4
    whole = audit(log, *around_now(), "digits")
    assert (whole.verdict, whole.rows, whole.unread_files) == ("pass", 800, 0)
    records = predictionlog.read(log, *around_now(), "digits", columns=predictionlog.AUDIT_COLUMNS)
    one_file = int(records.memory_usage(deep=True).sum()) // 4
    part = audit(log, *around_now(), "digits", max_bytes=one_file * 2)
    assert part.verdict == "inconclusive"
    assert 1 <= part.unread_files < 4
    assert part.rows == 200 * (4 - part.unread_files)
    assert part.unread_bytes in {sum(c) for c in combinations(sizes, part.unread_files)}
    assert part.reasons[0].startswith(
        f"{part.unread_files} of 4 prediction log files of this range ({part.unread_bytes:,} bytes stored) were "
        f"not read: this audit holds at most {one_file * 2:,} bytes of records"
    ), part.reasons[0]
    assert f"- Prediction log files not read (over the audit's memory bound): {part.unread_files}" in (
        report_files(part)[REPORT].decode()
    )
    nothing = audit(log, *around_now(), "digits", max_bytes=1)
    assert (nothing.verdict, nothing.rows, nothing.unread_files, nothing.unread_bytes) == (
        "inconclusive",
        0,
        4,
        sum(sizes),
    )


def istio_log(
    folder: Path,
    primaries: list[float],
    copies: dict[int, float],
    down_after: float | None = None,
    mirrored: bool | None = None,
    forged: dict[int, float] | None = None,
) -> Path:
    """A prediction log as two Istio pods leave it: the baseline's pod (replica ``primary-pod``)
    a primary record at each of ``primaries`` saying nothing of the mirror (``mirrored`` null:
    Envoy samples it), the candidate's (``shadow-pod``) a shadow record for the primaries
    ``copies`` names (index -> the copy's stamp, its pod's clock). Each pod's records are written
    by its own writer, flushed once. ``mirrored``: what the primaries say of the mirror (true:
    the server's own mirror sampled each). ``forged``: shadow records of another input under the
    primaries' request ids (index -> stamp), as anyone reaching the data port can send."""
    return pods_log(
        folder,
        {"primary-pod": ("primary", dict(enumerate(primaries))), "shadow-pod": ("shadow", copies)},
        mirrored,
        forged,
    )


def pods_log(
    folder: Path,
    pods: dict[str, tuple[str, dict[int, float]]],
    mirrored: bool | None = None,
    forged: dict[int, float] | None = None,
    model: str = "digits",
    written: float | None = None,
    top: int = 3,
    image: str | None = "img",
    outcome: str = "ok",
) -> Path:
    """A prediction log as Istio's pods leave it (``istio_log``): each of ``pods`` (replica ->
    its role and its records of ``model``, index -> stamp by its clock: a primary of request
    ``r<i>``, or its copy) written by its own writer, flushed once (again: another flush,
    another file), at ``written`` (a ``time.time()``, by the files' names) where given. Each
    record answers class ``top`` (0.91) of its image ``<image>-<i>`` (``image`` None: none), or
    none with another ``outcome`` than ok (DROPPED: a copy the own mirror dropped; FAULT: a
    request that failed)."""
    from unittest import mock

    from model_server.masking import KeyRing, Masker
    from model_server.predictionlog import Inference, PredictionLog
    from tests.support import _Clock

    keys = folder / "keys.json"
    keys.write_text(json.dumps({"default": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}))
    p = np.full((1, 10), 0.01, dtype=np.float32)
    p[0, top] = 0.91
    answer = (3.0, outcome, p) if outcome == "ok" else (None, outcome, None)
    for replica, (role, stamps) in {**pods, "forger": ("shadow", forged or {})}.items():
        log = PredictionLog(folder / "log", Masker(KeyRing(keys)), replica=replica)
        for i, at in stamps.items():
            version = "1" if role == "primary" else "2"
            name = "forged" if replica == "forger" else image
            data = None if name is None else np.array([f"{name}-{i}".encode()], dtype=object)
            route = "route" if role == "primary" else "mirror"
            rid = f"r{i}"
            log.append(
                Inference(at, model, version, role, route, rid, "0" * 32, "0" * 16, *answer, data, True, {})._replace(
                    mirrored=mirrored if role == "primary" else None
                )
            )
        with mock.patch.object(predictionlog, "time", _Clock(written)) if written else nullcontext():
            log.flush()
    return folder / "log"


def skewed_scene(
    folder: Path, end: float, lead: float, poll: float, written_to: float, sibling: float | None
) -> tuple[Path, Callable[[], None]]:
    """The log at ``end + poll`` (``end``: the rollout audit's end) behind Istio's mirror of 10%:
    two baseline pods at 20 requests a second, ``primary-b``'s clock ``lead`` s ahead of
    ``primary-a``'s (right); the candidate's pod ``shadow-slow`` (right clock) flushing every 60 s,
    its copies (of ``primary-a``'s primaries) written up to ``end + written_to``; with ``sibling``,
    a second candidate pod (its clock that far ahead, as ``primary-b``'s) with the copies of
    ``primary-b``'s, flushing every 2 s (else ``shadow-slow`` holds those too). And the flush
    ``shadow-slow`` has due: its copies since."""
    real = [end - 240 + 0.05 * k for k in range(int((240 + poll) / 0.05))]
    a = {i: t for i, t in enumerate(real) if i % 2 == 0}
    b = {i: t + lead for i, t in enumerate(real) if i % 2}
    slow = {i: t + 0.003 for i, t in enumerate(real) if i % 20 == 8 or (sibling is None and i % 20 == 3)}
    pods = {"primary-a": ("primary", a), "primary-b": ("primary", b)}
    if sibling is not None:
        pods["shadow-sibling"] = ("shadow", {i: t + sibling + 0.003 for i, t in enumerate(real) if i % 20 == 3})
    log = pods_log(folder, {**pods, "shadow-slow": ("shadow", {i: t for i, t in slow.items() if t < end + written_to})})

    def flush() -> None:
        pods_log(folder, {"shadow-slow": ("shadow", {i: t for i, t in slow.items() if t >= end + written_to})})

    return log, flush


@pytest.mark.parametrize(
    ("lead", "poll", "written_to", "sibling"),
    [(30.0, 33.0, -15.0, None), (5.0, 57.0, -2.0, None), (60.0, 5.0, -61.0, 60.0)],
)
def test_a_live_shadow_pod_slow_to_flush_is_waited_for_whatever_the_clocks(tmp_path, lead, poll, written_to, sibling):
    """The rollout's wait (``copies_pending``) for a live candidate pod flushing every 60 s (and
    its write) while the baseline's pods flush every 2 s on clocks up to ``CLOCK_SKEW_S`` ahead,
    and another candidate pod (clock ahead too) writes its copies at once: the wait goes on until
    the live pod flushed, then ends, and the audit passes. Taking a pod written up to the newest
    primary less the flush bound, or a pod slow to flush as gone, ended the wait early: the
    audit read the copies not yet written as a stopped mirror (inconclusive, a rollback)."""
    end = time.time() - poll
    log, flush = skewed_scene(tmp_path, end, lead, poll, written_to, sibling)
    at = datetime.fromtimestamp(end, UTC)
    assert copies_pending(log, at, "digits", "1") is not None
    flush()
    assert copies_pending(log, at, "digits", "1") is None
    result = audit(log, at - timedelta(minutes=4), at, "digits", mirror_percent=10)
    assert (result.verdict, result.mirror_stopped, result.copies_lost) == ("pass", None, 0)
    assert result.copies_p is not None
    assert result.copies_p > COPIES_ALPHA


def test_a_shadow_pod_gone_holds_the_wait_and_the_copies_test_back_no_longer(tmp_path):
    """Behind Istio the candidate has several pods, which come and go (rescheduled, scaled
    down). The watermark was the earliest pod's, and a pod gone stays the earliest: its last copy
    held it back, the rollout's wait ran to the range's close for copies Envoy sent the other
    pods or never made, and the copies test stopped at that pod's end. A pod whose newest record
    is older than another candidate pod's by more than a live one's can be (``copy_due``) is gone:
    the others' copies are waited for, and tested, to their end."""
    now = time.time()
    end = datetime.fromtimestamp(now - 30, UTC)
    real = [now - 270 + 0.05 * k for k in range(int(270 / 0.05))]
    primaries = {i: t for i, t in enumerate(real)}
    copies = [{i: t + 0.003 for i, t in primaries.items() if i % 30 == k} for k in (3, 13, 23)]
    gone = {i: t for i, t in copies[2].items() if t < now - 200}  # (170 s before the range's end)
    pods = {"primary": ("primary", primaries), "shadow-0": ("shadow", copies[0]), "shadow-1": ("shadow", copies[1])}
    log = pods_log(tmp_path, {**pods, "shadow-2": ("shadow", gone)})
    assert copies_pending(log, end, "digits", "1") is None
    result = audit(log, end - timedelta(minutes=3), end, "digits", mirror_percent=10)
    assert result.copies_eligible >= 3500  # (the range's 3600 primaries, not those to the pod's end)
    assert result.copies_p is not None
    assert result.copies_p < COPIES_ALPHA  # (the third of the copies lost since the pod went: named)
    assert (result.verdict, result.mirror_stopped) == ("pass", None)

    (tmp_path / "live").mkdir()  # (the third pod alive: its copies of the last minute not written yet)
    slow = {i: t for i, t in copies[2].items() if t < now - 62}
    pending = copies_pending(pods_log(tmp_path / "live", {**pods, "shadow-2": ("shadow", slow)}), end, "digits", "1")
    assert pending is not None


def test_behind_istio_primaries_before_the_shadows_watermark_are_not_waited_for(tmp_path):
    """Behind Istio a mirror under 100% samples at random in Envoy: the primaries' records say
    nothing of it (``mirrored`` null), and the rollout's audit waited out the range's close
    (``closes``: ``copy_due``, 186 s) for the copies of every one of them, most never made. The
    candidate's pod has written its copies up to a time (its watermark: its newest record, less
    its copies' longest time in flight and its clock's lead on the primaries' as the pairs show
    it): a primary stamped before that without a copy was not mirrored, and is not waited for."""
    now = time.time()
    end = datetime.fromtimestamp(now, UTC)
    primaries = [now - 60 + 0.5 * k for k in range(120)]  # up to the range's end, and on after it
    primaries += [now + 0.5 * k for k in range(1, 11)]
    copies = {i: t + 0.003 for i, t in enumerate(primaries) if i % 10 == 3}  # Envoy's 10%
    log = istio_log(tmp_path, primaries, copies)
    clock, naps = [now + 6], []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        clock[0] += seconds

    assert copies_pending(log, end, "digits", "1") is None
    assert await_copies(log, end, "digits", "1", lambda: clock[0], sleep) == 0
    result = audit(log, end - timedelta(minutes=5), end, "digits")
    assert result.rows == 12
    assert result.primary_without_shadow == 108  # (an upper bound of copies lost: Envoy's sampling)


def test_rolloutctl_audits_wait_covers_the_copies_behind_istio_of_the_versions_the_log_shows_mirrored(tmp_path):
    """``rolloutctl audit`` (no version: ``copies_pending(..., None)``) waited only for the
    primaries that say the server's own mirror sampled them: behind Istio (``mirrored`` null)
    the copies of the last primaries, still in the candidate pod's buffer, were not waited for;
    the audit up to now read those primaries without them, and the pairs were left out unsaid.
    Without a version, the primaries of the versions whose copies the stretch holds are waited
    for as the rollout's wait does its version's; a log with no copy at all is not waited for."""
    now = time.time()
    end = datetime.fromtimestamp(now, UTC)
    primaries = [now - 60 + 0.5 * k for k in range(120)]
    written = {i: t + 0.003 for i, t in enumerate(primaries) if t < now - 20}  # (flushed 20 s ago)
    log = istio_log(tmp_path, primaries, written)
    assert copies_pending(log, end, "digits", "1") is not None  # (the rollout's wait)
    assert copies_pending(log, end, "digits", None) is not None
    pods_log(tmp_path, {"shadow-pod": ("shadow", {i: t + 0.003 for i, t in enumerate(primaries) if i not in written})})
    assert copies_pending(log, end, "digits", None) is None
    assert audit(log, end - timedelta(minutes=5), end, "digits").rows == 120

    (tmp_path / "b").mkdir()
    alone = istio_log(tmp_path / "b", primaries, {})  # (no mirror: nothing to wait for)
    assert copies_pending(alone, end, "digits", None) is None


def test_rolloutctl_audits_wait_for_every_model_takes_a_version_shown_mirrored_for_its_own_model_only(tmp_path):
    """Without a model (``rolloutctl audit``'s default) the versions whose copies the stretch
    holds were taken as bare labels, across models: one model behind Istio with its copies all
    written made every other model's recent primaries of the same label ("1") pending, and the
    wait ran to their close though no mirror copies them. A version is shown mirrored for its
    own model only."""
    now = time.time()
    end = datetime.fromtimestamp(now, UTC)
    primaries = {i: now - 60 + 0.5 * i for i in range(40)}
    copies = {i: t + 0.003 for i, t in primaries.items()}
    log = pods_log(tmp_path, {"primary-pod": ("primary", primaries), "shadow-pod": ("shadow", copies)})
    assert copies_pending(log, end, None, None) is None
    other = {i: now - 15 + 0.5 * i for i in range(20)}  # (no mirror; version "1" too)
    pods_log(tmp_path, {"other-pod": ("primary", other)}, model="other")
    assert copies_pending(log, end, "digits", None) is None
    assert copies_pending(log, end, "other", None) is None
    assert copies_pending(log, end, None, None) is None


def test_behind_istio_a_shadow_that_wrote_nothing_is_waited_for_and_not_agreement(tmp_path):
    """A candidate's pod that is down writes no copy, and leaves no watermark: the primaries are
    waited for until the range's close, as before, and the audit finds no shadow record (no pass
    over zero copies). Its last primaries after the candidate stopped writing are waited for too,
    not judged unmirrored by the copies written before it went down."""
    now = time.time()
    end = datetime.fromtimestamp(now, UTC)
    primaries = [now - 60 + 0.5 * k for k in range(120)]
    clock, naps = [now], []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        clock[0] += seconds

    (tmp_path / "down").mkdir()
    down = istio_log(tmp_path / "down", primaries, {})
    newest = primaries[-1]
    waited = await_copies(down, end, "digits", "1", lambda: clock[0], sleep)
    assert waited == pytest.approx(closes(datetime.fromtimestamp(newest, UTC)).timestamp() - now)
    result = audit(down, end - timedelta(minutes=5), end, "digits")
    assert result.verdict != "pass"
    assert result.rows == 0

    (tmp_path / "died").mkdir()  # its copies stop 20 s before the range's end
    copies = {i: t + 0.003 for i, t in enumerate(primaries) if i % 10 == 3 and t < now - 20}
    died = istio_log(tmp_path / "died", primaries, copies)
    pending = copies_pending(died, end, "digits", "1")
    assert pending is not None
    assert pending.timestamp() == pytest.approx(newest, abs=1e-3)


@pytest.mark.integration
def test_the_copies_of_real_servers_are_waited_for_only_where_they_may_come(
    server_factory, repo_copy, tmp_path, digit_images
):
    """Real model servers writing one log. The server's own mirror at 30%: its primaries say
    which were copied, none is waited for once the copies are written. As Istio's pods: the
    baseline's server serves without a policy of its own (its primaries say nothing of the
    mirror), and a quarter of the requests reach the candidate's server again as Envoy's
    copies (``Host: ...-shadow``, the same request id): once the candidate's server wrote
    copies past them, the primaries of the range are not waited for (they were, for about two
    minutes), and the audit pairs each copy with its primary."""
    from tests.support import TOKEN, infer, put_policy

    log = tmp_path / "log"
    own = server_factory(repo_copy, "--state-dir", str(tmp_path / "own"), "--prediction-log", str(log), token=TOKEN)
    own.load_versions("digits", 1, 2)
    policy = {"route": [{"version": "1", "weight": 100}], "mirror": {"version": "2", "percent": 30}}
    assert put_policy(own, policy).status_code == 200
    for i in range(40):
        assert infer(own, digit_images[i][0], {"X-Request-ID": f"own-{i}"}).status_code == 200
    end = datetime.now(UTC)
    own.stop()
    assert copies_pending(log, end, "digits", "1") is None
    copied = audit(log, end - timedelta(minutes=5), end, "digits")
    assert 0 < copied.rows < 40

    istio = tmp_path / "istio"
    args = ("--prediction-log", str(istio), "--prediction-log-flush-s", "0.05", "--mesh-mirror")  # (Istio's pods)
    baseline = server_factory(repo_copy, "--state-dir", str(tmp_path / "b"), *args, token=TOKEN)
    baseline.load_versions("digits", 1)
    candidate = server_factory(repo_copy, "--state-dir", str(tmp_path / "c"), *args, token=TOKEN)
    candidate.load_versions("digits", 2)
    mirror = {"Host": "digits.ml.svc-shadow:8000"}
    end = None
    for i in range(60):
        if i == 40:
            time.sleep(1.5)  # (traffic goes on past the range's end, a little later)
            end = datetime.now(UTC)
        rid = {"X-Request-ID": f"istio-{i}"}
        assert infer(baseline, digit_images[i][0], rid).status_code == 200
        if i % 4 == 1:
            assert infer(candidate, digit_images[i][0], {**rid, **mirror}).status_code == 200
    baseline.stop()
    candidate.stop()
    assert end is not None
    assert copies_pending(istio, end, "digits", "1") is None
    result = audit(istio, end - timedelta(minutes=5), end, "digits")
    assert (result.rows, result.versions) == (10, {"primary": ["1"], "shadow": ["2"]})
    assert copied.copies_lost == 0  # (the own mirror's copies all written)
    # The copies against the configured share: a quarter, as Envoy was told, is no warning; told
    # 75%, so few copies are (a warning: the verdict stands on the pairs compared).
    as_told = audit(istio, end - timedelta(minutes=5), end, "digits", mirror_percent=25)
    assert as_told.copies_eligible >= 30
    assert (as_told.copies_p or 0.0) > COPIES_ALPHA
    assert not any("copies are lost" in r for r in as_told.reasons)
    short = audit(istio, end - timedelta(minutes=5), end, "digits", mirror_percent=75)
    assert short.copies_p is not None
    assert short.copies_p < COPIES_ALPHA
    assert short.verdict == as_told.verdict
    assert any(
        f"the shadow received {short.copies_received} copies of {short.copies_eligible}" in r for r in short.reasons
    )
    assert "expected at 75%" in report_files(short)[REPORT].decode()


def test_a_shadow_answering_another_output_shape_fails_with_its_report_and_chart(tmp_path):
    """A shadow answering another output shape (``[1, 2, 5]`` beside the primary's ``[1, 10]``)
    gave every pair the same divergence but for the last bit of the float: the chart's
    histogram could not make its 40 bins of that range, and the report was never written (the
    rollout's shadow_consistency failed on the error, the hourly audit on every run). The bins
    are fixed over the range shown (0 to 2); the shadow fails the audit, with its report (its
    pairs' outputs differ in shape now: disagreements, no divergence computed on them)."""
    other = np.full((1, 2, 5), 0.1, np.float32)
    answers = []
    for i in range(300):
        p = np.full((1, 10), 0.01, np.float32)
        p[0, i % 10] = 0.91
        answers.append((p, other))
    result = audit(paired_log(tmp_path, "log", answers), *around_now(), "digits")
    assert (result.verdict, result.rows, result.output_differs) == ("fail", 300, 300)
    assert result.divergences is None  # (no pair's outputs compare: none computed on them)
    assert any("primary FP32[10], shadow FP32[2,5]" in r for r in result.reasons)
    files = report_files(result)
    assert files[CHART].startswith(b"\x89PNG")
    assert b"**FAIL**" in files[REPORT]


def ticks(step: float = 1.0):
    """A clock that moves ``step`` at each look: each listing or file a read begins is one look,
    as a store taking ``step`` seconds an answer would make it."""
    from itertools import count

    seen = count()
    return lambda: next(seen) * step


def test_an_audit_of_a_slow_store_stops_at_its_time_and_names_what_it_left(tmp_path):
    """Each file's read was bounded, the audit's reads together were not: on a slow store (or an
    hour of 18,000 files) the hourly audit ran on past any bound, the rollout's past its lease.
    Its reads begin no listing nor file once ``max_seconds`` passed; what was left is counted and
    named, and the range is inconclusive, never a pass on the files read in time."""
    for k in range(6):
        shadow_log(tmp_path, 50, disagree=0.0, seed=k, versions=("1", str(k + 3)))
    log = tmp_path / "log"
    assert audit(log, *around_now(), "digits", max_seconds=1000, clock=ticks()).verdict == "pass"
    part = audit(log, *around_now(), "digits", max_seconds=4, clock=ticks())
    assert part.verdict == "inconclusive"
    assert part.out_of_time
    assert part.unread_files + part.unlisted_folders >= 1
    assert part.rows < 300
    assert "this audit's reads take at most 4 s (MAX_AUDIT_S" in part.reasons[0], part.reasons
    assert "Prediction log files not read (over the audit's time)" in report_files(part)[REPORT].decode()


def test_in_an_audit_of_all_models_one_models_computing_is_no_others_read_time(tmp_path, monkeypatch):
    """An audit of every model gave each model the time its reads had left of ``max_seconds``
    as it began: the first model's pairs, KL and vectors (minutes for a busy model) ate the next
    model's reads, left unread (inconclusive, "its reads take at most 0 s") on a store that
    answered at once. Only the reads spend the audit's time; a model left out of time names the
    audit's own bound."""
    import vision_rollout.audit as audit_module

    now = time.time()
    end = datetime.fromtimestamp(now, UTC)
    primaries = [now - 240 + 0.5 * k for k in range(200)]
    log = istio_log(tmp_path, primaries, {i: t + 0.003 for i, t in enumerate(primaries)}, mirrored=True)
    other = {"other-primary": ("primary", dict(enumerate(primaries)))}
    pods_log(tmp_path, {**other, "other-shadow": ("shadow", dict(enumerate(primaries)))}, True, model="other")
    at = [0.0]
    computing = audit_module.audit_by_versions

    def slow(*args, **kwargs):
        at[0] += 500.0  # (a busy model's pairs: minutes, no read)
        return computing(*args, **kwargs)

    monkeypatch.setattr(audit_module, "audit_by_versions", slow)
    every = audit(log, end - timedelta(minutes=5), end, max_seconds=480, clock=lambda: at[0])
    assert [(p.model, p.verdict, p.rows, p.out_of_time) for p in every.by_models] == [
        ("digits", "pass", 200, False),
        ("other", "pass", 200, False),
    ]
    looks = ticks(1.0)  # (a store taking a second an answer: the second model's reads run out)
    spent = audit(log, end - timedelta(minutes=5), end, max_seconds=3, clock=looks)
    assert spent.by_models[-1].out_of_time
    assert any("this audit's reads take at most 3 s" in r for r in spent.by_models[-1].reasons)


def test_the_earlier_hours_read_in_part_are_named_not_counted_as_whole(tmp_path):
    """``earlier_hours`` (24 hours of the log's folders, the hourly audit's look back for what
    came late) had no bound of its own: a slow store made every hourly audit run for its whole
    listing. It shares the audit's time; read in part, the count says "at least" and names what
    was left, and an hour holding nothing else is a warning, not a silent skip."""
    shadow_log(tmp_path, 20, disagree=0.0)
    log = tmp_path / "log"
    end = around_now()[1]
    later = end + timedelta(hours=1)  # an empty hour after the records, its 24 hours before holding them
    whole = audit(log, end, later, "digits", earlier_hours=24, max_seconds=1000, clock=ticks())
    assert whole.verdict in ("skip", "warning")
    assert not any("in part" in r for r in whole.reasons)
    part = audit(log, end, later, "digits", earlier_hours=24, max_seconds=6, clock=ticks())
    assert part.verdict == "warning", part.reasons
    assert any("were looked through in part" in r and "hour folders not listed" in r for r in part.reasons), (
        part.reasons
    )


def test_waiting_for_the_copies_on_a_slow_store_ends_at_the_ranges_close(tmp_path, monkeypatch):
    """``await_copies`` looked again until the range's close, but each look read the last
    stretch of the log whole, however long that took: on a slow store (here 30 s a file, 40
    files) one look ran far past the close, the rollout's audit past its lease. Each look now
    begins no file after the close; a look cut short says nothing is known, so the wait goes
    on to the close and never ends early on the files it read."""
    now = time.time()
    end = datetime.fromtimestamp(now, UTC)
    (tmp_path / "b").mkdir()
    for k in range(40):
        shadow_log(tmp_path, 2, disagree=0.0, seed=k, at=now - 5, roles=("primary",))
        shadow_log(tmp_path / "b", 2, disagree=0.0, seed=k, at=now - 5)
    store = SlowStore(now, per_file=30.0)
    monkeypatch.setattr(predictionlog, "filesystem", store.filesystem)
    waited = await_copies(tmp_path / "log", end, "digits", "1", store.clock, store.sleep)
    close = (closes(end) - end).total_seconds()
    assert waited <= close + 8 * 30  # (the files the read's 8 threads had begun by then)
    assert store.opened < 40

    # Its copies all written, but found in part before the close: waited for to the close, no less.
    store = SlowStore(now, per_file=5.0)
    monkeypatch.setattr(predictionlog, "filesystem", store.filesystem)
    assert copies_pending(tmp_path / "b" / "log", end, "digits", "1", deadline=now + 50, clock=store.clock) == end
    assert copies_pending(tmp_path / "b" / "log", end, "digits", "1") is None


def test_an_hour_folder_listed_in_part_keeps_the_audit_from_passing(tmp_path, monkeypatch):
    """A folder holding more files than a read lists (``MAX_LISTED_FILES``) is read in part:
    the audit says so and is inconclusive, never a pass on the files listed first."""
    from vision_rollout.engine import read_in_part

    for k in range(4):
        shadow_log(tmp_path, 50, disagree=0.0, seed=k, versions=("1", str(k + 3)))
    monkeypatch.setattr(predictionlog, "MAX_LISTED_FILES", 2)
    result = audit(tmp_path / "log", *around_now(), "digits")
    assert result.verdict == "inconclusive"
    assert result.crowded_folders == 1
    assert result.reasons[0].startswith("1 hour folders of this range hold more than 2 prediction log files")
    records = predictionlog.read(tmp_path / "log", *around_now(), "digits", columns=["role"])
    assert "hold more than 2 prediction log files" in (read_in_part(records) or "")


def test_copies_the_servers_own_mirror_sampled_and_never_wrote_are_counted_lost(tmp_path):
    """The audit did not read the primaries' ``mirrored``: a copy the server's own mirror made
    and never wrote (the shadow's records lost) was one of the primaries without a shadow
    record, told from none never sampled. They are counted exactly as lost and named in the
    reasons and the report, a warning: the verdict stands on the pairs compared."""
    now = time.time()
    end = datetime.fromtimestamp(now, UTC)
    primaries = [now - 60 + 0.5 * k for k in range(100)]
    copies = {i: t + 0.003 for i, t in enumerate(primaries) if i % 4 != 1}  # a quarter lost
    log = istio_log(tmp_path, primaries, copies, mirrored=True)
    result = audit(log, end - timedelta(minutes=5), end, "digits")
    assert (result.rows, result.copies_lost, result.verdict) == (75, 25, "pass")
    assert any("25 requests the server's mirror sampled have no shadow record" in r for r in result.reasons)
    assert "lost (sampled by the server's mirror, no shadow record) 25" in report_files(result)[REPORT].decode()

    (tmp_path / "whole").mkdir()
    whole = istio_log(tmp_path / "whole", primaries, {i: t + 0.003 for i, t in enumerate(primaries)}, mirrored=True)
    kept = audit(whole, end - timedelta(minutes=5), end, "digits")
    assert (kept.rows, kept.copies_lost) == (100, 0)
    assert not any("lost" in r for r in kept.reasons)


def test_a_copy_that_comes_after_its_hours_audit_is_counted_lost_once_never_late_too(tmp_path):
    """A copy the server's own mirror made, written after its hour closed: the hour's audit, run
    at the close, counted its request lost, and the next hour's counted the copy late among the
    records of earlier hours that came after their audit (``late_earlier``): one copy twice; and
    a retry or a catch-up of the hour, reading the copy, counted it late instead of lost, so the
    hour's figures changed with the time its audit ran. A copy is due by its hour's close: one
    written later is lost to that hour's audit whenever it runs, and no later audit counts it
    late too, whether it came within the next hour's read or hours before it. A copy of a
    primary itself written late (left out of its hour's audit, no copy of it lost there) is late,
    counted by the audit of the hour it came in."""
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)

    def audit_of(k: int, **kw):
        start = hour + timedelta(hours=k)
        return audit(tmp_path / "log", start, start + timedelta(hours=1), "digits", **kw)

    shadow_log(tmp_path, 100, disagree=0.0, at=(hour + timedelta(minutes=30)).timestamp(), mirrored=True)
    tail = {"versions": ("1", "3"), "seed": 1, "at": (hour + timedelta(minutes=59, seconds=30)).timestamp()}
    early = {"versions": ("1", "4"), "seed": 2, "at": (hour + timedelta(minutes=10)).timestamp()}
    later = {"versions": ("1", "5"), "seed": 3, "at": (hour + timedelta(minutes=20)).timestamp()}
    shadow_log(tmp_path, 20, disagree=0.0, mirrored=True, roles=("primary",), **tail)
    shadow_log(tmp_path, 10, disagree=0.0, mirrored=True, roles=("primary",), **early)
    shadow_log(tmp_path, 5, disagree=0.0, mirrored=True, roles=("primary",), **later)
    # (primaries written late, left out of their hour's audit, which counted no copy of theirs lost)
    both = {"versions": ("1", "6"), "seed": 4, "at": (hour + timedelta(minutes=25)).timestamp()}
    shadow_log(tmp_path, 4, disagree=0.0, mirrored=True, roles=("primary",), flushed=65 * 60, **both)
    first = audit_of(0)  # (at the close: the copies not written yet)
    assert (first.verdict, first.rows, first.copies_lost, first.late_records) == ("pass", 100, 35, 4)
    shadow_log(tmp_path, 15, disagree=0.0, roles=("shadow",), flushed=240, **tail)  # (5 never written)
    shadow_log(tmp_path, 10, disagree=0.0, roles=("shadow",), flushed=55 * 60, **early)
    shadow_log(tmp_path, 5, disagree=0.0, roles=("shadow",), flushed=2 * 3600, **later)  # (in 12:00's read)
    shadow_log(tmp_path, 4, disagree=0.0, roles=("shadow",), flushed=2 * 3600, **both)  # (late, not lost)
    again = audit_of(0)  # (a retry, a catch-up: the same figures)
    assert (again.verdict, again.rows, again.copies_lost, again.late_records) == ("pass", 100, 35, 8)  # (and copies)
    nxt, after = audit_of(1, earlier_hours=24), audit_of(2, earlier_hours=24)
    assert (nxt.verdict, nxt.late_earlier, after.verdict, after.late_earlier) == ("warning", 4, "warning", 4)


@pytest.mark.parametrize("earlier_pod", ["a-pod", "z-pod"])
def test_a_request_id_reused_across_the_ranges_start_hides_no_lost_copy(tmp_path, earlier_pod):
    """A client re-sent request id ``K`` 30 s before the range and within it, with another image;
    the earlier primary's copy was stamped within the range. The copies written late were looked
    for over every record read, the earlier range's primaries too: where the earlier primary's
    pod was read first, its copy counted as the range's primary's (the server's mirror sampled
    it, no copy came), and the lost copy was hidden, by the pods' names alone. The copies are
    marked within the range's own records: lost, whichever pod's files come first. The copy, of
    the earlier request's input, is that request's (``copy_of``): late to the earlier range, no
    record of another input in this one (it was counted in both)."""
    from model_server.masking import KeyRing, Masker
    from model_server.predictionlog import Inference, PredictionLog

    now = time.time()
    end = datetime.fromtimestamp(now, UTC)
    start = end - timedelta(minutes=5)
    primaries = [now - 240 + 0.5 * k for k in range(200)]
    log = istio_log(tmp_path, primaries, {i: t + 0.003 for i, t in enumerate(primaries)}, mirrored=True)
    p = np.full((1, 10), 0.01, dtype=np.float32)
    p[0, 3] = 0.91
    at = start.timestamp()

    def record(stamp: float, role: str, image: bytes) -> Inference:
        return Inference(
            stamp, "digits", "1" if role == "primary" else "2", role, "route" if role == "primary" else "mirror",
            "K", "0" * 32, "0" * 16, 3.0, "ok", p, np.array([image], dtype=object), True, {},
            mirrored=True if role == "primary" else None,
        )  # fmt: skip

    for replica, rec in [
        (earlier_pod, record(at - 30, "primary", b"earlier")),
        ("m-pod", record(at + 20, "primary", b"again")),
        ("m-shadow", record(at + 10, "shadow", b"earlier")),
    ]:
        writer = PredictionLog(log, Masker(KeyRing(tmp_path / "keys.json")), replica=replica)
        writer.append(rec)
        writer.flush()
    result = audit(log, start, end, "digits")
    assert (result.verdict, result.rows, result.input_mismatch, result.copies_lost) == ("pass", 200, 0, 1)
    assert audit(log, start - timedelta(minutes=5), start, "digits").late_records == 1


def healthy_log(folder: Path, now: float, mirrored: bool | None, active: tuple[str, ...] = ("digits",)) -> Path:
    """A prediction log of healthy traffic up to ``now``, all written then: each ``active``
    model's two baseline pods at 5 requests a second, their copies (each behind the server's own
    mirror, ``mirrored`` true; one in ten behind Istio's) on three candidate pods, one with its
    clock 20 s ahead, each copy stamped up to 4 s after its primary (waiting for idle time); the
    copies of the last 3 s still in flight. Model ``other`` went idle 6 minutes before ``now``;
    model ``plain``, mirrored by nothing, has primaries alone (saying their server's mirror did
    not sample them; behind Istio, nothing); model ``sparse``, a request every 9 s, had none of
    them sampled (by chance: 0.9 ** 20 behind Istio's 10%)."""
    primaries = {i: now - 330 + 0.2 * i for i in range(1650)}
    copied = [i for i in primaries if (mirrored or i % 10 == 3) and primaries[i] < now - 3]
    lead = {0: 0.0, 1: 0.0, 2: 20.0}
    for model in active:
        pods: dict[str, tuple[str, dict[int, float]]] = {
            f"{model}-primary-a": ("primary", {i: t for i, t in primaries.items() if i % 2 == 0}),
            f"{model}-primary-b": ("primary", {i: t for i, t in primaries.items() if i % 2}),
        }
        for k in range(3):
            copies = {i: primaries[i] + lead[k] + (i % 41) / 10 for i in copied if i % 3 == k}
            pods[f"{model}-shadow-{k}"] = ("shadow", copies)
        pods_log(folder, pods, mirrored, model=model)
    idle = {i: now - 600 + float(i) for i in range(200)}
    shadow = {i: t + 0.003 for i, t in idle.items() if mirrored or i % 10 == 3}
    pods_log(folder, {"other-primary": ("primary", idle), "other-shadow": ("shadow", shadow)}, mirrored, model="other")
    pods_log(folder, {"plain-primary": ("primary", primaries)}, False if mirrored else None, model="plain")
    sparse = {i: t for i, t in primaries.items() if i % 45 == 0}  # (one in 9 s: none sampled, by chance)
    pods_log(folder, {"sparse-primary": ("primary", sparse)}, False if mirrored else None, model="sparse")
    return folder / "log"


@pytest.mark.parametrize(("mirrored", "share"), [(True, None), (True, 100), (None, 10)])
def test_healthy_traffic_of_several_pods_audits_clean(tmp_path, mirrored, share):
    """Healthy traffic, behind the server's own mirror or Istio's: copies written up to 90 s after
    their primaries (within the flush bounds), on three candidate pods, one's clock ahead, another
    model idle, one mirrored by nothing. No copy lost, none late, no stopped mirror, no shortfall:
    a pass, the idle model and the one mirrored by nothing skipped; in an audit of every model
    too (each model apart), which names them. Behind Istio, a model's primaries cannot say that
    nothing mirrors them: a share given for every model asserts a mirror on each with traffic,
    and one with none is warned of (``rolloutctl audit --mirror-percent`` without ``--model``)
    where its sampling does not explain it: a model of a few requests, none sampled, is not."""
    from vision_rollout.audit import with_coverage

    now = time.time()
    log = healthy_log(tmp_path, now, mirrored, ("digits", "second"))
    end = datetime.fromtimestamp(now - 90, UTC)
    start = end - timedelta(minutes=3)
    one = audit(log, start, end, "digits", mirror_percent=share)
    every = audit(log, start, end, None, mirror_percent=share if mirrored else None)
    assert [p.model for p in every.by_models] == ["digits", "second"]
    assert "models other, plain, sparse: SKIP: no shadow records in this range" in every.reasons
    for result in (one, every):
        assert (result.verdict, result.copies_lost, result.late_records, result.mirror_stopped) == ("pass", 0, 0, None)
    for part in (one, *every.by_models):
        assert (part.rows, part.primary_without_shadow) == ((900, 0) if mirrored else (90, 810))
        assert part.copies_p is None or part.copies_p > COPIES_ALPHA
    idle = audit(log, start, end, "other", mirror_percent=share)
    assert (idle.verdict, idle.copies_lost, idle.mirror_stopped, idle.primaries_mirrorable) == ("skip", 0, None, 0)
    plain = audit(log, start, end, "plain", mirror_percent=share)
    assert (plain.verdict, plain.copies_lost, plain.mirror_stopped) == ("skip", 0, None)
    assert plain.primaries_mirrorable == (0 if mirrored else 900)
    if not mirrored:
        asserted = with_coverage(audit(log, start, end, None, mirror_percent=share), share)
        assert [(p.model, p.verdict) for p in asserted.by_models] == [
            ("digits", "pass"),
            ("plain", "warning"),
            ("second", "pass"),
        ]
        assert "models other, sparse: SKIP: no shadow records in this range" in asserted.reasons


def test_shadow_records_of_another_input_hide_no_lost_copy(tmp_path):
    """A shadow record of another input under a primary's request id is no copy of it (the
    pairs leave it out, ``input_mismatch``), but the copy count took it for one: the quarter of
    copies lost was hidden behind forged records, by the server's mirror (``copies_lost`` 0) and
    behind Istio's (the copies received counted them, no shortfall named)."""
    now = time.time()
    end = datetime.fromtimestamp(now, UTC)
    primaries = [now - 60 + 0.5 * k for k in range(100)]
    copies = {i: t + 0.003 for i, t in enumerate(primaries) if i % 4 != 1}
    forged = {i: t + 0.002 for i, t in enumerate(primaries) if i % 4 == 1}
    own = audit(istio_log(tmp_path, primaries, copies, mirrored=True, forged=forged), end - timedelta(minutes=5), end)
    assert (own.rows, own.input_mismatch, own.copies_lost) == (75, 25, 25)
    assert any("25 requests the server's mirror sampled have no shadow record" in r for r in own.reasons)
    (tmp_path / "istio").mkdir()
    behind = audit(
        istio_log(tmp_path / "istio", primaries, copies, forged=forged),
        end - timedelta(minutes=5),
        end,
        mirror_percent=100,
    )
    assert behind.input_mismatch == 25
    assert behind.copies_received == behind.copies_eligible - sum(
        1 for i in range(1, behind.copies_eligible + 1) if i % 4 == 1
    )
    assert behind.copies_p is not None
    assert behind.copies_p < COPIES_ALPHA


def test_behind_istio_a_mirror_that_stopped_sending_is_told_from_one_gone_quiet(tmp_path):
    """Behind Istio's mirror (the primaries cannot say whether they were copied) the copies
    stopped halfway while the primaries went on: the shadow's watermark stopped at its last
    copy, the primaries after it were never tested, and the audit passed on the first half as
    if the mirror had gone quiet. A stop is told from quiet by the primaries after the last
    copy, at the configured share: the audit is inconclusive, naming when the copies stopped;
    a mirror whose traffic stopped with it (quiet) passes as before, and so does a rollout's
    range whose mirror was taken off at a time not known (``mirror_on_to_end`` false)."""
    now = time.time()
    end = datetime.fromtimestamp(now, UTC)
    primaries = [now - 240 + 0.2 * k for k in range(1200)]
    halfway = now - 120
    copies = {i: t + 0.003 for i, t in enumerate(primaries) if i % 2 == 0 and t < halfway}
    log = istio_log(tmp_path, primaries, copies)
    stopped = audit(log, end - timedelta(minutes=5), end, mirror_percent=50)
    last = datetime.fromtimestamp(max(copies.values()), UTC)
    assert stopped.verdict == "inconclusive"
    assert stopped.mirror_stopped is not None
    assert abs(datetime.fromisoformat(stopped.mirror_stopped) - last) < timedelta(milliseconds=1)  # (as stored)
    assert stopped.reasons[0].startswith(
        f"the mirror stopped sending: its last copy was stamped {stopped.mirror_stopped}"
    )
    assert "nothing is shown of them" in report_files(stopped)[REPORT].decode()
    shares = [(t, 50.0) for t in np.arange(now - 300, now + 60, 60.0)]
    by_time = audit(log, end - timedelta(minutes=5), end, mirror_percent=shares)
    assert by_time.mirror_stopped == stopped.mirror_stopped  # (the hourly audit's shares over time)

    (tmp_path / "quiet").mkdir()
    quiet_log = istio_log(tmp_path / "quiet", [t for t in primaries if t < halfway], copies)
    quiet = audit(quiet_log, end - timedelta(minutes=5), end, mirror_percent=50)
    assert (quiet.verdict, quiet.mirror_stopped) == ("pass", None)
    assert not any("stopped" in r for r in quiet.reasons)
    (tmp_path / "off").mkdir()
    off_log = istio_log(tmp_path / "off", primaries, copies)
    taken_off = audit(off_log, end - timedelta(minutes=5), end, mirror_percent=50, mirror_on_to_end=False)
    assert (taken_off.verdict, taken_off.mirror_stopped) == ("pass", None)


@pytest.mark.parametrize("mirrored", [True, None])
def test_an_audit_of_all_models_judges_each_model_as_its_own_audit_would(tmp_path, mirrored):
    """An audit of every model (``rolloutctl audit`` without ``--model``) pooled them: the copies
    of one model hid another's stopped mirror (behind the server's own, no copy at all: counted
    lost beside the other's pairs; behind Istio's, stopped halfway: the other model's last copy
    taken for its), and the audit passed where the model's own audit was inconclusive. Each model
    is audited apart, as its own audit; the verdict is the worst of them."""
    now = time.time()
    end = datetime.fromtimestamp(now, UTC)
    primaries = [now - 240 + 0.2 * k for k in range(1200)]
    copies = {} if mirrored else {i: t + 0.003 for i, t in enumerate(primaries) if i % 2 == 0 and t < now - 120}
    log = istio_log(tmp_path, primaries, copies, mirrored=mirrored)
    other = {i: t + 0.003 for i, t in enumerate(primaries) if mirrored or i % 2 == 0}
    pods = {"other-primary": ("primary", dict(enumerate(primaries))), "other-shadow": ("shadow", other)}
    pods_log(tmp_path, pods, mirrored, model="other")
    start = end - timedelta(minutes=5)
    own = [audit(log, start, end, model, mirror_percent=50) for model in ("digits", "other")]
    every = audit(log, start, end, mirror_percent=50)
    assert [r.verdict for r in own] == ["inconclusive", "pass"]
    assert every.verdict == "inconclusive"
    assert [(p.model, p.verdict, p.reasons, p.rows, p.copies_lost, p.mirror_stopped) for p in every.by_models] == [
        (r.model, r.verdict, r.reasons, r.rows, r.copies_lost, r.mirror_stopped) for r in own
    ]
    assert every.reasons[0].startswith("model digits: INCONCLUSIVE: ")
    assert "## Model digits: INCONCLUSIVE" in report_files(every)[REPORT].decode()


def test_behind_istio_a_model_with_traffic_and_no_copy_is_named_in_an_audit_of_all_models(tmp_path):
    """Behind Istio's mirror of 50%, model ``other``'s primaries went on with no copy at all (its
    mirror stopped before the range): its own audit with the share is a WARNING, but an audit of
    every model left it out as a skip (no shadow record), the report titled after the one model
    with pairs, and ``rolloutctl audit --mirror-percent 50`` passed. Each model with primaries a
    mirror could have sampled and no shadow record is a WARNING there too, as its own audit; an
    idle model stays a skip, named; the report is of all models."""
    from vision_rollout.audit import with_coverage

    now = time.time()
    end = datetime.fromtimestamp(now, UTC)
    start = end - timedelta(minutes=5)
    primaries = [now - 240 + 0.25 * k for k in range(960)]
    log = istio_log(tmp_path, primaries, {i: t + 0.003 for i, t in enumerate(primaries) if i % 2 == 0})
    pods_log(tmp_path, {"other-primary": ("primary", dict(enumerate(primaries)))}, model="other")
    idle = {i: now - 3000 + float(i) for i in range(20)}
    shadow = {i: t + 0.003 for i, t in idle.items()}
    pods_log(tmp_path, {"idle-primary": ("primary", idle), "idle-shadow": ("shadow", shadow)}, model="idle")
    own = with_coverage(audit(log, start, end, "other", mirror_percent=50), 50)
    assert own.verdict == "warning"
    every = with_coverage(audit(log, start, end, mirror_percent=50), 50)
    assert (every.model, every.verdict) == (None, "warning")
    assert [(p.model, p.verdict) for p in every.by_models] == [("digits", "pass"), ("other", "warning")]
    assert every.by_models[1].reasons == own.reasons
    assert "model idle: SKIP: no shadow records in this range" in every.reasons
    report = report_files(every)[REPORT].decode()
    assert report.startswith("# Shadow audit: all models")
    assert "## Model other: WARNING" in report
    quiet = audit(log, start, end)  # (no mirror asserted: a model without copies may have none)
    assert (quiet.model, quiet.verdict, [p.model for p in quiet.by_models]) == (None, "pass", ["digits"])
    assert "models idle, other: SKIP: no shadow records in this range" in quiet.reasons
    assert report_files(quiet)[REPORT].decode().startswith("# Shadow audit: all models")


def test_copies_are_tested_against_the_mirror_share_of_their_time(tmp_path):
    """The hourly audit tested the copies against the hour's largest mirror share: a mirror of 10%
    raised to 100% within the hour was warned of as copies lost (110 copies of 200 primaries
    "behind a mirror of 100%"). Given the share's samples over time, each primary is tested at
    the share of its time (the lower of the samples either side of it); a shortfall of the 100%
    half is still named, and primaries of no sample's time are not tested."""
    now = time.time()
    end = datetime.fromtimestamp(now, UTC)
    primaries = [now - 250 + k for k in range(200)]
    raised = now - 150  # the mirror goes from 10% to 100% here
    shares = [(t, 10.0 if t < raised else 100.0) for t in np.arange(now - 300, now, 15.0)]
    copies = {i: t + 0.003 for i, t in enumerate(primaries) if t >= raised or i % 10 == 3}
    log = istio_log(tmp_path, primaries, copies)
    by_max = audit(log, end - timedelta(minutes=5), end, "digits", mirror_percent=100)
    assert by_max.copies_p is not None
    assert by_max.copies_p < COPIES_ALPHA  # (what the largest share says)
    result = audit(log, end - timedelta(minutes=5), end, "digits", mirror_percent=shares)
    assert result.copies_eligible == by_max.copies_eligible
    assert result.copies_received == by_max.copies_received
    assert result.copies_p is not None
    assert result.copies_p > COPIES_ALPHA
    assert not any("copies of" in r for r in result.reasons)

    (tmp_path / "short").mkdir()
    half = {i: t for i, t in copies.items() if primaries[i] < raised or i % 2 == 0}
    short = audit(
        istio_log(tmp_path / "short", primaries, half), end - timedelta(minutes=5), end, mirror_percent=shares
    )
    assert short.copies_p is not None
    assert short.copies_p < COPIES_ALPHA
    assert any("copies of" in r for r in short.reasons)

    unknown = audit(log, end - timedelta(minutes=5), end, "digits", mirror_percent=[(now - 400, 10.0)])
    assert unknown.copies_eligible == 0  # (no sample within a step of any primary)
    assert unknown.copies_p is None


def test_a_shadow_record_of_another_input_is_not_waited_for_as_the_copy(tmp_path):
    """``copies_pending`` took any shadow record under a primary's request id for its copy: a
    record of another input (anyone reaching the data port can send one) ended the rollout's wait
    for the real copy, and the audit then ran without it. The primary is still waited for."""
    now = time.time()
    end = datetime.fromtimestamp(now, UTC)
    primaries = [now - 30 + 0.5 * k for k in range(40)]
    forged = {i: t + 0.002 for i, t in enumerate(primaries) if i >= 30}
    copies = {i: t + 0.003 for i, t in enumerate(primaries) if i < 30}
    log = istio_log(tmp_path, primaries, copies, mirrored=True, forged=forged)
    pending = copies_pending(log, end, "digits", "1")
    assert pending is not None
    assert pending.timestamp() == pytest.approx(primaries[-1], abs=1e-3)


def sampled_records(rng: np.random.Generator, n: int, percent: float, loss: float = 0.0) -> pd.DataFrame:
    """The records a prediction log holds behind Istio: ``n`` primaries of version 1 a second
    apart saying nothing of the mirror, each copied with chance ``percent``, the copy then lost
    with chance ``loss``; a copy stamped 3 ms after its primary on the shadow's pod."""
    at = pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(np.arange(n), unit="s")
    copied = rng.random(n) < percent / 100 * (1 - loss)
    ids = np.array([f"r{i}" for i in range(n)], dtype=object)
    primary = pd.DataFrame(
        {"time": at, "request_id": ids, "role": "primary", "version": "1", "replica": "b", "mirrored": None}
    )
    shadow = pd.DataFrame(
        {
            "time": at[copied] + pd.Timedelta(milliseconds=3),
            "request_id": ids[copied],
            "role": "shadow",
            "version": "2",
            "replica": "c",
            "mirrored": None,
        }
    )
    return pd.concat([primary, shadow], ignore_index=True).assign(
        model="digits", item=0, route="route", latency_ms=3.0, mirrored=lambda d: d["mirrored"].astype(object)
    )


def test_the_copies_test_warns_of_a_whole_mirror_at_most_at_its_level_by_simulation():
    """The one-sided binomial test of the copies behind a sampling mirror, judged as it runs
    (``copy_check`` over the records, then ``copies_short``): a shadow sent every copy the
    configured share makes is warned of in at most ``COPIES_ALPHA`` of the audits (an exact
    tail of a discrete test: fewer), the stretch it counts (from the first copy to the
    watermark) no bias; one losing half of its copies nearly always."""
    rng = np.random.default_rng(7)
    warned = runs = 0
    for percent in (10.0, 50.0):
        for _ in range(150):
            _, eligible, received = copy_check(sampled_records(rng, 300, percent), ["1"])
            warned += copies_short(received, eligible, percent) < COPIES_ALPHA
            runs += 1
    assert warned <= 2  # (0.3 expected at the level; 3 or more: a chance under 4e-3)
    for n, percent in ((40, 25.0), (300, 10.0), (5000, 50.0)):  # the test's level alone, exactly
        counts = np.arange(n + 1)
        flagged = np.array([copies_short(int(k), n, percent) < COPIES_ALPHA for k in counts])
        assert 0 < binom.pmf(counts[flagged], n, percent / 100).sum() <= COPIES_ALPHA
    caught = 0
    for _ in range(100):
        _, eligible, received = copy_check(sampled_records(rng, 300, 25.0, loss=0.5), ["1"])
        caught += copies_short(received, eligible, 25.0) < COPIES_ALPHA
    assert caught >= 90


def _written_late_to_their_audits(tmp_path) -> datetime:
    """Shadow logs of 200 requests three hours before the audited hour (returned), three of them
    (versions 3 to 5 beside 1), written within that hour: late to their audits."""
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    for k in range(3):
        shadow_log(
            tmp_path,
            200,
            disagree=0.0,
            seed=k,
            versions=("1", str(k + 3)),
            at=(hour - timedelta(hours=3)).timestamp(),
            flushed=3 * 3600 + 600,
        )
    return hour


def test_the_earlier_hours_read_is_held_to_the_audits_memory_bound(tmp_path):
    """The hourly audit counts the records of the 24 hours before its range that came after
    their audit (``late_earlier``); that read held every file it listed whatever ``max_bytes``
    said (only its time was bounded): a store holding gigabytes of files whose names say they
    were written late (a writer flushing a long backlog, or anyone who can write the log) took
    them all into the worker's memory beside the range's own 4 GiB. It is held to the bound:
    what does not fit is left unread, and the count says "at least"."""
    hour = _written_late_to_their_audits(tmp_path)
    whole = audit(tmp_path / "log", hour, hour + timedelta(hours=1), "digits", earlier_hours=24)
    assert (whole.verdict, whole.late_earlier) == ("warning", 1200)
    part = audit(
        tmp_path / "log", hour, hour + timedelta(hours=1), "digits", earlier_hours=24, max_bytes=1, max_seconds=None
    )
    assert part.verdict == "warning"
    assert part.late_earlier == 0
    assert any(
        r.startswith(
            "the 24 hours before this range were looked through in part (3 files not read, 0 hour folders not listed over this audit's 1 bytes of records)"
        )
        and r.endswith("at least 0 of their records came after their audit closed")
        for r in part.reasons
    ), part.reasons


@pytest.mark.parametrize("how", ["truncated", "named ahead"])
def test_files_the_earlier_hours_read_could_not_read_are_counted_and_named(tmp_path, how):
    """The hourly audit's look through the 24 hours before its range (``late_earlier``) skipped
    the files it could not read (truncated, a refused name) without a word: their records left
    out of the count of what came late, which still read as whole. They are counted
    (``earlier_skipped_files``) and named, as its own range's are, and the count says "at least"."""
    hour = _written_late_to_their_audits(tmp_path)
    spoilt = sorted((tmp_path / "log").rglob("part-*.parquet"))[0]
    if how == "truncated":
        spoilt.write_bytes(spoilt.read_bytes()[:100])
    else:
        spoilt = spoilt.rename(spoilt.with_name(re.sub(r"-\d{8}T\d{6}Z-", "-20991231T235959Z-", spoilt.name)))
    result = audit(tmp_path / "log", hour, hour + timedelta(hours=1), "digits", earlier_hours=24)
    assert (result.verdict, result.late_earlier, result.skipped_files) == ("warning", 800, 0), result.reasons
    assert result.earlier_skipped_files == 1
    (said,) = [r for r in result.reasons if "could not be read" in r]
    assert said.startswith("1 prediction log files of the 24 hours before this range could not be read")
    assert spoilt.name in said
    assert said.endswith("at least 800 of their records came after their audit closed")
    report = report_files(result)[REPORT].decode()
    assert "Prediction log files of earlier ranges that could not be read (their records not counted): 1" in report


def test_a_file_of_this_range_it_could_not_read_is_not_named_an_earlier_hour_s(tmp_path):
    """The look back on the earlier hours reads the log again about each late copy (its primary
    and its copies on time): a truncated file of the range itself, there, was counted twice, as
    this range's (``skipped_files``) and again as "of the 24 hours before this range"."""
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    # (the hour before: its copies written late, within this range, stamped a minute before it)
    before = (hour - timedelta(seconds=60)).timestamp()
    shadow_log(tmp_path, 50, disagree=0.0, seed=1, versions=("1", "3"), at=before, flushed=600)
    for seed, minute, count in ((2, 20, 300), (3, 30, 30)):
        at = (hour + timedelta(minutes=minute)).timestamp()
        shadow_log(tmp_path, count, disagree=0.0, seed=seed, versions=("1", str(seed + 2)), at=at, flushed=1)
    (spoilt,) = [f for f in (tmp_path / "log").rglob("hour=10/part-*.parquet") if "T1030" in f.name]
    spoilt.write_bytes(spoilt.read_bytes()[:100])
    result = audit(tmp_path / "log", hour, hour + timedelta(hours=1), "digits", earlier_hours=24)
    assert result.skipped_files == 1
    assert result.earlier_skipped_files == 0, result.reasons
    assert not [r for r in result.reasons if "hours before this range could not be read" in r], result.reasons


def test_records_without_an_outcome_are_malformed_not_disagreements(tmp_path):
    """No writer of the log writes a record without an ``outcome`` (an inference's, a label's
    "ok"); a foreign or damaged file's shadow records without one were read as answers of no
    top-1: an hour of agreeing pairs failed at 0% agreement, and a primary without one was a
    failed request. They are malformed, as records without a request id are: counted, and the
    range inconclusive."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    log = shadow_log(tmp_path, 200, disagree=0.0)
    (path,) = log.rglob("part-*.parquet")
    table = pq.read_table(path)
    shadow = pc.equal(table["role"], "shadow")
    outcome = pc.if_else(shadow, pa.scalar(None, pa.string()), table["outcome"])
    pq.write_table(table.set_column(table.schema.get_field_index("outcome"), "outcome", outcome), path)
    result = audit(log, *around_now(), "digits")
    assert (result.verdict, result.rows, result.malformed_records) == ("inconclusive", 0, 200), result.reasons
    assert result.reasons[0].startswith("200 prediction log records in the files of this range were malformed")


def test_a_retry_dates_a_stopped_mirror_as_the_first_audit_did(tmp_path):
    """Behind Istio's mirror, copies stopped halfway; some copies of the requests after that came
    in a file written after the range closed. The audit at the close dated the stop at the last
    copy it read; a retry, reading the late file too, dated it at the late copies' last (``since``
    was the last copy of every record read, the late ones too): one stop, two times. The stop is
    dated by the copies written by the range's close, the late ones left out as from the pairs."""
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    at = (hour + timedelta(minutes=50)).timestamp()
    primaries = [at + 0.2 * k for k in range(1200)]
    halfway = at + 120
    copies = {i: t + 0.003 for i, t in enumerate(primaries) if i % 2 == 0 and t < halfway}
    on_time = (hour + timedelta(minutes=55)).timestamp()
    pods_log(tmp_path, {"primary-pod": ("primary", dict(enumerate(primaries))), "shadow-pod": ("shadow", copies)},
             written=on_time)  # fmt: skip
    first = audit(tmp_path / "log", hour, hour + timedelta(hours=1), "digits", mirror_percent=50)
    last = datetime.fromtimestamp(max(copies.values()), UTC)
    assert first.mirror_stopped is not None
    assert abs(datetime.fromisoformat(first.mirror_stopped) - last) < timedelta(milliseconds=1)
    late = {i: t + 0.003 for i, t in enumerate(primaries) if i % 2 == 0 and halfway <= t < halfway + 60}
    pods_log(tmp_path, {"late-shadow": ("shadow", late)}, written=(hour + timedelta(minutes=70)).timestamp())
    again = audit(tmp_path / "log", hour, hour + timedelta(hours=1), "digits", mirror_percent=50)
    assert again.late_records == len(late)
    assert (again.verdict, again.mirror_stopped) == (first.verdict, first.mirror_stopped)


def read_spy(monkeypatch: pytest.MonkeyPatch, *named: str) -> list[tuple]:
    """Each ``predictionlog.read`` from now on, as it is called: its start, its end and the
    keyword arguments ``named`` (None where not given), in a list; the read itself is made."""
    reads: list[tuple] = []
    real = predictionlog.read

    def spy(uri, start, end, *args, **kwargs):
        reads.append((start, end, *(kwargs.get(name) for name in named)))
        return real(uri, start, end, *args, **kwargs)

    monkeypatch.setattr(predictionlog, "read", spy)
    return reads


def test_the_primaries_of_copies_that_came_late_are_read_again_around_each_copy_only(tmp_path, monkeypatch):
    """The hourly audit reads again the primaries of the copies that came late to earlier hours
    (those their audit counted lost are no late record): it read the whole stretch from the
    earliest such copy to the latest, whatever lay between, each with a budget of its own, so
    two stray copies hours apart made every hourly audit read a day of the log again. It reads
    a copy's stretch (``copy_due`` either side) only."""
    hour = datetime(2026, 3, 2, 10, tzinfo=UTC)
    for k in range(1, 24):  # (the hours before it, each written on time)
        at = (hour - timedelta(hours=k)).timestamp() + 60
        pods_log(tmp_path, {f"p{k}": ("primary", {i: at + 3 * i for i in range(20)})}, True, written=at + 3000)
    stray = {100: (hour - timedelta(hours=22, minutes=50)).timestamp(), 101: (hour - timedelta(minutes=90)).timestamp()}
    pods_log(tmp_path, {"backlog": ("shadow", stray)}, written=hour.timestamp() + 600)
    reads = read_spy(monkeypatch, "written_after")
    result = audit(tmp_path / "log", hour, hour + timedelta(hours=1), "digits", earlier_hours=24)
    assert result.late_earlier == 2
    again = [(s, e) for s, e, after in reads[1:] if after is None]
    assert again
    assert all(e - s <= 2 * copy_due() + timedelta(seconds=1) for s, e in again), again


def test_a_copy_whose_primary_was_left_unread_makes_the_late_count_say_at_least(tmp_path):
    """Read again in part (its budget spent), the primaries of the copies that came late left
    such a copy counted late although its hour's audit counted it lost, and nothing said the
    read was partial. What the read again left is named as the earlier hours' read's is."""
    hour = datetime(2026, 3, 2, 10, tzinfo=UTC)
    h5 = (hour - timedelta(hours=5)).timestamp()
    pods_log(tmp_path, {"busy": ("primary", {i: h5 + 60 + i for i in range(1, 3000)})}, True, written=h5 + 3600)
    pods_log(tmp_path, {"primary-pod": ("primary", {0: h5 + 1000})}, True, written=h5 + 1001)
    pods_log(tmp_path, {"shadow-pod": ("shadow", {0: h5 + 1000.003})}, written=hour.timestamp() + 600)
    result = audit(tmp_path / "log", hour, hour + timedelta(hours=1), "digits", earlier_hours=24, max_bytes=100_000)
    assert result.verdict == "warning"
    assert any("looked through in part" in r and "at least" in r for r in result.reasons), result.reasons


@pytest.mark.parametrize("skew", [2.0, 40.0])
def test_a_copy_late_past_its_hour_stamped_in_its_last_minute_is_counted_lost_never_late_too(tmp_path, skew):
    """A copy stamped in the last minute of its hour, written after the hour closed, of a primary
    stamped over a minute before the hour's end: the hour's audit counted it lost, and the next
    hour's, reading it in its margin without its primary, counted it late too. Its primary is
    read again as those of the copies before the margin are: lost once, never late."""
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    at = (hour + timedelta(minutes=58, seconds=59)).timestamp()
    pods_log(tmp_path, {"primary-pod": ("primary", {0: at})}, True, written=at + 1)
    pods_log(tmp_path, {"shadow-pod": ("shadow", {0: at + skew})}, written=at + 1860)
    first, nxt = (
        audit(tmp_path / "log", start, start + timedelta(hours=1), "digits", earlier_hours=24)
        for start in (hour, hour + timedelta(hours=1))
    )
    assert (first.copies_lost, nxt.late_earlier) == (1, 0), nxt.reasons


def test_a_copy_a_day_late_whose_primary_is_past_the_look_back_is_counted_lost_never_late_too(tmp_path):
    """A copy about a day late, stamped just within the 24 hours the hourly audit looks back,
    its primary just before them: its hour's audit counted it lost, and the audit it came in read
    its primary's stretch again only from the 24 hours' start, missed the primary and counted
    the copy late too. The stretch is read whole; only the copies counted are the 24 hours'."""
    day = datetime(2026, 3, 1, tzinfo=UTC)
    at = (day + timedelta(hours=10)).timestamp() - 2  # (09:59:58, the 09:00 hour's)
    pods_log(tmp_path, {"primary-pod": ("primary", {0: at})}, True, written=at + 1)
    pods_log(tmp_path, {"shadow-pod": ("shadow", {0: at + 4})}, written=at + 2 + 24.5 * 3600)
    start = day + timedelta(hours=9)
    hour = audit(tmp_path / "log", start, start + timedelta(hours=1), "digits")
    start = day + timedelta(hours=34)
    came = audit(tmp_path / "log", start, start + timedelta(hours=1), "digits", earlier_hours=24)
    assert (hour.copies_lost, came.late_earlier) == (1, 0), came.reasons


def test_a_retry_tests_the_copies_as_the_audit_at_the_close_did(tmp_path):
    """Behind Istio, a shadow pod's copies of an hour's last minutes written in one flush that
    came after the hour closed: the audit's copies test stood on the shadow's watermark of every
    record read, the late copies too, so a retry tested hundreds more primaries than the audit at
    the close (its figures changed with the time it ran). The watermark is the on-time copies'."""
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    at = (hour + timedelta(minutes=50)).timestamp()
    primaries = {i: at + 0.2 * i for i in range(2000)}
    pods_log(tmp_path, {"primary-pod": ("primary", primaries)}, written=at + 420)
    even = {i: t + 0.003 for i, t in primaries.items() if i % 2 == 0}
    pods_log(tmp_path, {"shadow-pod": ("shadow", {i: t for i, t in even.items() if t < at + 240})}, written=at + 300)

    def copies_test():
        result = audit(tmp_path / "log", hour, hour + timedelta(hours=1), "digits", mirror_percent=50)
        return result.copies_eligible, result.copies_received, result.copies_p

    first = copies_test()
    pods_log(tmp_path, {"shadow-pod": ("shadow", {i: t for i, t in even.items() if t >= at + 240})}, written=at + 1320)
    assert copies_test() == first


@pytest.mark.parametrize("late_pod", ["a-pod", "z-pod"])
def test_a_request_re_sent_in_a_file_written_late_leaves_its_lost_copy_lost_whatever_the_pods_name(tmp_path, late_pod):
    """A client re-sent a request whose primary was written on time; the repeat's primary and
    the first one's copy were written after the hour closed. Which primary was the request's
    went by the order the files were read: the late repeat's pod named before the first's, the
    copy was taken as the repeat's, late, not lost. The request's primary is its earliest written
    on time: the copy is lost, the repeat late, whichever pod wrote it."""
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    at = (hour + timedelta(minutes=40)).timestamp()
    pods_log(tmp_path, {"m-pod": ("primary", {0: at})}, True, written=at + 1)
    closed = (hour + timedelta(minutes=70)).timestamp()
    pods_log(
        tmp_path, {late_pod: ("primary", {0: at + 10}), "shadow-pod": ("shadow", {0: at + 0.003})}, True, written=closed
    )
    retry = audit(tmp_path / "log", hour, hour + timedelta(hours=1), "digits")
    start = hour + timedelta(hours=1)
    nxt = audit(tmp_path / "log", start, start + timedelta(hours=1), "digits", earlier_hours=24)
    assert (retry.copies_lost, retry.late_records, nxt.late_earlier) == (1, 1, 1)


def test_primaries_in_a_file_named_without_its_written_second_leave_late_copies_lost(tmp_path):
    """Primaries in a file whose name gives no written second (an older writer's) are on time
    to the audit (``_late``), but ``lost_late`` took them as written neither on time nor late:
    their copies written after the hour closed counted late, not lost, where the same records
    under a timed name counted lost. Whatever is not written late is on time, in both."""
    hour = datetime(2026, 3, 2, 10, tzinfo=UTC)
    at = hour.timestamp() + 100
    pods_log(tmp_path, {"primary-pod": ("primary", {i: at + i for i in range(5)})}, True, written=at + 100)
    for f in (tmp_path / "log").rglob("part-primary-pod-*.parquet"):
        f.rename(f.with_name("part-primary-pod-old.parquet"))
    copies = {i: at + i + 0.003 for i in range(5)}
    pods_log(tmp_path, {"shadow-pod": ("shadow", copies)}, written=hour.timestamp() + 3600 + 900)
    result = audit(tmp_path / "log", hour, hour + timedelta(hours=1), "digits")
    assert (result.copies_lost, result.late_records) == (5, 0)


def test_an_hour_without_copies_is_tested_at_the_share_in_force_at_each_primarys_time(tmp_path):
    """The hourly step tested an hour without shadow records at its largest share: a 1% mirror
    raised at 10:55 over an hour of 3000 requests was taken as 3000 requests behind 1% (no copy:
    p 1e-13) and warned of, though some 250 came behind it (no copy: p 0.08). Each primary is
    tested at its time's share."""
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    at = hour.timestamp() + 60
    pods_log(tmp_path, {"primary-pod": ("primary", {i: at + 3500 * i / 3000 for i in range(3000)})}, written=at + 3530)
    shares = [(hour.timestamp() + 60.0 * k, 0.0 if k < 55 else 1.0) for k in range(61)]
    result = audit(tmp_path / "log", hour, hour + timedelta(hours=1), "digits", mirror_percent=shares)
    assert with_coverage(result, max(p for _, p in shares)).verdict == "skip"
    shares = [(t, 1.0) for t, _ in shares]
    result = audit(tmp_path / "log", hour, hour + timedelta(hours=1), "digits", mirror_percent=shares)
    assert with_coverage(result, 1.0).verdict == "warning"


def test_a_copy_is_attributed_alike_whether_its_primary_written_late_has_come_or_not(tmp_path):
    """A copy stamped by a clock behind, just before the hour, of a primary stamped within it and
    written after the hour closed: the audit at the close (the primary not written yet) counted
    the copy among the earlier hours' late records; a retry, reading the primary, took the copy
    as the hour's, a shadow record without its primary. A primary written after its range closed
    claims no copy: the copy goes by its stamp, in every run."""
    hour = datetime(2026, 3, 1, 22, tzinfo=UTC)
    at = hour.timestamp() + 10
    pods_log(tmp_path, {"shadow-pod": ("shadow", {0: at - 12})}, written=hour.timestamp() + 1800)

    def counts():
        result = audit(tmp_path / "log", hour, hour + timedelta(hours=1), "digits", earlier_hours=24)
        return result.late_earlier, result.shadow_without_primary

    first = counts()
    pods_log(tmp_path, {"primary-pod": ("primary", {0: at})}, True, written=hour.timestamp() + 5400)
    assert counts() == first == (1, 0)


def test_a_copy_stamped_over_the_margin_before_its_primary_across_the_hour_is_counted_not_lost(tmp_path):
    """A copy a pod's clock stamped more than ``CLOCK_SKEW_S`` before its primary, the copy just
    before the hour and the primary within it: the hour before read the pair and left it to the
    next hour (its primary's), whose read, from ``CLOCK_SKEW_S`` before the hour, never saw the
    copy; both hours said "no shadow records", the pairs lost unseen. The hour before counts such
    a copy a shadow record without its primary (inconclusive, named); copies within the margin
    still pair in their primary's hour."""
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    at = (hour + timedelta(seconds=10)).timestamp()
    (tmp_path / "near").mkdir()
    near = shadow_log(tmp_path / "near", 50, disagree=0.0, at=at, skew=-50)
    before = audit(near, hour - timedelta(hours=1), hour, "digits", earlier_hours=24)
    assert (before.verdict, before.shadow_without_primary) == ("skip", 0)
    this = audit(near, hour, hour + timedelta(hours=1), "digits", earlier_hours=24)
    assert (this.verdict, this.rows) == ("pass", 50)
    (tmp_path / "far").mkdir()
    far = shadow_log(tmp_path / "far", 50, disagree=0.0, at=at, skew=-80)
    before = audit(far, hour - timedelta(hours=1), hour, "digits", earlier_hours=24)
    assert (before.verdict, before.shadow_without_primary) == ("inconclusive", 50), before.reasons
    assert "50 shadow records without their primary" in before.reasons[0]
    this = audit(far, hour, hour + timedelta(hours=1), "digits", earlier_hours=24)
    assert (this.rows, this.shadow_without_primary) == (0, 0)


@pytest.mark.parametrize(("off", "skew"), [(-70, 130), (-90, 150)])
def test_a_pair_whose_copy_is_stamped_past_the_hour_within_its_close_is_counted_once(tmp_path, off, skew):
    """A copy a pod's clock stamped past the hour but before its close (read there, the hour's
    pair) whose primary was stamped more than ``CLOCK_SKEW_S`` before the hour: the next hour,
    reading primaries from that margin only, never saw the primary and counted the copy a shadow
    record without its primary, the pair counted twice. A copy stamped before the earlier
    hour's close whose primary the range did not read is the earlier hour's; one stamped later
    without any primary is still counted."""
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    end = hour + timedelta(hours=1)
    shadow_log(tmp_path, 50, disagree=0.0, at=(end + timedelta(seconds=off)).timestamp(), skew=skew)
    this = audit(tmp_path / "log", hour, end, "digits", earlier_hours=24)
    assert (this.verdict, this.rows, this.shadow_without_primary) == ("pass", 50, 0)
    nxt = audit(tmp_path / "log", end, end + timedelta(hours=1), "digits", earlier_hours=24)
    assert (nxt.rows, nxt.shadow_without_primary, nxt.primary_without_shadow) == (0, 0, 0)
    (tmp_path / "b").mkdir()
    alone = shadow_log(tmp_path / "b", 0, disagree=0.0, orphans=5, at=(end + timedelta(minutes=5)).timestamp())
    assert audit(alone, end, end + timedelta(hours=1), "digits", earlier_hours=24).shadow_without_primary == 5
    (tmp_path / "c").mkdir()
    closing = shadow_log(tmp_path / "c", 0, disagree=0.0, orphans=5, at=(end + timedelta(seconds=30)).timestamp())
    assert audit(closing, hour, end, "digits", earlier_hours=24).shadow_without_primary == 5
    assert audit(closing, end, end + timedelta(hours=1), "digits", earlier_hours=24).shadow_without_primary == 0


@pytest.mark.parametrize("mirrored", [True, None])
def test_a_pair_split_over_the_hour_whose_copy_waited_for_idle_time_on_a_pod_ahead_is_counted_once(tmp_path, mirrored):
    """A request answered in the hour's last seconds whose copy reached a shadow pod whose clock
    is ``CLOCK_SKEW_S`` ahead (stamped past the hour), waited there ``MAX_COPY_AGE_LIMIT_S`` for
    idle time and was flushed within ``MAX_FLUSH_S``: every bound kept, its file named after the
    hour's close, whose margin took the pods' clocks apart or a copy's wait, not both. The hour's
    audit counted the request's copy lost (the server's own mirror) or its primary without a
    shadow record (Istio's), and the next hour's the copy late among earlier hours' records: one
    pair, split over the hour, counted in both hours, each its half, and compared in neither.
    It is the pair of its primary's hour, once; the next hour counts nothing of it."""
    from model_server.config import MAX_COPY_AGE_LIMIT_S, MAX_FLUSH_S
    from vision_rollout.audit import CLOCK_SKEW_S, audited_hour

    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    end = hour + timedelta(hours=1)
    primaries = {i: end.timestamp() - 5 + 0.01 * i for i in range(50)}
    copies = {i: at + CLOCK_SKEW_S for i, at in primaries.items()}  # (stamped past the hour)
    written = max(copies.values()) + MAX_COPY_AGE_LIMIT_S + MAX_FLUSH_S
    assert datetime.fromtimestamp(written, UTC) - end <= copy_due()  # (due: no copy lost)
    pods_log(tmp_path, {"primary-pod": ("primary", primaries)}, mirrored, written=end.timestamp())
    pods_log(tmp_path, {"shadow-pod": ("shadow", copies)}, mirrored, written=written)
    this = audit(tmp_path / "log", hour, end, "digits", earlier_hours=24)
    shown = (this.rows, this.copies_lost, this.primary_without_shadow, this.late_records)
    assert (this.verdict, *shown) == ("pass", 50, 0, 0, 0), this.reasons
    nxt = audit(tmp_path / "log", end, end + timedelta(hours=1), "digits", earlier_hours=24)
    counted = (nxt.rows, nxt.copies_lost, nxt.shadow_without_primary, nxt.primary_without_shadow, nxt.late_earlier)
    assert (nxt.verdict, *counted) == ("skip", 0, 0, 0, 0, 0), nxt.reasons
    # (and the hourly run audits the hour once that file is whole in the log)
    assert end + timedelta(seconds=audited_hour(end, end)[2]) > datetime.fromtimestamp(written, UTC)


@pytest.mark.parametrize("after_close", [0, 1])
def test_a_copy_split_over_the_hour_is_in_one_hours_figures_whenever_its_file_came(tmp_path, after_close):
    """The server's own mirror's copies of the hour's last requests (stamped as their primaries,
    ``shadow_record``), in a file named at the hour's close, past its end, are paired in that
    hour; a second later, they came after the hour's audit read the log: they are lost to that
    hour, whenever its audit runs, and the next hour counts nothing of them (neither pairs, nor
    shadow records without their primary, nor copies late). No pair is in no hour's figures,
    none in two."""
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    end = hour + timedelta(hours=1)
    primaries = {i: end.timestamp() - 5 + 0.01 * i for i in range(50)}
    pods_log(tmp_path, {"primary-pod": ("primary", primaries)}, True, written=end.timestamp())
    pods_log(tmp_path, {"shadow-pod": ("shadow", primaries)}, written=closes(end).timestamp() + after_close)
    this = audit(tmp_path / "log", hour, end, "digits", earlier_hours=24)
    paired, lost = (50, 0) if after_close == 0 else (0, 50)
    assert (this.rows, this.copies_lost, this.primary_without_shadow, this.late_records) == (paired, lost, 0, 0)
    nxt = audit(tmp_path / "log", end, end + timedelta(hours=1), "digits", earlier_hours=24)
    counted = (nxt.rows, nxt.copies_lost, nxt.shadow_without_primary, nxt.primary_without_shadow, nxt.late_earlier)
    assert (nxt.verdict, *counted) == ("skip", 0, 0, 0, 0, 0), nxt.reasons


def test_the_hours_copies_past_its_end_take_no_read_nor_byte_budget_of_their_own(tmp_path, monkeypatch):
    """The copies of a pair split over the hour (Istio's, stamped past it by a shadow pod ahead)
    are read in the hour's one read of the log, to its close, held to the audit's one byte
    budget: no read of another hour, nor a budget again for them."""
    from vision_rollout.audit import CLOCK_SKEW_S

    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    end = hour + timedelta(hours=1)
    primaries = {i: end.timestamp() - 5 + 0.01 * i for i in range(50)}
    pods_log(tmp_path, {"primary-pod": ("primary", primaries)}, written=end.timestamp())
    copies = {i: at + CLOCK_SKEW_S for i, at in primaries.items()}
    pods_log(tmp_path, {"shadow-pod": ("shadow", copies)}, written=closes(end).timestamp())
    reads = read_spy(monkeypatch, "max_bytes")
    result = audit(tmp_path / "log", hour, end, "digits", max_bytes=10**8)
    assert (result.rows, result.copies_lost) == (50, 0)
    assert reads == [(hour - timedelta(seconds=CLOCK_SKEW_S), closes(end), 10**8)]


def test_a_request_id_re_sent_in_the_next_hour_takes_no_copy_its_first_hour_paired(tmp_path):
    """Clients reuse request ids: 50 requests answered in the hour's last seconds, each copied
    and paired in that hour, were sent again with the same ids and images ten minutes into the
    next hour, and the server's own mirror's copies of those were lost. The next hour's read,
    from ``CLOCK_SKEW_S`` before it, held the first requests' copies, and took them for its own
    primaries' (any copy of an id it had a primary of): its 50 lost copies were shown as 50
    pairs and 0 lost, each copy paired in both hours. The own mirror's copy is stamped as its
    primary (``shadow_record``): it is that primary's, and stays its own hour's."""
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    end = hour + timedelta(hours=1)
    first = {i: end.timestamp() - 5 + 0.01 * i for i in range(50)}
    pods_log(tmp_path, {"primary-pod": ("primary", first)}, True, written=end.timestamp())
    pods_log(tmp_path, {"shadow-pod": ("shadow", first)}, written=max(first.values()) + 5)
    again = {i: end.timestamp() + 600 + 0.01 * i for i in range(50)}  # (the same ids and images)
    pods_log(tmp_path, {"primary-pod-2": ("primary", again)}, True, written=end.timestamp() + 610)
    this = audit(tmp_path / "log", hour, end, "digits", earlier_hours=24)
    assert (this.verdict, this.rows, this.copies_lost) == ("pass", 50, 0), this.reasons
    nxt = audit(tmp_path / "log", end, end + timedelta(hours=1), "digits", earlier_hours=24)
    counted = (nxt.rows, nxt.copies_lost, nxt.duplicates, nxt.input_mismatch, nxt.late_earlier)
    assert (nxt.verdict, *counted) == ("inconclusive", 0, 50, 0, 0, 0), nxt.reasons


@pytest.mark.parametrize("gap", [7, 45])
@pytest.mark.parametrize("copied", ["first", "again"])
def test_a_request_id_re_sent_seconds_later_in_the_next_hour_pairs_the_own_mirrors_copy_of_its_own_request(
    tmp_path, gap, copied
):
    """A client's quick retry (the usual re-send: the same id and image seconds later) across the
    hour's end, behind the server's own mirror: 20 requests answered 5 s before the hour's end,
    sent again ``gap`` s later, in the next hour, only one of the two copied. A copy was taken for
    the first of its id's primaries in the range it was stamped no more than ``CLOCK_SKEW_S``
    after: the first requests' copies were paired in both hours (the next hour's 20 lost shown as
    20 pairs), or the retries' in both (the hour's 20 lost shown as 20 pairs). The own mirror's
    copy is stamped with its primary's own stamp (``shadow_record``: the request's
    ``received_at``): it is that primary's, the one stamped as it is, in whichever hour."""
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    end = hour + timedelta(hours=1)
    first = {i: end.timestamp() - 5 + 0.01 * i for i in range(20)}
    again = {i: at + gap for i, at in first.items()}
    pods_log(tmp_path, {"pod-a": ("primary", first)}, True, written=end.timestamp())
    pods_log(tmp_path, {"pod-b": ("primary", again)}, True, written=end.timestamp() + gap + 5)
    pod, copies = ("pod-a", first) if copied == "first" else ("pod-b", again)  # (stamped as their primaries)
    pods_log(tmp_path, {pod: ("shadow", copies)}, written=max(copies.values()) + 2)
    this = audit(tmp_path / "log", hour, end, "digits", earlier_hours=24)
    nxt = audit(tmp_path / "log", end, end + timedelta(hours=1), "digits", earlier_hours=24)
    paired = {"first": ((20, 0), (0, 20)), "again": ((0, 20), (20, 0))}[copied]
    assert ((this.rows, this.copies_lost), (nxt.rows, nxt.copies_lost)) == paired, (this.reasons, nxt.reasons)
    assert (this.late_records, nxt.late_earlier, this.duplicates, nxt.duplicates) == (0, 0, 0, 0)


@pytest.mark.parametrize("mirrored", [True, None])
def test_a_copy_written_within_copy_due_of_the_hours_end_is_the_hours(tmp_path, mirrored):
    """``copy_due`` (how long after its primary a live shadow pod may still not have written its
    copy: the pods' clocks apart, a copy's wait for idle time, a flush interval after the previous
    flush's write, its own write) allows a file named up to 186 s after the hour's end; the hour
    closed at 180 s (``closes`` left out the two writes). The hour's last requests' copies, each
    bound kept, in a file named 181 s after it were late to the hour (0 pairs, 50 late records) and
    counted late again by the next hour (50 ``late_earlier``). A range closes ``copy_due`` after
    its end, the one bound derived from the other."""
    from model_server.config import MAX_COPY_AGE_LIMIT_S, MAX_FLUSH_S
    from vision_rollout.audit import CLOCK_SKEW_S
    from vision_rollout.engine import WRITE_S

    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    end = hour + timedelta(hours=1)
    assert closes(end) - end >= copy_due()
    primaries = {i: end.timestamp() - 5 + 0.01 * i for i in range(50)}
    copies = {i: at + CLOCK_SKEW_S for i, at in primaries.items()}  # (a shadow pod ahead)
    written = max(copies.values()) + MAX_COPY_AGE_LIMIT_S + MAX_FLUSH_S + 2 * WRITE_S
    assert datetime.fromtimestamp(written, UTC) - end <= copy_due()  # (due)
    pods_log(tmp_path, {"primary-pod": ("primary", primaries)}, mirrored, written=end.timestamp())
    pods_log(tmp_path, {"shadow-pod": ("shadow", copies)}, written=written)
    this = audit(tmp_path / "log", hour, end, "digits", earlier_hours=24)
    assert (this.verdict, this.rows, this.copies_lost, this.late_records) == ("pass", 50, 0, 0), this.reasons
    nxt = audit(tmp_path / "log", end, end + timedelta(hours=1), "digits", earlier_hours=24)
    assert (nxt.verdict, nxt.rows, nxt.shadow_without_primary, nxt.late_earlier) == ("skip", 0, 0, 0), nxt.reasons


@pytest.mark.parametrize("image", ["again", None])
def test_an_id_sent_twice_in_an_hour_pairs_the_own_mirrors_copy_with_the_request_it_copied(tmp_path, image):
    """A client reusing its request ids within an hour, behind the server's own mirror: 50
    requests (images ``img-<i>``, answered class 3) sent again 30 s later under the same ids
    (images ``again-<i>``, or none decoded, answered class 5), only the second requests copied
    (stamped as their primaries, answered class 5). The copies were paired with the first
    primaries, the earliest of their ids: of another image, the 50 copies were excluded as no
    copy of their primary (0 pairs, 50 ``input_mismatch``, "skip"); without an image digest, each
    copy's class 5 was compared with the first request's class 3 (0% agreement, "fail"). A copy
    stamped exactly as a primary of its id is that primary's: 50 pairs, all agreeing, the first
    requests the repeats."""
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    end = hour + timedelta(hours=1)
    first = {i: hour.timestamp() + 600 + 0.01 * i for i in range(50)}
    again = {i: at + 30 for i, at in first.items()}
    pods_log(tmp_path, {"pod-a": ("primary", first)}, True, written=hour.timestamp() + 610)
    pods_log(tmp_path, {"pod-b": ("primary", again)}, True, written=hour.timestamp() + 640, top=5, image=image)
    pods_log(tmp_path, {"pod-b": ("shadow", again)}, written=hour.timestamp() + 642, top=5, image=image)
    result = audit(tmp_path / "log", hour, end, "digits", earlier_hours=24)
    shown = (result.verdict, result.rows, result.agreement, result.input_mismatch, result.copies_lost)
    assert shown == ("pass", 50, 1.0, 0, 0), result.reasons
    assert (result.duplicates, result.shadow_without_primary, result.primary_without_shadow) == (50, 0, 0)


def test_a_copy_lost_to_its_hour_is_no_late_record_of_the_next_though_its_id_was_sent_again_there(tmp_path):
    """Behind the server's own mirror, 50 requests answered 100 s before the hour's end, their
    copies written after its close (lost to the hour: its audit counts 50 copies lost), their
    ids sent again 20 s into the next hour, those copies written on time. The next hour read the
    stretch around each late copy again for its primary, and took a copy of the id on time (the
    retry's) for the first request's: the lost copies were counted late too (50
    ``late_earlier``), each in two hours' figures. A copy's primary is the one it is stamped as
    (``copy_of``): the first requests had none on time, their copies were lost, and nothing more."""
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    end = hour + timedelta(hours=1)
    first = {i: end.timestamp() - 100 + 0.01 * i for i in range(50)}
    again = {i: end.timestamp() + 20 + 0.01 * i for i in range(50)}
    pods_log(tmp_path, {"pod-a": ("primary", first)}, True, written=end.timestamp() - 90)
    pods_log(tmp_path, {"pod-a": ("shadow", first)}, written=closes(end).timestamp() + 100)
    pods_log(tmp_path, {"pod-b": ("primary", again)}, True, written=end.timestamp() + 25)
    pods_log(tmp_path, {"pod-b": ("shadow", again)}, written=end.timestamp() + 30)
    this = audit(tmp_path / "log", hour, end, "digits", earlier_hours=24)
    assert (this.rows, this.copies_lost, this.late_records) == (0, 50, 0), this.reasons
    nxt = audit(tmp_path / "log", end, end + timedelta(hours=1), "digits", earlier_hours=24)
    counted = (nxt.verdict, nxt.rows, nxt.copies_lost, nxt.late_earlier, nxt.duplicates)
    assert counted == ("pass", 50, 0, 0, 0), nxt.reasons


def retry_scene() -> tuple[datetime, datetime, float, dict[int, float], dict[int, float], dict[int, float]]:
    """The retry tests' hour (10:00 to 11:00), its base stamp (10:10), and their requests' stamps:
    300 that succeed (ids 0 to 299, 0.1 s apart), 60 first attempts (ids 300 to 359, 100 s on),
    and those ids sent again 5 s after their first attempt."""
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    base = hour.timestamp() + 600
    first = {i: base + 100 + 0.01 * i for i in range(300, 360)}
    ok = {i: base + 0.1 * i for i in range(300)}
    return hour, hour + timedelta(hours=1), base, ok, first, {i: at + 5 for i, at in first.items()}


def test_a_retry_whose_first_attempts_copy_was_dropped_compares_the_retrys_copy(tmp_path):
    """Behind the server's own mirror under load: 300 requests whose shadow agrees, and 60
    whose first attempt's copy was dropped (queue full) and whose client sent the id again 5 s
    later; the retry's copy ran and answers class 5 (the primary: 3). The dropped copy, stamped
    as the first attempt, made it the id's primary, and the retry's copy was left out as a
    duplicate: ('pass', 300 pairs, agreement 1.0), a bad shadow passing. Only a copy that ran
    makes its primary the one compared: 360 pairs, 60 disagreeing, "fail"."""
    hour, end, base, ok, first, again = retry_scene()
    pods_log(tmp_path, {"pod-a": ("primary", ok | first)}, True, written=base + 110)
    pods_log(tmp_path, {"pod-b": ("primary", again)}, True, written=base + 115, image="again")
    pods_log(tmp_path, {"shadow": ("shadow", ok)}, written=base + 120)
    pods_log(tmp_path, {"shadow": ("shadow", first)}, written=base + 120, outcome="DROPPED")
    pods_log(tmp_path, {"shadow": ("shadow", again)}, written=base + 120, top=5, image="again")
    result = audit(tmp_path / "log", hour, end, "digits", earlier_hours=0)
    assert (result.verdict, result.rows, result.agreement) == ("fail", 360, 300 / 360), result.reasons
    assert (result.shadow_dropped, result.duplicates, result.input_mismatch, result.copies_lost) == (60, 60, 0, 0)


def test_a_retry_whose_first_attempts_primary_failed_compares_the_retrys_copy(tmp_path):
    """Behind the server's own mirror: 300 requests whose shadow agrees, and 60 whose first
    attempt's primary failed (FAULT) while its copy ran, the client sending the id again 5 s
    later; the retry succeeded (class 3) and its copy answers class 5. The failed attempt, its
    copy stamped exactly as it and run, was taken for the id's primary: its pair was no
    comparison (``primary_failed``) and the retry's copy was left out as a duplicate: ('pass',
    300 pairs, agreement 1.0), a bad shadow passing. Of an id's primaries, one that succeeded
    and whose copy ran is compared: 360 pairs, 60 disagreeing, "fail"; each failed attempt's
    pair is ``primary_failed``, no duplicate."""
    hour, end, base, ok, first, again = retry_scene()
    pods_log(tmp_path, {"pod-a": ("primary", ok)}, True, written=base + 110)
    pods_log(tmp_path, {"pod-a": ("primary", first)}, True, written=base + 111, outcome="FAULT")
    pods_log(tmp_path, {"pod-b": ("primary", again)}, True, written=base + 115)
    pods_log(tmp_path, {"shadow": ("shadow", ok)}, written=base + 120)
    pods_log(tmp_path, {"shadow": ("shadow", first)}, written=base + 120, top=5)
    pods_log(tmp_path, {"shadow": ("shadow", again)}, written=base + 121, top=5)
    result = audit(tmp_path / "log", hour, end, "digits", earlier_hours=0)
    assert (result.verdict, result.rows, result.agreement) == ("fail", 360, 300 / 360), result.reasons
    assert (result.duplicates, result.input_mismatch, result.copies_lost, result.shadow_dropped) == (0, 0, 0, 0)
    pairs = predictionlog.shadow_pairs(predictionlog.read(tmp_path / "log", hour, end))
    assert (len(pairs), pairs.attrs["primary_failed"], pairs.attrs["duplicates"]) == (360, 60, 0)


@pytest.mark.parametrize("first_copy", ["disagrees", "failed"])
def test_behind_istio_a_retry_whose_first_attempts_primary_failed_is_compared_with_its_own_copy(tmp_path, first_copy):
    """Behind Istio (each copy stamped by the candidate's pod 0.5 s after its primary, as no
    primary): 300 requests whose shadow agrees, and 60 whose first attempt's primary failed
    (FAULT) while its copy ran, the client sending the id again 5 s later; the retry succeeded
    (class 3). With the first attempt's copy answering class 5 and the retry's class 5 too (a
    bad shadow), the failed attempt was taken for the id's primary (its pair no comparison) and
    the retry's copy counted a duplicate: ('pass', 300 pairs, 1.0, 120 duplicates). With the
    first attempt's copy failed as its primary did (FAULT, both cut by the client's timeout) and
    the retry's copy agreeing, the same ('pass', 300 pairs, 120 duplicates); ranking the retry
    first alone paired it with the failed copy: a good shadow failed on shadow errors. Each copy
    is its own attempt's (its input's, nearest in time), and the retry, which succeeded, is
    compared: 360 pairs, no duplicate, each failed attempt's pair in ``primary_failed``; "fail"
    on 60 disagreements, or "pass" with no shadow error."""
    hour, end, base, ok, first, again = retry_scene()
    bad = first_copy == "disagrees"
    pods_log(tmp_path, {"pod-a": ("primary", ok)}, written=base + 110)
    pods_log(tmp_path, {"pod-a": ("primary", first)}, written=base + 111, outcome="FAULT")
    pods_log(tmp_path, {"pod-b": ("primary", again)}, written=base + 115)
    pods_log(tmp_path, {"shadow": ("shadow", {i: t + 0.5 for i, t in ok.items()})}, written=base + 120)
    copies = {i: t + 0.5 for i, t in first.items()}
    pods_log(
        tmp_path, {"shadow": ("shadow", copies)}, written=base + 120, **({"top": 5} if bad else {"outcome": "FAULT"})
    )
    again_copies = {i: t + 0.5 for i, t in again.items()}
    pods_log(tmp_path, {"shadow": ("shadow", again_copies)}, written=base + 121, top=5 if bad else 3)
    result = audit(tmp_path / "log", hour, end, "digits", earlier_hours=0)
    judged = (result.verdict, result.rows, result.agreement, result.shadow_errors, result.duplicates)
    assert judged == (("fail", 360, 300 / 360, 0, 0) if bad else ("pass", 360, 1.0, 0, 0)), result.reasons
    pairs = predictionlog.shadow_pairs(predictionlog.read(tmp_path / "log", hour, end))
    assert (len(pairs), pairs.attrs["primary_failed"], pairs.attrs["duplicates"]) == (360, 60, 0)
    assert pairs["shadow_error"].isna().all()
    # (the failed attempts' pairs, no comparison, said as the repeats are)
    files = report_files(result)
    assert result.primary_failed == 60
    assert "- Pairs whose primary failed (no comparison, not audited): 60" in files[REPORT].decode()
    assert json.loads(files["summary.json"])["primary_failed"] == 60
    assert (pairs["time"].iloc[300:] > pd.Timestamp(base + 104, unit="s", tz="UTC")).all()  # (the retries)


@pytest.mark.parametrize(
    ("lag", "first_copy", "retry_top"),
    [
        (-0.15, None, 5),
        (0.15, None, 5),
        (0.15, "FAULT", 3),
        (-0.15, "FAULT", 3),
        (0.05, "FAULT", 3),
        (0.15, "ok", 5),
        (-0.15, "ok", 5),
    ],
)
def test_behind_istio_a_retry_is_paired_with_its_own_copy_whichever_way_the_candidates_clock_is_off(
    tmp_path, lag, first_copy, retry_top
):
    """Behind Istio, 300 requests whose shadow agrees and 60 whose first attempt failed (FAULT),
    the client sending the id again 0.2 s later (the retry succeeded, class 3); the candidate's
    pod stamps each copy by its clock, ``lag`` s off (0.15 s: more than half the gap). Matched
    nearest in time on the stamps as written, the two copies of an id swapped: with the first
    attempt's copy failed too (FAULT) and the retry's agreeing (a good shadow), the retry was
    compared with the failed copy, ('fail', 360 pairs, 60 shadow errors); with the first
    attempt unsampled and the retry's copy answering class 5 (a bad shadow) and the clock
    behind, the retry's copy went to the failed attempt and nothing of those ids was compared,
    ('pass', 300 pairs); with the first attempt's copy answering as the primary would have
    (ok, class 3) and the retry's class 5, the retry was compared with the agreeing copy. The
    copies' stamps are corrected by the clock's offset measured on the ids with one primary
    and one copy of one input (the median, here ``lag``) before the matching: the bad shadow fails on 360 pairs (300/360), the good one passes on 360 with no
    shadow error (its failed attempts' pairs ``primary_failed``)."""
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    end = hour + timedelta(hours=1)
    base = hour.timestamp() + 600
    ok = {i: base + 0.1 * i for i in range(300)}
    first = {i: base + 100 + 0.5 * (i - 300) for i in range(300, 360)}
    again = {i: at + 0.2 for i, at in first.items()}
    pods_log(tmp_path, {"pod-a": ("primary", ok)}, written=base + 140)
    pods_log(tmp_path, {"pod-a": ("primary", first)}, written=base + 141, outcome="FAULT")
    pods_log(tmp_path, {"pod-b": ("primary", again)}, written=base + 145)
    pods_log(tmp_path, {"shadow": ("shadow", {i: t + lag for i, t in ok.items()})}, written=base + 150)
    if first_copy:
        copies = {i: t + lag for i, t in first.items()}
        pods_log(tmp_path, {"shadow": ("shadow", copies)}, written=base + 150, outcome=first_copy)
    pods_log(
        tmp_path, {"shadow": ("shadow", {i: t + lag for i, t in again.items()})}, written=base + 151, top=retry_top
    )
    result = audit(tmp_path / "log", hour, end, "digits", earlier_hours=0)
    judged = (result.verdict, result.rows, result.agreement, result.shadow_errors, result.duplicates)
    bad = retry_top != 3
    # (the failed attempts: with no copy, each a repeat of its id; with its copy, a pair whose
    # primary failed)
    repeats = 0 if first_copy else 60
    assert judged == (("fail", 360, 300 / 360, 0, repeats) if bad else ("pass", 360, 1.0, 0, 0)), result.reasons
    assert result.primary_failed == 60 - repeats
    assert predictionlog.CLOCK_SKEW_S == CLOCK_SKEW_S  # (the offset's bound: the audit's)


@pytest.mark.parametrize(
    ("lag", "gap", "other", "measured_in"),
    [
        (0.15, 0.2, 0.4, "before"),
        (0.15, 0.2, 0.4, "after"),
        (-0.15, 0.2, 0.0, "before"),
        (-0.15, 0.2, 0.0, "after"),
        (3.0, 4.0, 8.0, "after"),
        (-3.0, 4.0, 0.0, "before"),
    ],
)
def test_behind_istio_a_retry_across_the_hour_is_matched_to_one_attempt_whichever_hours_read_matches_it(
    tmp_path, lag, gap, other, measured_in
):
    """Behind Istio, 50 ids whose first attempt failed (FAULT) just before the hour's end, sent
    again ``gap`` s later, past it (the retry succeeded); only the retries copied, on a candidate
    pod whose copies lag their primaries by ``lag`` s around the hour's end (more than half the
    gap), as 40 ids of one primary and one copy within 30 s of the end show (20 each side). The
    pod's 300 other pairs of the hour ``measured_in`` (before the end, or after) show ``lag`` too,
    its 300 of the other hour ``other`` (its clock drifting). Each hour's read measured the pod's
    offset on the records it read (``lag`` in one, ``other`` in the other) and matched a retry's
    copy to another attempt than the other read did: each of the 50 pairs was counted in both
    hours (rows 320 + 370, 50 ``primary_failed`` in the first) or in neither (320 + 320). The
    offset is measured per window of the copy's stamp, on the window's records alone
    (``_clock_offsets``: the minutes around the hour's end, which both reads hold whole), and
    the audit matches its range's records as its read whole (``matched_times``): every read
    that holds a copy matches it to the same attempt (the retry, its own), and each pair is
    counted in one hour, the retry's: rows 320 and 370, none failed."""
    from model_server.predictionlog import AUDIT_COLUMNS, copy_of, read

    hours_lag = (lag, other) if measured_in == "before" else (other, lag)
    counted = retries_across_the_hour(tmp_path, lag, gap, -gap / 2, edge_at=-30.0, n_edge=40, hours_lag=hours_lag)
    # (per hour: the 20 edge ids before the end and the 300 before in the first; the 20 after,
    # the 50 retries, all stamped past the end, and the 300 after in the second)
    assert counted == ((300 + 20, 0), (20 + 50 + 300, 0))
    matched = []
    for start in (datetime(2026, 3, 1, 10, tzinfo=UTC), datetime(2026, 3, 1, 11, tzinfo=UTC)):
        records = read(
            tmp_path / "log",
            start - timedelta(seconds=CLOCK_SKEW_S),
            closes(start + timedelta(hours=1)),
            "digits",
            columns=AUDIT_COLUMNS,
            roles=("primary", "shadow"),
        ).reset_index(drop=True)
        of = copy_of(records)[1]
        retried = np.flatnonzero(
            (records["role"] == "shadow").to_numpy()
            & records["request_id"].isin([f"r{i}" for i in range(50)]).to_numpy()
        )
        matched.append(
            dict(zip(records["request_id"].iloc[retried], records["outcome"].iloc[of[retried]], strict=True))
        )
    assert matched[0] == matched[1] == {f"r{i}": "ok" for i in range(50)}
    # (the windows are the hourly audit's reads': from CLOCK_SKEW_S before each hour to its close)
    assert (predictionlog.AUDIT_HOUR_S, predictionlog.AUDIT_CLOSE_S) == (3600, copy_due().total_seconds())


def copies_of(stamps: dict[int, float], lag: float) -> dict[int, float]:
    """Istio's copies of primaries ``stamps`` (index -> stamp), stamped ``lag`` s after them."""
    return {i: t + lag for i, t in stamps.items()}


def retries_across_the_hour(
    folder: Path,
    lag: float,
    gap: float,
    retry_at: float,
    edge_at: float,
    n_edge: int,
    hours_lag: tuple[float, float] | None = None,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Behind Istio around 11:00 (``e``), a candidate pod whose clock lags the primaries' by
    ``lag`` s around it (copies stamped ``lag + 0.003`` s after their primaries): 300 pairs at
    10:30 and 300 at 11:30, lagging ``hours_lag`` (each hour's; ``lag`` unless given); 50 ids
    failed (FAULT) at ``e + retry_at`` and sent again ``gap`` s later (the retry succeeded), only
    the retry copied; ``n_edge`` ids of one primary and one copy from ``e + edge_at``, 1.5 s
    apart. The hourly audits of 10:00 and 11:00: each one's (rows, primary_failed)."""
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    end = hour + timedelta(hours=1)
    e = end.timestamp()
    first = {i: e + retry_at - 0.001 * i for i in range(50)}
    again = {i: t + gap for i, t in first.items()}
    edge = {100 + i: e + edge_at + 1.5 * i for i in range(n_edge)}
    before = {200 + i: e - 1800 + 0.1 * i for i in range(300)}
    after = {600 + i: e + 1800 + 0.1 * i for i in range(300)}
    lag_before, lag_after = hours_lag or (lag, lag)
    pods_log(folder, {"primary-pod": ("primary", before)}, written=e - 1700)
    pods_log(folder, {"shadow-pod": ("shadow", copies_of(before, lag_before + 0.003))}, written=e - 1690)
    pods_log(folder, {"primary-pod": ("primary", first)}, written=e, outcome="FAULT")
    pods_log(folder, {"primary-pod": ("primary", {**again, **edge})}, written=e + 10)
    pods_log(folder, {"shadow-pod": ("shadow", copies_of({**again, **edge}, lag + 0.003))}, written=e + 15)
    pods_log(folder, {"primary-pod": ("primary", after)}, written=e + 1900)
    pods_log(folder, {"shadow-pod": ("shadow", copies_of(after, lag_after + 0.003))}, written=e + 1910)
    this = audit(folder / "log", hour, end, "digits", earlier_hours=24)
    nxt = audit(folder / "log", end, end + timedelta(hours=1), "digits", earlier_hours=24)
    return (this.rows, this.primary_failed), (nxt.rows, nxt.primary_failed)


@pytest.mark.parametrize(("lag", "gap"), [(-0.15, 0.2), (-3.0, 4.0)])
def test_behind_istio_at_low_traffic_a_retry_across_the_hour_is_matched_by_the_pods_offset_over_the_hour(
    tmp_path, lag, gap
):
    """Guards the low-traffic side of Audit HIGH 2: a candidate pod lagging ``lag`` s all along,
    50 retries straddling 11:00 (failed ``gap / 2`` s before it, the retry ``gap / 2`` after,
    only the retry copied) and no id of one primary and one copy in the minutes around the end.
    The window around the end, with no pair, takes the pod's offset over the read
    (``MIN_OFFSET_PAIRS``), not 0 (the 50 copies matched to the failed attempts): every copy is
    matched to its retry (rows 300 and 350, none failed)."""
    counted = retries_across_the_hour(tmp_path, lag, gap, retry_at=-gap / 2, edge_at=0.0, n_edge=0)
    assert counted == ((300, 0), (50 + 300, 0))


def test_behind_istio_one_pair_in_the_minutes_around_the_hour_does_not_set_the_pods_offset_there(tmp_path):
    """Guards Audit HIGH 2's windows: a candidate pod lagging 0.15 s all along, 50 retries
    straddling 11:00 (only the retry copied) and one id in the minutes around the end whose
    records there look a pair and are none: sent at 11:02:50 (not sampled) and again at 11:03:06.1,
    past the window (its copy, 0.15 s behind, stamped in it). Taken alone, the window's offset
    is 15.95 s, and the retries' copies go to the failed attempts (50 ``primary_failed``); a
    window of fewer than ``MIN_OFFSET_PAIRS`` pairs takes the pod's offset over the read: every
    retry compared in the next hour, and the id's copy with its second request."""
    e = datetime(2026, 3, 1, 11, tzinfo=UTC).timestamp()
    pods_log(tmp_path, {"primary-pod": ("primary", {999: e + 170})}, written=e + 180)
    pods_log(tmp_path, {"primary-pod": ("primary", {999: e + 186.1})}, written=e + 181)
    pods_log(tmp_path, {"shadow-pod": ("shadow", {999: e + 185.95})}, written=e + 182)
    counted = retries_across_the_hour(tmp_path, -0.15, 0.2, retry_at=-0.1, edge_at=0.0, n_edge=0)
    assert counted == ((300, 0), (50 + 1 + 300, 0))


def test_behind_istio_retries_across_the_close_of_the_minutes_around_the_hour_do_not_set_the_pods_offset(tmp_path):
    """Review s49-1: a candidate pod 3 s behind all along, 20 pairs at 11:00:30, and 50 ids failed
    2 s before 11:03:06 (the close of the minutes around the hour that both hours' reads hold) and
    sent again 4 s later, past it, only the retry copied: each retry's copy (3 s behind) is stamped
    before the close, its primary after. In the window each id looked one primary and one copy, 50
    against 20, and set the pod's offset there (-7 s): the retries went to their failed attempts,
    (320, 50) in the second hour. A key whose primary failed in the window is left out of its
    measure (its retry may lie past the window's edge): every retry compared, none failed."""
    e = datetime(2026, 3, 1, 11, tzinfo=UTC).timestamp()
    close = e + 186
    first = {i: close - 2 - 0.001 * i for i in range(50)}
    again = {i: t + 4 for i, t in first.items()}
    edge = {100 + i: e + 30 + 1.5 * i for i in range(20)}
    before = {200 + i: e - 1800 + 0.1 * i for i in range(300)}
    after = {600 + i: e + 1800 + 0.1 * i for i in range(300)}
    for stamps, written, outcome in ((before, e - 1700, "ok"), (edge, e + 100, "ok"), (first, close, "FAULT")):
        pods_log(tmp_path, {"primary-pod": ("primary", stamps)}, written=written, outcome=outcome)
    for stamps, written in ((before, e - 1690), (edge, e + 101), (again, close), (after, e + 1910)):
        pods_log(tmp_path, {"shadow-pod": ("shadow", copies_of(stamps, -3.0 + 0.003))}, written=written)
    pods_log(tmp_path, {"primary-pod": ("primary", again)}, written=e + 200)
    pods_log(tmp_path, {"primary-pod": ("primary", after)}, written=e + 1900)
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    counted = [
        audit(tmp_path / "log", h, h + timedelta(hours=1), "digits", earlier_hours=24)
        for h in (hour, hour + timedelta(hours=1))
    ]
    assert [(a.rows, a.primary_failed) for a in counted] == [(300, 0), (20 + 50 + 300, 0)]


def test_behind_istio_an_hours_audit_run_again_after_late_files_matches_its_copies_as_at_the_close(tmp_path):
    """Review s49-1: a candidate pod 0.15 s behind, 20 pairs at 10:50, 50 retries straddling 11:00
    (only the retry copied) and no pair in the minutes around it (the window takes the pod's
    offset over the read). A file written at 11:10, after 10:00's close, holds 30 pairs of
    10:20 whose copies lead by 0.15 s. Run again after it came (an Airflow retry), the hour's audit
    measured the pod's offset with the late file's pairs (+0.15 s: the retries to their failed
    attempts, 50 failed) where the audit at the close had not: the fallback is measured on the
    files written by their window's close too, and the audit run again counts as at the close."""
    e = datetime(2026, 3, 1, 11, tzinfo=UTC).timestamp()
    first = {i: e - 0.1 - 0.001 * i for i in range(50)}
    again = {i: t + 0.2 for i, t in first.items()}
    ontime = {200 + i: e - 600 + 1.0 * i for i in range(20)}
    late = {400 + i: e - 2400 + 1.0 * i for i in range(30)}
    after = {600 + i: e + 1800 + 0.1 * i for i in range(300)}
    pods_log(tmp_path, {"primary-pod": ("primary", ontime)}, written=e - 500)
    pods_log(tmp_path, {"primary-pod": ("primary", first)}, written=e + 1, outcome="FAULT")
    pods_log(tmp_path, {"primary-pod": ("primary", again)}, written=e + 2)
    pods_log(tmp_path, {"primary-pod": ("primary", after)}, written=e + 1900)
    for stamps, written in ((ontime, e - 499), (again, e + 3), (after, e + 1910)):
        pods_log(tmp_path, {"shadow-pod": ("shadow", copies_of(stamps, -0.15))}, written=written)
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    at_close = audit(tmp_path / "log", hour, hour + timedelta(hours=1), "digits")
    pods_log(tmp_path, {"primary-pod": ("primary", late)}, written=e + 600)
    pods_log(tmp_path, {"shadow-pod": ("shadow", copies_of(late, 0.15))}, written=e + 601)
    again_later = audit(tmp_path / "log", hour, hour + timedelta(hours=1), "digits")
    assert (at_close.rows, at_close.primary_failed) == (again_later.rows, again_later.primary_failed) == (20, 0)


@pytest.mark.parametrize(
    ("lag", "gap", "retry_at", "edge_at", "right"),
    [
        (-0.15, 0.2, -30.0, 5.0, ((300 + 50, 0), (40 + 300, 0))),
        (-3.0, 4.0, -30.0, 5.0, ((300 + 50, 0), (40 + 300, 0))),
        (-0.15, 0.2, 60.0, -59.0, ((300 + 40, 0), (50 + 300, 0))),
    ],
    ids=["retries-before-lag-0.15", "retries-before-lag-3", "retries-after-lag-0.15"],
)
def test_behind_istio_retries_near_the_hours_end_are_matched_though_its_clean_pairs_are_the_other_hours(
    tmp_path, lag, gap, retry_at, edge_at, right
):
    """Guards the other side of Audit HIGH 2: a candidate pod lagging ``lag`` s all along, 50
    retries ``gap`` s after a failed attempt (only the retry copied) in one hour's part of the
    minutes around 11:00 (from 10:59:30, or from 11:01) and the 40 ids of one primary and one copy
    there all in the other hour's part (from 11:00:05, or from 10:59:01). The window around the
    end is measured on its pairs in both hours' reads, and the range's records are matched as
    the read whole (``matched_times``; measured on the range's records alone, the window held no
    pair, and the retries went to their failed attempts): every copy is matched to its retry in
    the hour it is stamped in (rows as ``right``, none failed)."""
    assert retries_across_the_hour(tmp_path, lag, gap, retry_at, edge_at, n_edge=40) == right


def test_behind_istio_the_rollout_audit_across_the_hour_matches_retries_by_the_pods_offset_over_its_range(tmp_path):
    """Guards the rollout's audit over a range across an hour (10:50 to 11:10, as
    ``rollout_audit`` reads it) against Audit HIGH 2's fix: a candidate pod lagging 0.15 s all
    along, 120 ids of one primary and one copy at 10:50-10:58 and 11:04-11:10, 50 ids failed
    from 11:01:00 and sent again 0.2 s later (only the retry copied), no clean pair in the minutes
    around 11:00. The window around 11:00, holding no pair, takes the pod's offset over the
    range's read: every retry is compared, rows 170, none failed."""
    lag, gap = -0.15, 0.2
    start = datetime(2026, 3, 1, 10, 50, tzinfo=UTC)
    e = datetime(2026, 3, 1, 11, tzinfo=UTC).timestamp()
    clean = {200 + i: e - 600 + 4 * i for i in range(60)} | {400 + i: e + 240 + 6 * i for i in range(60)}
    first = {i: e + 60 + 1.0 * i for i in range(50)}
    again = {i: t + gap for i, t in first.items()}
    early = {i: t for i, t in clean.items() if t < e}
    late = {i: t for i, t in clean.items() if t >= e}
    pods_log(tmp_path, {"primary-pod": ("primary", early)}, written=e - 100)
    pods_log(tmp_path, {"shadow-pod": ("shadow", copies_of(early, lag))}, written=e - 99)
    pods_log(tmp_path, {"primary-pod": ("primary", first)}, written=e + 120, outcome="FAULT")
    pods_log(tmp_path, {"primary-pod": ("primary", again)}, written=e + 121)
    pods_log(tmp_path, {"shadow-pod": ("shadow", copies_of(again, lag))}, written=e + 122)
    pods_log(tmp_path, {"primary-pod": ("primary", late)}, written=e + 600)
    pods_log(tmp_path, {"shadow-pod": ("shadow", copies_of(late, lag))}, written=e + 601)
    result = audit(tmp_path / "log", start, start + timedelta(minutes=20), "digits", earlier_hours=0)
    assert (result.rows, result.primary_failed) == (120 + 50, 0), result.reasons


def quiet_hours(
    folder: Path, lag: Callable[[float], float], sent: np.ndarray, k: int, failed_at: float, gap: float
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Behind Istio around 11:00 (``e``), a quiet model: requests at ``e + sent`` (s), each copied;
    ``k`` ids failed (FAULT) at ``e + failed_at`` and sent again ``gap`` s later, only the retry
    copied; the candidate pod's clock ``lag(t)`` s off at ``t`` (copies 3 ms after their
    primaries besides). The hourly audits of 10:00 and 11:00, each one's (rows, primary_failed),
    and the right ones (each request a row of its hour, each retry of its own)."""
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    e = hour.timestamp() + 3600
    first = {i: e + failed_at - 0.001 * i for i in range(k)}
    again = {i: t + gap for i, t in first.items()}
    pods_log(folder, {"primary-pod": ("primary", first)}, written=e + failed_at + 1, outcome="FAULT")
    before = {100 + i: e + s for i, s in enumerate(sent) if s < 0}
    after = {100 + i: e + s for i, s in enumerate(sent) if s >= 0}
    for stamps in (before, again, after):
        written = max(stamps.values()) + 5
        pods_log(folder, {"primary-pod": ("primary", stamps)}, written=written)
        pods_log(
            folder, {"shadow-pod": ("shadow", {i: t + lag(t) + 0.003 for i, t in stamps.items()})}, written=written
        )
    counted = [
        audit(folder / "log", h, h + timedelta(hours=1), "digits", earlier_hours=24)
        for h in (hour, hour + timedelta(hours=1))
    ]
    retried_after = failed_at + gap >= 0
    right = [(int((sent < 0).sum()) + k * (not retried_after), 0), (int((sent >= 0).sum()) + k * retried_after, 0)]
    return [(a.rows, a.primary_failed) for a in counted], right


EVERY_2_MIN = np.arange(-3570, 3480, 120.0)  # (10:00:30 to 11:56:30: two in the minutes around 11:00)


def test_behind_istio_on_a_quiet_model_a_drifting_clock_is_followed_to_the_hours_end(tmp_path):
    """A candidate pod whose clock drifts from 3 s ahead at 10:00 to 3 s behind at 12:00 (right at
    11:00), on a quiet model (a request every 2 min): 20 ids failed at 10:59:59.9 and sent again
    0.2 s later, only the retry copied. The minutes around 11:00 hold no pair, and take the pod's
    offset over each hour's read: its median there (+1.5 s in 10:00's, -1.5 s in 11:00's) sent
    the copies to the failed attempts in one hour and to the retries in the other: counted in both.
    Read as a line through the read (``_drift_lines``), the offset at 11:00 is right in both."""
    counted, right = quiet_hours(tmp_path, lambda t: -3.0 * (t % 7200 - 3600) / 3600, EVERY_2_MIN, 20, -0.1, 0.2)
    assert right == [(30, 0), (29 + 20, 0)]
    assert counted == right


STEPPED = datetime(2026, 3, 1, 10, 20, tzinfo=UTC).timestamp()
BURSTS = np.concatenate([-1800 + 0.02 * np.arange(20), 1800 + 0.02 * np.arange(20)])  # (10:30 and 11:30)
BURSTS_BESIDE_A_STEP = np.concatenate(
    [-3300 + 5.0 * np.arange(10), -1800 + 5.0 * np.arange(20), 1800 + 5.0 * np.arange(10)]
)


@pytest.mark.parametrize(
    ("lag", "sent", "failed_at", "gap"),
    [
        # right, then 0.5 s ahead from 10:20 (NTP): the pairs lie on no line (the middle third's
        # median off the line through the outer two's), 10:00's read is bent
        (lambda t: 0.5 if t >= STEPPED else 0.0, EVERY_2_MIN, -0.1, 0.2),
        # the same step 0.3 s ahead between bursts at 10:05, 10:30 and 11:30: the middle third's
        # median time beside the last's, where a step passes for a line
        (lambda t: 0.3 if t >= STEPPED else 0.0, BURSTS_BESIDE_A_STEP, -0.1, 0.5),
        # 0.5 s behind and jittering by 1 ms: a burst of 20 copies a half hour, 0.4 s long, is too
        # short a stretch to measure a drift on
        (lambda t: -0.5 + (0.001 if t % 60 < 0.2 else -0.001), BURSTS, 60.0, 1.0),
    ],
    ids=["clock-stepped-mid-read", "clock-stepped-between-bursts", "bursts-jittering"],
)
def test_behind_istio_on_a_quiet_model_a_clock_that_does_not_drift_is_not_read_as_drifting(
    tmp_path, lag, sent, failed_at, gap
):
    """Reviews s50-2's and s51-1's counter-cases to a line through the read: a clock stepped
    within it (between two bursts too), and 1 ms of jitter in a short burst, read as steep
    drifts, sent retries' copies to their failed attempts. Where the pairs lie on no line, or
    span too short a stretch to measure one, or lie in two bursts (``_drift_lines``), the pod's
    offset is their median: every retry compared in its hour."""
    counted, right = quiet_hours(tmp_path, lag, sent, 20, failed_at, gap)
    assert counted == right


@pytest.mark.parametrize("first_copied", [False, True])
def test_behind_istio_the_copy_of_an_id_sent_again_past_the_hour_is_its_retrys_hours_only(tmp_path, first_copied):
    """Behind Istio, 50 ids sent before the hour's end (120 s before, not sampled; or 30 s before,
    sampled, the copy agreeing but written after the hour's close) and again 10 s past it, the
    retry's copy (1 s after it, written on time) disagreeing. The retry's copy, stamped within
    the hour's margin, was paired with the first request in the hour too: ('fail', 50 pairs) for
    the hour of a request whose copy was not made or agreed; and with the first copy read, the
    next hour paired its retry with the first request's copy: ('pass', 50, 1.0), a bad shadow
    passing. Each copy is its own attempt's (``copy_of``) and in that attempt's hour: the hour
    has no pair, the next fails on its own 50, the first copies late to the hour."""
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    end = hour + timedelta(hours=1)
    e = end.timestamp()
    first = {i: e - (30 if first_copied else 120) + 0.01 * i for i in range(50)}
    again = {i: e + 10 + 0.01 * i for i in range(50)}
    pods_log(tmp_path, {"primary-pod": ("primary", first)}, written=e)
    pods_log(tmp_path, {"primary-pod-2": ("primary", again)}, written=e + 15)
    pods_log(tmp_path, {"shadow-pod-2": ("shadow", {i: t + 1 for i, t in again.items()})}, written=e + 16, top=5)
    this = audit(tmp_path / "log", hour, end, "digits", earlier_hours=24)
    if first_copied:
        late = {i: t + 1 for i, t in first.items()}
        pods_log(tmp_path, {"shadow-pod": ("shadow", late)}, written=closes(end).timestamp() + 60)
    nxt = audit(tmp_path / "log", end, end + timedelta(hours=1), "digits", earlier_hours=24)
    assert (this.rows, this.duplicates, this.input_mismatch) == (0, 0, 0), this.reasons
    judged = (nxt.verdict, nxt.rows, nxt.agreement, nxt.duplicates, nxt.late_earlier)
    assert judged == ("fail", 50, 0.0, 0, 50 if first_copied else 0), nxt.reasons


@pytest.mark.parametrize("earlier_hours", [0, 24])
def test_behind_istio_a_copy_read_without_its_primary_is_not_its_retrys_in_the_next_hour(tmp_path, earlier_hours):
    """Behind Istio, 50 ids sent 60.6 s before the hour's end, each copied (the candidate's pod
    1 s ahead: the copy stamped 59.6 s before the end) and disagreeing, and sent again 5 s past
    the end, not sampled. The next hour reads from ``CLOCK_SKEW_S`` before it: each copy, not
    its primary. The copy, matched to its id's one primary read (the retry, nearest in time),
    was put in the retry's hour without attribution's check that no copy of it can be stamped
    more than ``CLOCK_SKEW_S`` before the id's first primary in the hour: the same 50 copies
    compared in both hours, ('fail', 50) each. The check holds for Istio's copies matched by
    time too (the own mirror's, stamped as their primary, need none): the hour fails on its
    50, the next has no pair."""
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    end = hour + timedelta(hours=1)
    e = end.timestamp()
    first = {i: e - 60.6 + 0.01 * i for i in range(50)}
    again = {i: e + 5 + 0.01 * i for i in range(50)}
    pods_log(tmp_path, {"primary-pod": ("primary", first)}, written=e)
    pods_log(tmp_path, {"primary-pod-2": ("primary", again)}, written=e + 15)
    pods_log(tmp_path, {"shadow-pod": ("shadow", {i: t + 1 for i, t in first.items()})}, written=e + 16, top=5)
    this = audit(tmp_path / "log", hour, end, "digits", earlier_hours=earlier_hours)
    nxt = audit(tmp_path / "log", end, end + timedelta(hours=1), "digits", earlier_hours=earlier_hours)
    assert (this.verdict, this.rows, this.agreement) == ("fail", 50, 0.0), this.reasons
    assert (nxt.verdict, nxt.rows, nxt.duplicates, nxt.input_mismatch) == ("skip", 0, 0, 0), nxt.reasons


@pytest.mark.parametrize("first_sampled", [False, True])
def test_a_late_copy_of_an_id_sent_twice_is_counted_once_lost_paired_or_late(tmp_path, first_sampled):
    """Behind the server's own mirror, 50 ids sent twice within the hour, 30 s apart, the
    retries sampled; the first requests not sampled, the retries' copies written after the
    close; or both sampled, the first requests' copies written after the close, the retries' on
    time. ``lost_late`` took each late copy as its own request's (not late: lost), while
    ``copy_masks`` counted lost only the id's earliest primary of the on-time records: the
    copies were in no figure (('skip', 0 pairs, 0 lost, 0 late), and the next hour's
    ``late_earlier`` 0). Both take a copy's primary from ``copy_of`` on the same records: the 50
    late copies are lost, the on-time ones paired."""
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    end = hour + timedelta(hours=1)
    base = hour.timestamp() + 600
    late = closes(end).timestamp() + 100
    first = {i: base + 0.01 * i for i in range(50)}
    again = {i: at + 30 for i, at in first.items()}
    pods_log(tmp_path, {"pod-a": ("primary", first)}, first_sampled, written=base + 40)
    pods_log(tmp_path, {"pod-b": ("primary", again)}, True, written=base + 40, image="again")
    if first_sampled:
        pods_log(tmp_path, {"shadow": ("shadow", first)}, written=late)
    pods_log(tmp_path, {"shadow2": ("shadow", again)}, written=late if not first_sampled else base + 45, image="again")
    this = audit(tmp_path / "log", hour, end, "digits", earlier_hours=0)
    counted = (this.verdict, this.rows, this.copies_lost, this.late_records)
    assert counted == (("pass", 50, 50, 0) if first_sampled else ("inconclusive", 0, 50, 0)), this.reasons
    nxt = audit(tmp_path / "log", end, end + timedelta(hours=1), "digits", earlier_hours=24)
    assert (nxt.rows, nxt.copies_lost, nxt.late_earlier) == (0, 0, 0), nxt.reasons


def test_behind_istio_a_pair_whose_primary_is_stamped_past_the_hours_close_counts_in_its_primarys_hour_only(
    tmp_path,
):
    """Behind Istio, 50 requests stamped 5 s past the hour's close (``closes``), their copies
    stamped 10 s earlier by a shadow pod behind, before the close, and written by it; and 5
    shadow records of no request stamped in the close's last minute. The hour's read, to its
    close, held the copies without their primaries: it counted 50 shadow records without their
    primary (inconclusive), and the next hour paired the same 50: each pair in two hours'
    figures. A pair is its primary's hour's: a shadow record of no primary read stamped within
    ``CLOCK_SKEW_S`` of a range's close (its primary may be stamped past it) is the next
    range's, which reads it and its primary; each record is counted in one hour."""
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    end = hour + timedelta(hours=1)
    close = closes(end).timestamp()
    primaries = {i: close + 5 + 0.01 * i for i in range(50)}
    copies = {i: at - 10 for i, at in primaries.items()}
    orphans = {100 + i: close - 30 + i for i in range(5)}
    pods_log(tmp_path, {"shadow-pod": ("shadow", {**copies, **orphans})}, written=close)
    pods_log(tmp_path, {"primary-pod": ("primary", primaries)}, written=close + 10)
    this = audit(tmp_path / "log", hour, end, "digits", earlier_hours=24)
    shown = (this.verdict, this.rows, this.shadow_without_primary, this.primary_without_shadow, this.late_records)
    assert shown == ("skip", 0, 0, 0, 0), this.reasons
    nxt = audit(tmp_path / "log", end, end + timedelta(hours=1), "digits", earlier_hours=24)
    counted = (nxt.rows, nxt.agreement, nxt.shadow_without_primary, nxt.late_earlier, nxt.duplicates)
    assert counted == (50, 1.0, 5, 0, 0), nxt.reasons


@pytest.mark.parametrize("first_copy", [None, "FAULT"])
def test_the_reasons_name_the_request_compared_of_an_id_sent_again_and_the_pairs_whose_primary_failed(
    tmp_path, first_copy
):
    """Behind Istio (copies 0.15 s behind their primaries), 300 requests whose shadow agrees
    and 60 whose first attempt failed (FAULT), sent again 0.2 s later; the retry succeeded and
    its copy disagrees, the first attempt unsampled or its copy failed too. The retry is
    compared (the earliest request that succeeded with a copy of its own), yet the reasons said
    "60 records repeated ... the earliest compared, the repeats left out" of the unsampled
    first attempts (the earlier ones, left out), and nothing of the 60 pairs whose primary
    failed (in summary.json and report.md alone). The duplicates' reason says which request of
    an id is compared; the pairs whose primary failed have a reason with their count."""
    hour, end, base, ok, _, _ = retry_scene()
    first = {i: base + 100 + 0.5 * (i - 300) for i in range(300, 360)}
    again = {i: at + 0.2 for i, at in first.items()}
    pods_log(tmp_path, {"pod-a": ("primary", ok)}, written=base + 140)
    pods_log(tmp_path, {"pod-a": ("primary", first)}, written=base + 141, outcome="FAULT")
    pods_log(tmp_path, {"pod-b": ("primary", again)}, written=base + 145)
    pods_log(tmp_path, {"shadow": ("shadow", {i: t - 0.15 for i, t in ok.items()})}, written=base + 150)
    if first_copy:
        copies = {i: t - 0.15 for i, t in first.items()}
        pods_log(tmp_path, {"shadow": ("shadow", copies)}, written=base + 150, outcome=first_copy)
    retries = {i: t - 0.15 for i, t in again.items()}
    pods_log(tmp_path, {"shadow": ("shadow", retries)}, written=base + 151, top=5)
    result = audit(tmp_path / "log", hour, end, "digits", earlier_hours=0)
    assert (result.verdict, result.rows, result.agreement) == ("fail", 360, 300 / 360), result.reasons
    repeats = [r for r in result.reasons if "repeated the request id" in r]
    failed = [r for r in result.reasons if "primary failed" in r]
    assert not any("the earliest compared" in r for r in result.reasons), result.reasons
    if first_copy is None:
        assert (result.duplicates, result.primary_failed, failed) == (60, 0, []), result.reasons
        assert repeats == [
            "60 records repeated the request id and item of another (a client re-sending it, a copy made "
            "twice): of each request id and item one request compared (the earliest that succeeded with a "
            "copy of its own that ran, a retry where an earlier attempt failed or had none; else the earliest "
            "with such a copy, else the earliest that succeeded, else the earliest), the repeats left out"
        ]
    else:
        assert (result.duplicates, result.primary_failed, repeats) == (0, 60, []), result.reasons
        assert failed == [
            "60 pairs whose primary failed (the request answered with an error: its copy no comparison), "
            "left out; of a request id sent again, a request that succeeded with a copy of its own is compared"
        ]


@pytest.mark.parametrize("first_copy", ["DROPPED", None])
def test_an_id_whose_copies_all_dropped_is_its_retry_that_succeeded(tmp_path, first_copy):
    """Behind the server's own mirror under load: 300 requests whose shadow agrees, and 60 ids
    whose first attempt failed (FAULT), sent again 5 s later (the retry succeeded); no copy of
    either attempt ran (both dropped, or the first not sampled and the retry's dropped). Of an
    id's primaries the request is the one compared had its copy run: the earliest that succeeded
    with a copy that ran, and where none ran, the earliest that succeeded (2 + failed in
    ``copy_of``'s rank). Had the first attempt's copy run, the retry would still be compared
    (a failed primary is no comparison); so the dropped copies cost the retry's comparison, and
    the id counts once among the primaries a mirror could sample, as the request that succeeded
    (the earliest attempt, failed, is none: the id was left out of them). This pins it: each
    id's request is its retry, 360 primaries mirrorable, the dropped copies counted, the
    failed attempts repeats (no pair whose primary failed)."""
    hour, end, base, ok, first, again = retry_scene()
    pods_log(tmp_path, {"pod-a": ("primary", ok)}, True, written=base + 110)
    pods_log(tmp_path, {"pod-a": ("primary", first)}, True, written=base + 111, outcome="FAULT")
    pods_log(tmp_path, {"pod-b": ("primary", again)}, True, written=base + 115)
    pods_log(tmp_path, {"shadow": ("shadow", ok)}, written=base + 120)
    if first_copy:
        pods_log(tmp_path, {"shadow": ("shadow", first)}, written=base + 120, outcome=first_copy)
    pods_log(tmp_path, {"shadow": ("shadow", again)}, written=base + 121, outcome="DROPPED")
    records = predictionlog.read(tmp_path / "log", hour, end)
    chosen, _, _ = predictionlog.copy_of(records)
    retried = records["request_id"].isin([f"r{i}" for i in again]).to_numpy(bool)
    assert (chosen & retried).sum() == 60
    assert (records["outcome"][chosen & retried] == "ok").all()  # (each id's retry, not its failed attempt)
    result = audit(tmp_path / "log", hour, end, "digits", earlier_hours=0)
    counted = (result.verdict, result.rows, result.duplicates, result.primary_failed, result.shadow_dropped)
    assert counted == ("pass", 300, 60, 0, 120 if first_copy else 60), result.reasons
    assert result.primaries_mirrorable == 360


def test_copies_pending_waits_for_the_copy_of_a_retry_whose_first_attempt_failed(tmp_path):
    """Behind the server's own mirror, 50 ids whose first attempt failed (FAULT, its copy run
    and written) 20 s before the range's end, sent again 10 s later (answered, sampled), the
    retries' copies not yet written. copies_pending looked for a copy by key alone: each id had
    one (the failed attempt's), so nothing was pending and the audit ran, comparing nothing of
    those ids (the failed attempts' pairs ``primary_failed``); once the retries' copies came,
    ``copy_of`` compares each retry with its own. A primary waits for its own copy
    (``copy_of``'s): the retries are pending until their copies are written."""
    end = datetime(2026, 3, 1, 11, tzinfo=UTC)
    e = end.timestamp()
    first = {i: e - 20 + 0.01 * i for i in range(50)}
    again = {i: at + 10 for i, at in first.items()}
    pods_log(tmp_path, {"pod-a": ("primary", first)}, True, written=e - 15, outcome="FAULT")
    pods_log(tmp_path, {"shadow": ("shadow", first)}, written=e - 15, outcome="FAULT")
    log = pods_log(tmp_path, {"pod-b": ("primary", again)}, True, written=e - 5)
    newest = copies_pending(log, end, "digits", "1")
    assert newest is not None
    assert abs(newest.timestamp() - max(again.values())) < 1e-3  # (the newest retry)
    pods_log(tmp_path, {"shadow": ("shadow", again)}, written=e + 1)
    assert copies_pending(log, end, "digits", "1") is None
