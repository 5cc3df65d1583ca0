"""Slack reports: Block Kit within Slack's limits, posted to a local Slack Web API, or an outbox."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from tests.fakes.slack_api import FakeSlack, check_blocks
from tests.support import CREDENTIALS_IN_TEXT, PEM, samples
from vision_rollout.folders import Folder
from vision_rollout.gates import Check, GuardInputs, evaluate_gate
from vision_rollout.notify import (
    MAX_BLOCKS,
    SlackNotifier,
    latency_accuracy_chart,
    one_line,
    promotion_message,
    rollback_message,
    scrub,
    stage_message,
)
from vision_rollout.spec import RolloutSpec

SPEC = RolloutSpec.from_dict({"candidate_version": "3"})


@pytest.fixture
def slack():
    fake = FakeSlack().start()
    yield fake
    fake.stop()


def test_rollback_names_the_failing_check_with_its_numbers(slack):
    verdict = evaluate_gate(samples(3000, ratio=1.25))
    msg = rollback_message(
        SPEC,
        "the latency gate failed",
        verdict,
        weight=5,
        chart=latency_accuracy_chart(samples(500, ratio=1.25), "digits v3 vs v1"),
    )
    assert check_blocks(msg.blocks) is None
    text = json.dumps(msg.blocks)
    assert "latency_geomean" in text
    assert "worse than the +5% margin" in text
    assert "Interval" in text
    assert "Samples" in text
    result = SlackNotifier("#model-rollouts", token=slack.token, base_url=slack.base_url).send(msg)
    assert result["chart"] is True
    posted = slack.messages()[-1]
    assert posted["channel"] == "#model-rollouts"
    assert posted["text"].startswith("Rolled back digits v3: latency_geomean")
    (png,) = slack.uploads.values()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    complete = [c for c in slack.calls if c["method"] == "files.completeUploadExternal"][-1]
    assert complete["ok"] is True
    assert complete["body"]["thread_ts"] == result["ts"]


def test_stage_and_promotion_messages_fit_slacks_limits(slack):
    guards = GuardInputs(
        p99_series_ms=((0.0, 10.0), (60.0, 12.0)), validation_drop=-0.01, shadow_errors=0, shadow_requests=1000
    )
    verdict = evaluate_gate(samples(2000), guards=guards)
    notifier = SlackNotifier("C123", token=slack.token, base_url=slack.base_url)
    notifier.send(stage_message(SPEC, 25, verdict))
    notifier.send(promotion_message(SPEC, [verdict] * 4))
    assert len(slack.messages()) == 2
    assert all(check_blocks(m["blocks"]) is None for m in slack.messages())
    # The reviewer reads every stage's evidence, not only the last one's.
    promoted = json.dumps(slack.messages()[1]["blocks"])
    for weight in SPEC.stages:
        assert f"*{weight}%*: {verdict.decision.upper()} at look 1 of 1." in promoted
    assert promoted.count("geometric-mean latency") == 4
    assert promoted.count("Error rate") == 4


def test_long_texts_and_many_checks_are_cut_to_the_limits(slack):
    many = tuple(Check(f"check_{i}", "fail", "x" * 5000, "m") for i in range(80))
    verdict = evaluate_gate(samples(200))
    verdict = type(verdict)("fail", many, 1, 1, 0.05, 0.05, "obrien-fleming")
    msg = stage_message(SPEC, 5, verdict)
    assert len(msg.blocks) == MAX_BLOCKS
    assert check_blocks(msg.blocks) is None
    SlackNotifier("C123", token=slack.token, base_url=slack.base_url).send(msg)
    assert slack.calls[-1]["ok"] is True
    # A field holds 2,000 characters (a section's text 3,000): the failing check's method, long.
    long_method = type(verdict)("fail", (Check("odd", "fail", "x", "m" * 2500),), 1, 1, 0.05, 0.05, "obrien-fleming")
    msg = rollback_message(SPEC, "a reason", long_method, 5)
    assert check_blocks(msg.blocks) is None
    SlackNotifier("C123", token=slack.token, base_url=slack.base_url).send(msg)
    assert slack.calls[-1]["ok"] is True


def test_a_report_over_slacks_limits_is_cut_with_a_truncated_note_not_refused(slack, tmp_path):
    """A message of more than 50 blocks raised ValueError out of send (the report in neither
    Slack nor the outbox); texts cut to Slack's 12,000 characters ended in "…" with nothing
    telling the reviewer the report was cut. Both are cut and say so in a last context block."""
    from vision_rollout.notify import Message, section

    outbox = Folder(str(tmp_path / "outbox"))
    notifier = SlackNotifier("#c", token=slack.token, base_url=slack.base_url, outbox=outbox)
    result = notifier.send(Message("many", [section(f"block {i}") for i in range(60)]))
    assert result["ts"]
    (posted,) = slack.messages()
    assert len(posted["blocks"]) == MAX_BLOCKS
    assert "truncated" in posted["blocks"][-1]["elements"][0]["text"]
    assert "11 more" in posted["blocks"][-1]["elements"][0]["text"]
    notifier.send(Message("z" * 50_000, [section("y" * 2900) for _ in range(6)]))
    assert len(slack.messages()[1]["text"]) <= 3000
    cut = slack.messages()[1]["blocks"]
    assert check_blocks(cut) is None
    assert cut[-1]["type"] == "context"
    assert "truncated" in cut[-1]["elements"][0]["text"]
    assert outbox.names() == []


def test_a_wrong_token_is_an_error_not_a_silent_loss(slack):
    from slack_sdk.errors import SlackApiError

    with pytest.raises(SlackApiError, match="invalid_auth"):
        SlackNotifier("C1", token="xoxb-wrong", base_url=slack.base_url).send(
            stage_message(SPEC, 5, evaluate_gate(samples(200)))
        )


@pytest.mark.parametrize("failure", ["outage", "down", "refused token", "cut off"])
def test_when_slack_fails_the_report_lands_in_the_outbox(slack, tmp_path, failure):
    """A Slack outage failed the notify task after the decision was made (and, after a
    promotion, a failed task runs the failure callback). The report now lands in the outbox,
    the error with it, and the task goes on."""
    message = rollback_message(SPEC, "the 20% stage: hard guard tripped", None)
    token = "xoxb-wrong" if failure == "refused token" else slack.token
    if failure == "outage":
        slack.outage = 503
    elif failure == "down":
        slack.stop()
    elif failure == "cut off":  # (http.client's IncompleteRead: not an OSError)
        slack.cut = True
    notifier = SlackNotifier("C1", token=token, base_url=slack.base_url, outbox=Folder(str(tmp_path / "outbox")))
    result = notifier.send(message)
    expected = {
        "outage": "upstream connect error",
        "down": "refused",
        "refused token": "invalid_auth",
        "cut off": "incompleteread",
    }[failure]
    assert expected in result["slack_error"].lower(), result
    record = json.loads((tmp_path / "outbox" / result["outbox"].rsplit("/", 1)[1]).read_text())
    assert record["text"] == message.text
    assert record["slack_error"] == result["slack_error"]
    assert slack.messages() == []


def test_why_slack_refused_a_report_is_one_short_line(slack, tmp_path):
    """An outage's error page (a proxy's HTML, many lines) was kept whole as the report's
    ``slack_error``: in the notify task's XCom, the outbox file, the log and the run's failure
    message, line breaks and all. It is one line of 500 characters at most, naming the status."""
    slack.outage = 502
    slack.outage_body = b"<html>\n<head><title>502 Bad Gateway</title></head>\n" + b"<p>x</p>\n" * 2000 + b"</html>"
    outbox = Folder(str(tmp_path / "outbox"))
    result = SlackNotifier("C1", token=slack.token, base_url=slack.base_url, outbox=outbox).send(
        rollback_message(SPEC, "x")
    )
    error = result["slack_error"]
    assert "\n" not in error
    assert len(error) <= 500
    assert "502" in error
    record = json.loads((tmp_path / "outbox" / result["outbox"].rsplit("/", 1)[1]).read_text())
    assert record["slack_error"] == error


@pytest.mark.parametrize(
    ("step", "error"),
    [
        ("files.getUploadURLExternal", "missing_scope"),
        ("upload", "HTTP Error 500"),
        ("files.completeUploadExternal", "not_in_channel"),
    ],
)
def test_each_step_of_the_charts_upload_failing_leaves_the_report_posted_and_says_why(slack, tmp_path, step, error):
    outbox = Folder(str(tmp_path / "outbox"))
    slack.refuse = {step: error}
    result = SlackNotifier("#c", token=slack.token, base_url=slack.base_url, outbox=outbox).send(
        rollback_message(SPEC, "x", chart=b"\x89PNG chart")
    )
    assert result["ts"]
    assert len(slack.messages()) == 1
    assert error in result["chart_error"]
    assert "\n" not in result["chart_error"]
    assert "chart" not in result
    if step != "upload":  # (refused by Slack: nothing waits; the upload's 500: the chart waits, below)
        assert outbox.names() == []  # (posted: nothing waits)


def test_a_chart_whose_upload_failed_for_a_while_waits_in_the_outbox_for_the_reports_thread(slack, tmp_path):
    """The upload URL answering 500 (or timing out): the report was posted, its chart lost for
    good. The chart now waits in the outbox with a mark of the post: a later round uploads it
    into the report's thread, the report not posted again; a round meeting the failure again
    keeps it waiting, and fails nothing (the report reached Slack)."""
    from slack_sdk import WebClient

    from vision_rollout.notify import POSTED, send_waiting

    outbox = Folder(str(tmp_path / "outbox"))
    slack.refuse = {"upload": "HTTP Error 500"}
    result = SlackNotifier("#c", token=slack.token, base_url=slack.base_url, outbox=outbox).send(
        rollback_message(SPEC, "x", chart=b"\x89PNG chart")
    )
    assert result["ts"]
    assert "HTTP Error 500" in result["chart_error"]
    stem = result["outbox"].rsplit("/", 1)[1].removesuffix(".json")
    assert outbox.names() == sorted([f"{stem}.json", f"{stem}.png", stem + POSTED])
    client = WebClient(token=slack.token, base_url=slack.base_url)
    (again,) = send_waiting(outbox, client)  # (still failing: waits, fails nothing)
    assert again["sent"] is True
    assert "error" not in again
    assert "chart_error" in again
    assert len(outbox.names()) == 3
    slack.refuse = {}
    (done,) = send_waiting(outbox, client)
    assert done["posted_before"] is True
    assert done["chart"] is True
    (complete,) = [c for c in slack.calls if c["method"] == "files.completeUploadExternal"]
    assert complete["body"]["thread_ts"] == result["ts"]
    assert len(slack.messages()) == 1  # (posted once, its chart in its thread)
    assert outbox.names() == []


@pytest.mark.parametrize("failing", [".posted", ".png", ".json"])
def test_a_chart_that_cannot_wait_in_the_outbox_leaves_the_post_slack_took_the_answer(
    slack, tmp_path, caplog, monkeypatch, failing
):
    """The report posted, its chart's upload failing for a while, and the outbox failing as its
    chart was to wait there (a full disk, an I/O error: the write of its mark, its chart or its
    report): the OSError went up from ``send`` with the post dropped, the caller (the run's task)
    failing, its retry posting the report again. The post is the answer, the outbox's error in
    its ``chart_error`` and logged as a warning; no round posts it again."""
    import errno
    import logging

    from slack_sdk import WebClient

    from vision_rollout.notify import CLAIM_S, LEFTOVER_AGE_S, prune_outbox, send_waiting

    outbox = Folder(str(tmp_path / "outbox"))
    real_write = Folder.write

    def failing_write(self, name, data):
        if name.endswith(failing):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, name, data)

    monkeypatch.setattr(Folder, "write", failing_write)
    slack.refuse = {"upload": "HTTP Error 500"}
    with caplog.at_level(logging.WARNING):
        result = SlackNotifier("#c", token=slack.token, base_url=slack.base_url, outbox=outbox).send(
            rollback_message(SPEC, "x", chart=b"\x89PNG chart")
        )
    assert len(slack.messages()) == 1
    (posted,) = slack.history[result["channel"]]
    assert result["ts"] == posted["ts"]
    assert "HTTP Error 500" in result["chart_error"]
    assert "No space left on device" in result["chart_error"]
    assert "outbox" not in result
    assert "but the outbox failed after: [Errno 28] No space left on device" in caplog.text
    slack.refuse = {}
    assert send_waiting(outbox, WebClient(token=slack.token, base_url=slack.base_url)) == []
    assert len(slack.messages()) == 1
    prune_outbox(outbox, time.time() + max(CLAIM_S, LEFTOVER_AGE_S) + 1)  # (what was written of it)
    assert outbox.names() == []


def test_a_post_slack_may_have_taken_that_cannot_wait_in_the_outbox_is_answered_not_raised(
    slack, tmp_path, monkeypatch, caplog
):
    """A post whose answer was lost (Slack may have taken it) and an outbox that fails as the
    report was to wait there (a full disk): the OSError went up from ``send``, the caller (a
    task) failing and its retry posting the report a second time where the first had landed.
    Now the answer says so: ``maybe_posted``, no ``outbox``, both errors in ``slack_error``,
    logged; the report is posted once. A post Slack surely did not take (its own refusal) whose
    outbox fails still raises: nothing posted, nothing kept, the caller's retry posts it once."""
    import errno
    import logging

    def full(self, name, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Folder, "write", full)
    notifier = SlackNotifier("#c", token=slack.token, base_url=slack.base_url, outbox=Folder(str(tmp_path / "o")))
    slack.lose_answers = 1
    with caplog.at_level(logging.WARNING):
        result = notifier.send(rollback_message(SPEC, "lost answer"))
    assert result["maybe_posted"] is True
    assert result["channel"] == "#c"
    assert "outbox" not in result
    assert "incompleteread" in result["slack_error"].lower()
    assert "cannot be kept in the outbox" in result["slack_error"]
    assert "No space left on device" in result["slack_error"]
    assert "may have taken" in caplog.text
    assert len(slack.messages()) == 1
    slack.refuse = {"chat.postMessage": "invalid_auth"}
    with pytest.raises(OSError, match="No space left"):
        notifier.send(rollback_message(SPEC, "refused"))
    assert len(slack.messages()) == 1


@pytest.mark.parametrize("error", ["channel_not_found", "invalid_auth", "down", "unusable", "no token"])
def test_a_report_slack_did_not_take_whose_outbox_fails_raises_naming_both(slack, tmp_path, monkeypatch, caplog, error):
    """Slack refusing a post (``channel_not_found`` for good, ``invalid_auth``), not reached
    (down) or not to be used (a connection the provider refuses) while the outbox fails too (a full disk): the outbox's OSError went up alone, what
    Slack said only in the log (or nowhere), the operator not told why the report is lost. The
    OSError raised (ENOSPC still) names both: Slack's error, and that the report could not be
    kept in the outbox, with its path. So does it without a Slack token, where it was a bare
    OSError: that there is no token, the outbox, and that the report is lost."""
    import errno

    from vision_rollout.notify import NotKept

    def full(self, name, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Folder, "write", full)
    if error == "down":
        slack.stop()
    else:
        slack.refuse = {"chat.postMessage": error}
    outbox = Folder(str(tmp_path / "o"))
    if error == "unusable":
        notifier = SlackNotifier("#c", outbox=outbox, unusable="the connection's host is no URL")
    elif error == "no token":
        notifier = SlackNotifier("#c", outbox=outbox)
    else:
        notifier = SlackNotifier("#c", token=slack.token, base_url=slack.base_url, outbox=outbox)
    with pytest.raises(NotKept) as e:
        notifier.send(rollback_message(SPEC, "x"))
    message = str(e.value)
    assert isinstance(e.value, OSError)
    assert e.value.errno == errno.ENOSPC
    assert {"down": "refused", "unusable": "no URL", "no token": "there is no Slack token"}.get(error, error) in message
    assert message.startswith("the report is lost")
    where = outbox / "refused" if error == "channel_not_found" else outbox
    assert f"could not be kept in the outbox ({where})" in message
    assert "No space left on device" in message
    assert "in the outbox" not in caplog.text  # (not logged as kept there)
    assert slack.messages() == []
    if error == "no token":  # (a task's report: send_report writes it as send does)
        from vision_rollout.notify import report_name, send_report

        with pytest.raises(NotKept, match="there is no Slack token"):
            send_report(notifier, rollback_message(SPEC, "x"), report_name())


@pytest.mark.parametrize("how", ["pickle", "copy", "deepcopy"])
def test_a_report_not_kept_can_be_pickled_and_copied(how):
    """NotKept and PostedNotKept, OSErrors built from more than their message, could not be
    pickled nor copied (a TypeError: their __init__ given the message alone): an error a process
    pool or a result backend hands on was lost in another error. They come back as they were."""
    import copy
    import errno
    import pickle

    from vision_rollout.notify import NotKept, PostedNotKept

    back = {"pickle": lambda e: pickle.loads(pickle.dumps(e)), "copy": copy.copy, "deepcopy": copy.deepcopy}[how]
    full = OSError(errno.ENOSPC, "No space left on device")
    for error in (
        NotKept("invalid_auth", Folder("/o"), full),
        PostedNotKept("r.json", {"channel": "C1", "ts": "1.0"}, full),
    ):
        again = back(error)
        assert type(again) is type(error)
        assert str(again) == str(error)
        assert again.errno == error.errno
        assert getattr(again, "post", None) == getattr(error, "post", None)


@pytest.mark.parametrize("unsure", [False, True])
def test_the_outbox_error_a_report_not_kept_names_is_scrubbed(slack, tmp_path, monkeypatch, caplog, unsure):
    """An outbox in an object store whose error quotes its URL, credentials and all: NotKept (and
    the answer of a post Slack may have taken) put it in the message as it was, cut to 300
    characters, into the task log and the run's failure. Its credentials are ``***`` now."""
    import http.client

    from vision_rollout import notify

    def failing(self, name, data):
        raise OSError("PUT https://alice:s3cr%21t@minio.internal:9000/outbox failed")

    monkeypatch.setattr(Folder, "write", failing)
    notifier = SlackNotifier("#c", token=slack.token, base_url=slack.base_url, outbox=Folder(str(tmp_path / "o")))
    if unsure:  # (the post cut off: Slack may have taken it)
        monkeypatch.setattr(
            notify.SlackNotifier, "_post", lambda *a: (_ for _ in ()).throw(http.client.IncompleteRead(b""))
        )
        said = notifier.send(rollback_message(SPEC, "x"))["slack_error"]
    else:
        slack.refuse = {"chat.postMessage": "invalid_auth"}
        with pytest.raises(notify.NotKept) as e:
            notifier.send(rollback_message(SPEC, "x"))
        said = str(e.value)
    assert "minio.internal" in said
    assert "s3cr" not in said
    assert "s3cr" not in caplog.text


@pytest.mark.parametrize("error", ["invalid_auth", "channel_not_found"])
def test_a_report_written_into_the_outbox_whose_folder_sync_fails_is_kept_not_lost(
    slack, tmp_path, monkeypatch, caplog, error
):
    """A report Slack did not take, renamed into place in the outbox, whose folder's fsync then
    failed (an I/O error on NFS): NotKept said "the report is lost" while it waited there, and
    the outbox's next round sent it. It is kept: the answer names where, the error is logged."""
    import errno
    from pathlib import Path

    import model_server.files as files
    from vision_rollout.notify import waiting_reports

    def eio(path):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(files, "sync_folder", eio)
    slack.refuse = {"chat.postMessage": error}
    outbox = Folder(str(tmp_path / "o"))
    notifier = SlackNotifier("#c", token=slack.token, base_url=slack.base_url, outbox=outbox)
    result = notifier.send(rollback_message(SPEC, "x"))
    folder = outbox / "refused" if error == "channel_not_found" else outbox
    assert result["outbox"].startswith(str(folder))
    assert Path(result["outbox"]).is_file()
    assert error in result["slack_error"]
    assert "Input/output error" in caplog.text
    if error == "invalid_auth":
        assert [w.name for w in waiting_reports(outbox)] == [Path(result["outbox"]).name]


def _charts(slack, posted):
    """The charts in the thread of the report ``posted`` (its channel and ts)."""
    return [f for r in slack.thread_replies(posted["channel"], posted["ts"]) for f in r.get("files", [])]


@pytest.mark.parametrize("how", ["answer lost", "sender killed"])
def test_a_chart_slack_took_whose_answer_was_lost_is_not_uploaded_again(slack, tmp_path, how):
    """files.completeUploadExternal carried out, its answer lost (the connection dropped), or the
    sender killed right after it: the chart waited in the outbox with its report's mark and the
    next round uploaded it into the thread again, a reviewer seeing it twice. The round looks in
    the report's thread first (conversations.replies): found, the chart is not uploaded again."""
    from slack_sdk import WebClient

    from vision_rollout.notify import send_waiting

    outbox = Folder(str(tmp_path / "outbox"))
    message = rollback_message(SPEC, "x", chart=b"\x89PNG chart")
    if how == "answer lost":
        slack.lose = {"files.completeUploadExternal": 1}
        posted = SlackNotifier("#c", token=slack.token, base_url=slack.base_url, outbox=outbox).send(message)
        assert "chart_error" in posted
    else:
        SlackNotifier("#c", outbox=outbox).send(message)
        dying = WebClient(token=slack.token, base_url=slack.base_url)
        upload = dying.files_upload_v2

        class Killed(BaseException):
            pass

        def uploaded_then_killed(**kwargs: object) -> None:
            upload(**kwargs)
            raise Killed

        dying.files_upload_v2 = uploaded_then_killed  # type: ignore[method-assign]
        with pytest.raises(Killed):
            send_waiting(outbox, dying)
        posted = {"channel": "C0ROLLOUT", "ts": slack.history["C0ROLLOUT"][0]["ts"]}
    assert len(_charts(slack, posted)) == 1
    (result,) = send_waiting(outbox, WebClient(token=slack.token, base_url=slack.base_url))
    assert result["sent"] is True
    assert result["posted_before"] is True
    assert result["chart"] is True
    assert len(_charts(slack, posted)) == 1  # (the chart once in the report's thread)
    assert [c["method"] for c in slack.calls].count("files.completeUploadExternal") == 1
    assert len(slack.messages()) == 1
    assert outbox.names() == []


def test_a_chart_looked_for_where_slack_refuses_or_does_not_answer(slack, tmp_path, caplog):
    """The thread's look-up refused (no channels:history): the chart is uploaded as before, the
    log saying it may be there twice; not answered (an outage): the chart waits, the report too."""
    from slack_sdk import WebClient

    from vision_rollout.notify import send_waiting

    outbox = Folder(str(tmp_path / "outbox"))
    slack.lose = {"files.completeUploadExternal": 1}
    posted = SlackNotifier("#c", token=slack.token, base_url=slack.base_url, outbox=outbox).send(
        rollback_message(SPEC, "x", chart=b"\x89PNG chart")
    )
    client = WebClient(token=slack.token, base_url=slack.base_url)
    slack.refuse = {"conversations.replies": "internal_error"}
    (result,) = send_waiting(outbox, client)
    assert result["sent"] is True
    assert "chart" not in result
    assert "internal_error" in result["chart_error"]
    assert len(outbox.names()) == 3  # (the report, its chart and its mark wait)
    slack.refuse = {}
    slack.scopes.discard("channels:history")
    (result,) = send_waiting(outbox, client)
    assert result["chart"] is True
    assert len(_charts(slack, posted)) == 2
    assert outbox.names() == []
    assert any("perhaps a second time" in r.getMessage() and "missing_scope" in r.getMessage() for r in caplog.records)


def test_outbox_files_sort_in_the_order_sent_across_a_second_boundary(tmp_path, monkeypatch):
    """Readers take the newest report as the last file name: one clock reading names each."""
    import time

    from vision_rollout.notify import Message

    second = 1_795_000_000 * 10**9
    readings = iter([second + 999_999_999, second + 10**9 + 1])  # 1 ns apart, across the boundary
    monkeypatch.setattr(time, "time_ns", lambda: next(readings))
    notifier = SlackNotifier("#x", outbox=Folder(str(tmp_path)))
    for text in ("first", "second"):
        notifier.send(Message(text=text, blocks=[]))
    names = sorted(p.name for p in tmp_path.glob("*.json"))
    assert [json.loads((tmp_path / n).read_text())["text"] for n in names] == ["first", "second"]


def test_without_a_token_messages_go_to_the_outbox(tmp_path):
    df = samples(400)
    df["correct"] = np.r_[np.ones(380), np.zeros(20), np.ones(370), np.zeros(30)].astype(int)
    msg = rollback_message(
        SPEC, "hard guard: P99 above 60 ms for 2 minutes", evaluate_gate(df), chart=latency_accuracy_chart(df, "v3")
    )
    result = SlackNotifier("#model-rollouts", outbox=Folder(str(tmp_path / "outbox"))).send(msg)
    record = json.loads(open(result["outbox"]).read())
    assert record["channel"] == "#model-rollouts"
    assert (tmp_path / "outbox" / record["chart"]).read_bytes()[:4] == b"\x89PNG"
    assert not list((tmp_path / "outbox").glob(".*.tmp"))
    with pytest.raises(ValueError, match="a token, a client or an outbox"):
        SlackNotifier("#x")


def test_strings_from_elsewhere_reach_slack_escaped_and_on_one_line(slack):
    """A rollback's reason carries text others wrote (a server's error message, an approver's
    name): it reached Slack as mrkdwn as it was, so ``<!channel>`` pinged the whole channel, a
    ``<url|text>`` link said anything, and a line break added a line reading like the report's."""
    reason = (
        "the 5% stage: probe request failed: HTTP 500: <!channel> see <https://evil.example/x|the dashboard> & "
        "more\n*Verdict:* PASS"
    )
    SlackNotifier("#c", token=slack.token, base_url=slack.base_url).send(rollback_message(SPEC, reason))
    posted = slack.messages()[-1]
    sent = [posted["text"], *(b["text"]["text"] for b in posted["blocks"] if b["type"] == "section")]
    assert all("<" not in t and ">" not in t for t in sent)
    assert "&lt;!channel&gt; see &lt;https://evil.example/x|the dashboard&gt; &amp; more *Verdict:* PASS" in sent[0]
    assert sent[1].endswith(
        "*Reason:* the 5% stage: probe request failed: HTTP 500: &lt;!channel&gt; see "
        "&lt;https://evil.example/x|the dashboard&gt; &amp; more *Verdict:* PASS"
    )


def test_escaping_keeps_a_text_within_slacks_limit_without_a_broken_escape(slack):
    from vision_rollout.notify import MAX_TEXT, Message, section

    block = section("x" + "<" * 5000)
    assert len(block["text"]["text"]) <= MAX_TEXT
    assert block["text"]["text"].endswith("&lt;…")
    SlackNotifier("#c", token=slack.token, base_url=slack.base_url).send(Message("<" * 5000, [block]))
    assert slack.calls[-1]["ok"] is True
    assert slack.messages()[-1]["text"].endswith("&lt;…")


@pytest.mark.parametrize("through", ["token", "provider client"])
def test_a_rate_limited_post_is_sent_again_after_retry_after(slack, tmp_path, through):
    """Slack answering 429 (with Retry-After) sent the report to the outbox, and the run failed
    as undelivered; slack-sdk's default handlers retry a refused connection only."""
    from slack_sdk import WebClient

    slack.rate_limited, slack.retry_after = 2, 0
    client = WebClient(token=slack.token, base_url=slack.base_url) if through == "provider client" else None
    notifier = SlackNotifier(
        "#c", token=slack.token, base_url=slack.base_url, client=client, outbox=Folder(str(tmp_path / "outbox"))
    )
    result = notifier.send(rollback_message(SPEC, "hard guard tripped"))
    assert "slack_error" not in result
    assert result["ts"]
    assert [c["method"] for c in slack.calls] == ["chat.postMessage"] * 3
    assert len(slack.messages()) == 1
    assert not (tmp_path / "outbox").exists()


def test_a_rate_limit_past_its_retries_or_too_long_a_wait_goes_to_the_outbox(slack, tmp_path):
    outbox = Folder(str(tmp_path / "outbox"))
    slack.rate_limited, slack.retry_after = 1, 3600  # not waited for an hour
    result = SlackNotifier("#c", token=slack.token, base_url=slack.base_url, outbox=outbox).send(
        rollback_message(SPEC, "x")
    )
    assert "ratelimited" in result["slack_error"]
    assert len(slack.calls) == 1
    slack.rate_limited, slack.retry_after = 5, 0
    result = SlackNotifier("#c", token=slack.token, base_url=slack.base_url, outbox=outbox).send(
        rollback_message(SPEC, "x")
    )
    assert "ratelimited" in result["slack_error"]
    assert len(slack.calls) == 1 + 3  # the call and its two retries
    assert slack.messages() == []


def test_a_failing_checks_numbers_never_read_as_0_or_nan(slack):
    """A p-value that underflowed read "p-value 0", an effect of -0.0 read "-0" and a missing
    interval end "nan"; an inconclusive or warning audit had no icon."""
    from vision_rollout.audit import AuditResult
    from vision_rollout.gates import Verdict
    from vision_rollout.notify import audit_message

    check = Check("latency_geomean", "fail", "slower", "welch", effect=-0.0, ci=(float("nan"), 0.5), p_value=0.0)
    msg = rollback_message(SPEC, "r", Verdict("fail", (check,), 1, 1, 0.05, 0.05, "pocock"))
    SlackNotifier("#c", token=slack.token, base_url=slack.base_url).send(msg)
    fields = [f["text"] for f in slack.messages()[-1]["blocks"][2]["fields"]]
    assert "*Effect*\n+0.00%" in fields
    assert "*Interval*\nn/a to +50.00%" in fields
    assert "*p-value*\n&lt; 1e-300" in fields  # (Slack shows "< 1e-300")
    for verdict in ("inconclusive", "warning"):
        assert (
            audit_message(AuditResult("digits", "s", "e", verdict, ["x"]))
            .blocks[1]["text"]["text"]
            .startswith(":large_yellow_circle: ")
        )


def test_a_failing_checks_fields_are_in_its_unit_and_never_on_its_margin():
    """The fields gave raw fractions beside a sentence in percent: "Effect 0.2747" and "Margin /
    limit 0.05" for a canary 27.47% slower against a 5% margin, 0.05567 for an excess of 5.57 pp.
    And four significant digits put a lower bound just over the margin on it: "Interval 0.05 to
    0.07" beside "Margin / limit 0.05", for a check that failed because the bound is above it."""
    from vision_rollout.gates import GateConfig, Verdict, guard_checks

    def fields(check: Check) -> list[str]:
        msg = rollback_message(SPEC, "r", Verdict("fail", (check,), 1, 1, 0.05, 0.05, "pocock"))
        return [f["text"] for f in msg.blocks[2]["fields"]]

    slower = Check("latency_geomean", "fail", "slower", "welch", effect=0.06, ci=(0.0500004, 0.07), margin=0.05)
    assert {"*Effect*\n+6.00%", "*Interval*\n+5.00004% to +7.00%", "*Margin / limit*\n+5%"} <= set(fields(slower))
    errors = Check("errors", "fail", "errors", "newcombe", effect=0.05567, ci=(0.04911, 0.06296), margin=0.001)
    assert {"*Effect*\n+5.57 pp", "*Interval*\n+4.91 pp to +6.30 pp", "*Margin / limit*\n0.1 pp"} <= set(fields(errors))
    p99 = Check("guard_p99", "fail", "P99 above", "guard", effect=75.25, margin=60.0)
    assert {"*Effect*\n75.25 ms", "*Margin / limit*\n60 ms"} <= set(fields(p99))
    assert not [f for f in fields(p99) if f.startswith("*Samples*")]  # (not "baseline 0, canary 0")
    shadow = Check("guard_shadow_errors", "fail", "shadow", "guard", effect=0.0100001, margin=0.01)
    assert {"*Effect*\n1.00001%", "*Margin / limit*\n1%"} <= set(fields(shadow))
    rate = Check("guard_shadow_errors", "fail", "shadow", "guard", effect=0.00123, margin=0.001)
    assert "*Effect*\n0.123%" in fields(rate)  # (as its sentence: "Shadow error rate is 0.123%")
    (restarts,) = guard_checks(GuardInputs(restarts=2), GateConfig())
    assert {"*Effect*\n2", "*Margin / limit*\n0"} <= set(fields(restarts))  # (a count, its limit)


def test_a_failing_latency_checks_p_value_is_the_evidence_of_harm():
    """The latency check's p-value was its non-inferiority test's (toward a pass): a canary 27%
    slower against a 5% margin read "p-value 1" on the report's failing check. It is the fail
    test's now, below the look's level exactly when the check fails."""
    for ratio, decision in ((1.25, "fail"), (1.0, "pass")):
        verdict = evaluate_gate(samples(3000, ratio=ratio))
        check = next(c for c in verdict.checks if c.name == "latency_geomean")
        assert check.decision == decision
        assert (check.p_value < verdict.nominal_alpha) == (decision == "fail")
    msg = rollback_message(SPEC, "r", evaluate_gate(samples(3000, ratio=1.25)))
    [p] = [f["text"] for f in msg.blocks[2]["fields"] if f["text"].startswith("*p-value*")]
    assert float(p.split("\n")[1].split(" (")[0].replace("&lt; ", "")) < 1e-6


def test_a_failing_tail_checks_report_shows_its_p_value_at_its_level():
    """A rollback on a p95/p99 check showed its interval and margin but no p-value nor level, where
    every other failing check reads "p (level L)": the tail check's p-value is its rule's
    (``gates.tail_p``), beside the look's level it was judged at."""
    from vision_rollout.gates import GateConfig, Verdict, tail_check

    rng = np.random.default_rng(3)
    base, canary = np.exp(rng.normal(1, 0.3, 2000)), 1.6 * np.exp(rng.normal(1, 0.3, 2000))
    check = tail_check(base, canary, 0.99, GateConfig(), 0.0123)
    assert check.decision == "fail"
    msg = rollback_message(SPEC, "r", Verdict("fail", (check,), 3, 10, 0.05, 0.0123, "obrien-fleming"))
    [p] = [f["text"] for f in msg.blocks[2]["fields"] if f["text"].startswith("*p-value*")]
    assert p == f"*p-value*\n{check.p_value:.3g} (level 0.0123)"


def test_a_failing_checks_p_value_is_shown_at_the_level_it_was_judged_at():
    """Each check's boundary is at its own information, but a check carried no level: the
    report's failing errors check showed its p-value beside nothing but the verdict's level
    (the latency checks'), so under uneven traffic it failed at a p above the level printed.
    ``Check.level`` is the check's own, shown beside its p-value, and a record without it reads."""
    from vision_rollout.gates import Information, Verdict, check_information, nominal_alpha

    # Live traffic rising beside the replay's steady rounds: 0.0324 for latency, 0.0344 for errors.
    seen = tuple(Information(*n, 0) for n in ((300, 1000), (600, 1100), (900, 1200), (3000, 3000)))
    verdict = evaluate_gate(samples(3000, errors=(0.0, 0.05)), None, 4, 4, information=seen)
    errors = next(c for c in verdict.checks if c.name == "errors")
    level = nominal_alpha(0.05, 4, 4, "obrien-fleming", check_information("errors", seen))
    assert errors.decision == "fail"
    assert errors.level == level
    assert f"{level:.3g}" != f"{verdict.nominal_alpha:.3g}"  # (the information makes them differ)
    msg = rollback_message(SPEC, "r", verdict)
    [p] = [f["text"] for f in msg.blocks[2]["fields"] if f["text"].startswith("*p-value*")]
    assert p.endswith(f" (level {level:.3g})"), p
    again = Verdict.from_dict(json.loads(json.dumps(verdict.to_dict())))
    assert next(c for c in again.checks if c.name == "errors").level == level
    old = verdict.to_dict()
    for c in old["checks"]:
        del c["level"]
    assert all(c.level is None for c in Verdict.from_dict(old).checks)  # (records before the level)


def test_an_anomaly_with_no_finite_output_reads_so_not_nan_and_inf():
    import pandas as pd

    from vision_rollout.audit import AuditResult
    from vision_rollout.notify import audit_message

    anomalies = pd.DataFrame(
        {
            "image_sha256": ["ab" * 32, "cd" * 32],
            "primary_top1": [1, 2],
            "shadow_top1": [3, 4],
            "shadow_confidence": [float("nan"), 0.3],
            "divergence": [float("inf"), 2.5],
        }
    )
    result = AuditResult("digits", "s", "e", "fail", ["x"], 10, 0, 0.0, 0.9, (0.8, 0.95), 0.1, {}, 0.2)
    result.anomalies = anomalies
    text = audit_message(result).blocks[-1]["text"]["text"]
    assert "`abababababab` primary 1 / shadow 3, no finite output (NaN or Inf)" in text
    assert "`cdcdcdcdcdcd` primary 2 / shadow 4, confidence 0.30, divergence 2.50" in text
    assert "nan" not in text
    assert "inf" not in text.replace("Inf", "")


def test_a_run_link_is_airflows_own_url_of_the_run_or_none():
    """A reviewer in Slack had no way to the run but to search Airflow for it. The link is the
    UI's page of the run under Airflow's base URL, each name quoted; none where no base URL is
    set (a localhost guess leads nowhere), nor from one a link cannot carry, never with its
    credentials."""
    from vision_rollout.notify import run_url

    run_id = "manual__2026-01-01T00:00:00+00:00"
    assert run_url("https://airflow.example.com/prod/", "model_rollout", run_id) == (
        "https://airflow.example.com/prod/dags/model_rollout/runs/manual__2026-01-01T00%3A00%3A00%2B00%3A00"
    )
    assert run_url("https://ops:s3cret@airflow.example.com", "d", "r/../x") == (
        "https://airflow.example.com/dags/d/runs/r%2F..%2Fx"
    )
    for base in (None, "", "  ", "airflow.example.com", "ftp://airflow.example.com", "https://a.example.com/x|y>z"):
        assert run_url(base, "model_rollout", run_id) is None, base


def test_a_report_links_its_run_and_says_where_within_slacks_limits(slack):
    from vision_rollout.notify import with_run

    url = "https://airflow.example.com/dags/model_rollout/runs/manual__1%2B00%3A00"
    where = "model digits, mesh istio, namespace ml: VirtualService digits <!channel>"
    many = tuple(Check(f"check_{i}", "fail", "x" * 5000, "m") for i in range(80))
    full = type(evaluate_gate(samples(200)))("fail", many, 1, 1, 0.05, 0.05, "obrien-fleming")
    for message in (stage_message(SPEC, 5, full), rollback_message(SPEC, "r", full, 5)):
        linked = with_run(message, url, where)
        assert len(linked.blocks) == len(message.blocks) <= MAX_BLOCKS
        fields = [f["text"] for b in linked.blocks for f in b.get("fields", [])]
        assert f"*Airflow run*\n<{url}|manual__1+00:00>" in fields
        assert "*Where*\nmodel digits, mesh istio, namespace ml: VirtualService digits &lt;!channel&gt;" in fields
        SlackNotifier("C1", token=slack.token, base_url=slack.base_url).send(linked)
        assert slack.calls[-1]["ok"] is True
    assert with_run(message) == message


def test_reports_waiting_in_the_outbox_are_sent_once_and_removed_only_when_slack_took_them(slack, tmp_path):
    """Reports Slack did not take waited in the outbox with nothing to send them: the one-machine
    setup's, and any a Slack outage left behind."""
    from slack_sdk import WebClient

    from vision_rollout.notify import send_waiting, waiting_reports

    outbox = Folder(str(tmp_path / "outbox"))
    chart = latency_accuracy_chart(samples(200), "v3")
    slack.outage = 503
    down = SlackNotifier("#model-rollouts", token=slack.token, base_url=slack.base_url, outbox=outbox)
    first = down.send(rollback_message(SPEC, "hard guard tripped", chart=chart))
    SlackNotifier("#model-rollouts", outbox=outbox).send(stage_message(SPEC, 5, evaluate_gate(samples(200))))
    outbox.write("garbage.json", b"{not json")
    waiting = waiting_reports(outbox)
    assert [w.name for w in waiting] == sorted(n for n in outbox.names() if n.endswith(".json"))
    assert waiting[0].slack_error
    assert "upstream connect error" in waiting[0].slack_error
    assert waiting[0].chart == first["outbox"].rsplit("/", 1)[1].replace(".json", ".png")
    assert waiting[1].slack_error is None
    assert waiting[1].channel == "#model-rollouts"
    assert waiting[2].name == "garbage.json"
    assert waiting[2].problem.startswith("not a report")
    client = WebClient(token=slack.token, base_url=slack.base_url)
    # Slack still down: nothing is removed; a round past its budget starts no other report.
    assert [("error" in r) for r in send_waiting(outbox, client)] == [True, True, True]
    ticks = iter(range(0, 1000, 100))
    assert len(send_waiting(outbox, client, clock=lambda: next(ticks), budget_s=350)) == 2
    assert len(outbox.names()) == 4  # (two reports, a chart, the garbage; no claim left)
    slack.outage = None
    results = send_waiting(outbox, client)
    assert [r.get("sent", False) for r in results] == [True, True, False]
    assert results[0]["chart"] is True
    assert outbox.names() == ["garbage.json"]
    assert [m["text"] for m in slack.messages()] == [
        "Rolled back digits v3: hard guard tripped",
        stage_message(SPEC, 5, evaluate_gate(samples(200))).text,
    ]
    assert send_waiting(outbox, client) == [{"name": "garbage.json", "error": waiting[2].problem}]
    assert len(slack.messages()) == 2  # (nothing sent twice)


def test_a_sender_killed_during_the_chart_upload_leaves_a_report_not_posted_again(slack, tmp_path):
    """A report's post and its chart's upload are two calls, the second the slow one: a sender
    killed between them left the report, and the next round posted it a second time."""
    from slack_sdk import WebClient

    from vision_rollout.notify import send_waiting

    outbox = Folder(str(tmp_path / "outbox"))
    SlackNotifier("#c", outbox=outbox).send(rollback_message(SPEC, "late", chart=b"\x89PNG chart"))
    client = WebClient(token=slack.token, base_url=slack.base_url)

    class Killed(BaseException):
        pass

    def killed(**_: object) -> None:
        raise Killed

    dying = WebClient(token=slack.token, base_url=slack.base_url)
    dying.files_upload_v2 = killed  # type: ignore[method-assign]
    with pytest.raises(Killed):
        send_waiting(outbox, dying)
    assert len(slack.messages()) == 1
    (result,) = send_waiting(outbox, client)
    assert result["sent"] is True
    assert result["posted_before"] is True
    assert result["chart"] is True
    (complete,) = [c for c in slack.calls if c["method"] == "files.completeUploadExternal"]
    assert complete["body"]["thread_ts"] == result["ts"]
    assert len(slack.messages()) == 1  # (posted once, its chart in its thread)
    assert outbox.names() == []


def test_a_token_with_a_control_character_never_reaches_an_outbox_rounds_error(slack, tmp_path):
    """A round of the outbox (``rolloutctl outbox send``, each shadow audit's, with the Slack
    connection's token) whose token held a line break gave http.client's refusal as the report's
    error: the header quoted, the token scrubbed only up to the line break, the rest in the log
    and the audit's failure message. It says why, as a new report's error does."""
    from slack_sdk import WebClient

    from vision_rollout.notify import send_waiting

    outbox = Folder(str(tmp_path / "outbox"))
    SlackNotifier("#c", outbox=outbox).send(rollback_message(SPEC, "late"))
    (result,) = send_waiting(outbox, WebClient(token="xoxb-1-abc\r\nX-Part: SECRETPART", base_url=slack.base_url))
    assert "SECRETPART" not in json.dumps(result)
    assert result["error"].startswith("the Slack client refused to send the token")
    assert scrub(result["error"]) == result["error"]  # (no word of it taken for the token)
    assert slack.messages() == []


def test_a_file_in_the_outbox_whose_name_no_folder_takes_is_reported_not_raised(slack, tmp_path):
    """A file named with a backslash (copied in from elsewhere) stopped every round at its claim's
    name, and with it every hourly audit, which sends the outbox first: it is an error line, the
    other reports are sent."""
    from slack_sdk import WebClient

    from vision_rollout.notify import send_waiting

    outbox = Folder(str(tmp_path / "outbox"))
    SlackNotifier("#c", outbox=outbox).send(rollback_message(SPEC, "late"))
    (tmp_path / "outbox" / "a\\b.json").write_text('{"channel": "#c", "text": "t", "blocks": []}')
    results = send_waiting(outbox, WebClient(token=slack.token, base_url=slack.base_url))
    assert [r.get("sent", False) for r in results] == [True, False]
    assert results[1]["name"] == "a\\b.json"
    assert "channel" not in results[1]
    assert results[1]["error"].startswith("not a report: its name")
    assert outbox.names() == ["a\\b.json"]


def test_what_killed_senders_and_writers_left_in_the_outbox_goes_never_a_report(tmp_path):
    """A sender killed after removing its report left its claim, a writer killed between a chart
    and its report the chart, a write killed mid-way its temporary file: each stayed for good.
    An hour on, they go; a report waiting, however old, and all it has, stay."""
    import os
    import time

    from vision_rollout.notify import prune_outbox

    outbox = Folder(str(tmp_path / "outbox"))
    SlackNotifier("#c", outbox=outbox).send(rollback_message(SPEC, "waiting", chart=b"\x89PNG"))
    stem = outbox.names()[0].rsplit(".", 1)[0]
    left = [
        "20260101T000000-000000001-aaaaaa.claim-1767225600000000000-abc123",
        "20260101T000000-000000002-bbbbbb.posted",
        "20260101T000000-000000003-cccccc.png",
        ".20260101T000000-000000004-dddddd.json.77.tmp",
    ]
    kept = [f"{stem}.claim-1767225600000000000-def456", f"{stem}.posted", "notes.txt", "garbage.json"]
    for name in [*left, *kept]:
        outbox.write(name, b"x")
    now = time.time()
    for p in (tmp_path / "outbox").iterdir():
        os.utime(p, (now - 30 * 86400, now - 30 * 86400))
    (tmp_path / "outbox" / "20260101T000000-000000005-eeeeee.png").write_bytes(b"a report's, being written")
    assert prune_outbox(outbox, now, dry_run=True) == sorted(left)
    assert len(outbox.names()) == 10
    assert prune_outbox(outbox, now, limit=3) == sorted(left)[:3]
    assert prune_outbox(outbox, now) == sorted(left)[3:]
    assert outbox.names() == sorted(
        [f"{stem}.json", f"{stem}.png", *kept[:2], "20260101T000000-000000005-eeeeee.png", *kept[2:]]
    )


@pytest.mark.parametrize("store", ["folder", "s3"])
def test_two_senders_at_once_send_each_waiting_report_once(slack, tmp_path, request, store):
    """In a folder or an object store (no rename there, no lock): a claim written beside the
    report, then the listing read back."""
    import threading

    from slack_sdk import WebClient

    from vision_rollout.notify import CLAIM_S, send_waiting

    outbox = Folder(request.getfixturevalue("s3").uri() if store == "s3" else str(tmp_path)) / "outbox"
    for i in range(20):
        SlackNotifier("#c", outbox=outbox).send(rollback_message(SPEC, f"reason {i}"))
    client = WebClient(token=slack.token, base_url=slack.base_url)
    rounds: list[list[dict]] = []
    senders = [threading.Thread(target=lambda: rounds.append(send_waiting(outbox, client))) for _ in range(4)]
    for s in senders:
        s.start()
    for s in senders:
        s.join()
    while outbox.names():  # (racing senders may both withdraw: the next run sends it)
        rounds.append(send_waiting(outbox, client))
    texts = [m["text"] for m in slack.messages()]
    assert sorted(texts) == sorted(set(texts))  # (none twice)
    assert len(texts) == 20
    assert sum(1 for r in rounds for x in r if x.get("sent")) == 20
    # A dead sender's claim (older than CLAIM_S) does not hold a report; a live one does.
    import time

    SlackNotifier("#c", outbox=outbox).send(rollback_message(SPEC, "late"))
    (name,) = outbox.names()
    stem = name.removesuffix(".json")
    outbox.write(f"{stem}.claim-{time.time_ns()}-abc", b"")
    assert send_waiting(outbox, client) == [{"name": name, "skipped": "another sender is sending it"}]
    outbox.delete(next(n for n in outbox.names() if ".claim-" in n))
    outbox.write(f"{stem}.claim-{time.time_ns() - (CLAIM_S + 1) * 10**9}-abc", b"")
    (result,) = send_waiting(outbox, client)
    assert result["sent"] is True
    assert outbox.names() == []


def test_a_senders_claim_lists_its_own_reports_files_not_the_whole_outbox(slack, s3):
    """Each claim listed the whole outbox to see other senders' claims: a round of N waiting
    reports read N + 2 listings of N reports' files each, in an object store pages of 1,000
    keys a request. A claim lists the files of its own report (S3's listing by the key's prefix:
    ``<stem>.``, its claims' names as before, so that older senders and this one see each
    other's); the round lists the folder whole twice (its reports, the marks to sweep)."""
    from urllib.parse import parse_qs, urlsplit

    from slack_sdk import WebClient

    from tests.support.s3proxy import s3_proxy
    from vision_rollout.notify import send_waiting

    prefix = s3.uri().split("?")[0].rsplit("/", 1)[1]
    direct = Folder(s3.uri(prefix)) / "outbox"
    for i in range(6):
        SlackNotifier("#c", outbox=direct).send(rollback_message(SPEC, f"report {i}"))
    stems = sorted(n.removesuffix(".json") for n in direct.names())
    with s3_proxy(s3.port) as proxy:
        outbox = Folder(proxy.uri(s3.bucket, prefix)) / "outbox"
        results = send_waiting(outbox, WebClient(token=slack.token, base_url=slack.base_url))
        listed = [
            parse_qs(urlsplit(seen.path).query).get("prefix", [""])[0]
            for seen in proxy.seen
            if seen.method == "GET" and "list-type=2" in seen.path
        ]
    assert [r.get("sent") for r in results] == [True] * 6
    assert listed.count(f"{prefix}/outbox/") == 2
    assert sorted(p for p in listed if p != f"{prefix}/outbox/") == [f"{prefix}/outbox/{s}." for s in stems]
    assert direct.names() == []


def test_credentials_quoted_in_an_error_never_reach_slack(slack):
    """A reason quotes the errors of servers and clients, and with them what they quote: a URL
    with its user and password, a presigned URL's signature, a token in a query, an
    Authorization header. Slack got them as they were."""
    reason = (
        "the 5% stage: GET https://ops:hunter2@prom.example.com/api/v1/query?query=up&access_token=tok123: 500; "
        "fetch https://bucket.s3.amazonaws.com/k?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=f00d failed; "
        "header Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig; slack xoxb-1234-5678-abcdEFGH"
    )
    SlackNotifier("#c", token=slack.token, base_url=slack.base_url).send(rollback_message(SPEC, reason))
    posted = json.dumps(slack.messages()[-1])
    for secret in ("hunter2", "tok123", "AKIAEXAMPLE", "f00d", "eyJhbGciOiJIUzI1NiJ9", "abcdEFGH"):
        assert secret not in posted
    assert "GET https://***@prom.example.com/api/v1/query?query=up&amp;access_token=***" in posted
    assert "X-Amz-Signature=*** failed" in posted


def test_a_stage_whose_guards_were_blind_for_a_while_says_so_in_the_promotion_and_approval_reports():
    """A stage that baked again the time Prometheus held no sample of the candidate's servers
    (restarted without its storage) passed, and the promotion and approval reports showed its
    evidence lines only: nothing said a breach or a restart then could not be seen."""
    from vision_rollout.notify import approval_message

    blind = GuardInputs(p99_series_ms=((100.0, 20.0), (102.0, 21.0)), unwatched=((1.0, 61.0),))
    verdict = evaluate_gate(samples(3000), guards=blind)
    assert verdict.decision == "pass"
    for msg in (promotion_message(SPEC, [verdict]), approval_message(SPEC, [verdict], "every stage passed", "run", 4)):
        assert check_blocks(msg.blocks) is None
        assert "Prometheus holds no sample of a server serving the candidate for 60 s of this stage" in json.dumps(
            msg.blocks
        )
    plain = evaluate_gate(samples(3000), guards=GuardInputs(p99_series_ms=((100.0, 20.0),)))
    assert "Prometheus holds no sample" not in json.dumps(promotion_message(SPEC, [plain]).blocks)


def test_a_report_slack_refuses_for_good_is_set_aside_once_kept_and_sent_again_on_request(slack, tmp_path):
    """A report for a mistyped channel (channel_not_found), an archived one, one the bot is not
    in stayed in the outbox: every hourly round tried it again and failed its task, until someone
    deleted the file by hand. It is now set aside in ``refused/`` with Slack's reason (one round
    finds it), listed, sent again on request, or dropped deliberately; a refused token is not the
    report's fault and keeps it waiting."""
    from slack_sdk import WebClient

    from vision_rollout.notify import REFUSED, drop_report, send_refused, send_waiting, waiting_reports

    outbox = Folder(str(tmp_path / "outbox"))
    client = WebClient(token=slack.token, base_url=slack.base_url)
    slack.refuse = {"chat.postMessage": "channel_not_found"}
    fresh = SlackNotifier("#typo", token=slack.token, base_url=slack.base_url, outbox=outbox)
    sent = fresh.send(rollback_message(SPEC, "new", chart=b"\x89PNG one"))
    assert sent["refused"] is True
    assert "channel_not_found" in sent["slack_error"]
    assert f"/{REFUSED}/" in sent["outbox"]
    assert outbox.names() == []  # (set aside at once: no round tries it)
    slack.refuse = {}
    slack.outage = 503
    SlackNotifier("#archived", token=slack.token, base_url=slack.base_url, outbox=outbox).send(
        rollback_message(SPEC, "old", chart=b"\x89PNG two")
    )
    slack.outage = None
    slack.refuse = {"chat.postMessage": "is_archived"}
    (result,) = send_waiting(outbox, client)
    assert result["refused"] is True
    assert "is_archived" in result["error"]
    assert result["channel"] == "#archived"
    assert outbox.names() == []
    assert send_waiting(outbox, client) == []  # (the next round: nothing to fail on)
    aside = (outbox / REFUSED).names()
    assert len(aside) == 4  # (two reports, two charts)
    listed = waiting_reports(outbox)
    assert [w.refused is not None for w in listed] == [True, True]
    assert "channel_not_found" in listed[0].refused
    assert "is_archived" in listed[1].refused
    # A refused token: the operator's problem, the report keeps waiting (and failing loudly).
    slack.refuse = {"chat.postMessage": "invalid_auth"}
    SlackNotifier("#ok", outbox=outbox).send(rollback_message(SPEC, "auth"))
    (result,) = send_waiting(outbox, client)
    assert "invalid_auth" in result["error"]
    assert "refused" not in result
    assert len([n for n in outbox.names() if n.endswith(".json")]) == 1
    # The channel fixed: sent again on request where it lies, charts and all; one refused again
    # stays set aside with Slack's new reason.
    slack.refuse = {}
    with pytest.raises(FileNotFoundError):
        send_refused(outbox, client, ["20990101T000000-000000000-abcdef.json"])
    (result,) = send_refused(outbox, client, [listed[1].name])
    assert result["sent"] is True
    assert result["chart"] is True
    assert [r.get("sent") for r in send_waiting(outbox, client)] == [True]
    slack.refuse = {"chat.postMessage": "not_in_channel"}
    (result,) = send_refused(outbox, client)
    assert result["refused"] is True
    assert [w.name for w in waiting_reports(outbox)] == [listed[0].name]
    assert "not_in_channel" in waiting_reports(outbox)[0].refused
    assert len((outbox / REFUSED).names()) == 2  # (the report and its chart, where they were)
    with pytest.raises(FileNotFoundError):
        drop_report(outbox, "20990101T000000-000000000-abcdef.json")
    with pytest.raises(ValueError, match="not a report's name"):
        drop_report(outbox, "../x.json")
    assert drop_report(outbox, listed[0].name) == f"{REFUSED}/{listed[0].name}"
    assert (outbox / REFUSED).names() == []
    assert waiting_reports(outbox) == []


def test_pruning_the_outbox_keeps_the_reports_set_aside_and_takes_their_leftovers(tmp_path, slack):
    """The outbox's ``refused/`` is pruned as the outbox is: a report set aside, however old, and
    its chart stay; a chart whose report was dropped by a killed ``outbox drop`` goes."""
    import os
    import time

    from vision_rollout.notify import REFUSED, prune_outbox

    outbox = Folder(str(tmp_path / "outbox"))
    slack.refuse = {"chat.postMessage": "is_archived"}
    SlackNotifier("#old", token=slack.token, base_url=slack.base_url, outbox=outbox).send(
        rollback_message(SPEC, "aside", chart=b"\x89PNG")
    )
    aside = outbox / REFUSED
    aside.write("20260101T000000-000000003-cccccc.png", b"x")
    now = time.time()
    for p in (tmp_path / "outbox" / REFUSED).iterdir():
        os.utime(p, (now - 30 * 86400, now - 30 * 86400))
    assert prune_outbox(outbox, now) == [f"{REFUSED}/20260101T000000-000000003-cccccc.png"]
    assert len(aside.names()) == 2  # (the report and its chart)


def test_a_posts_mark_written_before_its_report_is_not_swept_by_a_round_meanwhile(slack, tmp_path, monkeypatch):
    """A report posted whose chart must wait is written to the outbox mark first, then chart, then
    report. A round listing the outbox between the mark and the report swept the mark as one
    whose report was gone, and the next round posted the report a second time. A mark is swept
    only once it is older than ``CLAIM_S`` (its writer long dead), its report still absent."""
    import os
    import time

    from slack_sdk import WebClient

    from vision_rollout.notify import CLAIM_S, POSTED, send_waiting

    outbox = Folder(str(tmp_path / "outbox"))
    client = WebClient(token=slack.token, base_url=slack.base_url)
    write = Folder.write
    meanwhile: list[list[dict]] = []

    def writing(self: Folder, name: str, data: bytes) -> str:
        if name.endswith(".png") and not meanwhile:  # (the mark written, the report not yet)
            meanwhile.append(send_waiting(outbox, client))
        return write(self, name, data)

    monkeypatch.setattr(Folder, "write", writing)
    slack.refuse = {"upload": "HTTP Error 500"}
    SlackNotifier("#c", token=slack.token, base_url=slack.base_url, outbox=outbox).send(
        rollback_message(SPEC, "x", chart=b"\x89PNG chart")
    )
    assert meanwhile == [[]]
    assert len([n for n in outbox.names() if n.endswith(POSTED)]) == 1
    slack.refuse = {}
    (done,) = send_waiting(outbox, client)
    assert done["posted_before"] is True
    assert len(slack.messages()) == 1  # (posted once, its chart in its thread)
    assert outbox.names() == []
    # A mark alone (its writer killed before the report, or its sender after removing it) is
    # swept once older than CLAIM_S, not before.
    outbox.write("20261203T000000-000000000-abcdef.posted", b"{}")
    assert send_waiting(outbox, client) == []
    assert outbox.names() == ["20261203T000000-000000000-abcdef.posted"]
    old = time.time() - CLAIM_S - 60
    os.utime(tmp_path / "outbox" / "20261203T000000-000000000-abcdef.posted", (old, old))
    assert send_waiting(outbox, client) == []
    assert outbox.names() == []


def _dying_after_post(slack):
    """A client whose sender dies once Slack took its post, before it can write the mark."""
    from slack_sdk import WebClient

    class Killed(BaseException):
        pass

    client = WebClient(token=slack.token, base_url=slack.base_url)
    post = client.chat_postMessage

    def posted_then_killed(**kwargs: object) -> None:
        post(**kwargs)
        raise Killed

    client.chat_postMessage = posted_then_killed  # type: ignore[method-assign]
    return client, Killed


@pytest.mark.parametrize(("channel", "store"), [("#model-rollouts", "folder"), ("C0ROLLOUT", "folder"), ("#c", "s3")])
def test_a_report_whose_sender_died_once_slack_took_it_is_not_posted_again(
    slack, tmp_path, channel, store, monkeypatch, request
):
    """A sender killed between Slack's answer to chat.postMessage and its ``.posted`` mark left
    the report and its claim: once the claim lapsed (CLAIM_S), the next round posted the report a
    second time. Each report is posted with metadata naming it (its outbox name), and a report
    whose earlier claim lapsed is first looked for in the channel's history since that claim
    (by name: the channel's ID from conversations.list): found, its post is marked from there."""
    from slack_sdk import WebClient

    from vision_rollout import notify
    from vision_rollout.notify import REPORT_EVENT, send_waiting

    outbox = Folder(request.getfixturevalue("s3").uri() if store == "s3" else str(tmp_path)) / "outbox"
    SlackNotifier(channel, outbox=outbox).send(rollback_message(SPEC, "once", chart=b"\x89PNG chart"))
    (name,) = [n for n in outbox.names() if n.endswith(".json")]
    stem = name.removesuffix(".json")
    dying, killed = _dying_after_post(slack)
    real_delete = Folder.delete
    with monkeypatch.context() as m:  # (its claim stays, as a killed process leaves it)
        m.setattr(Folder, "delete", lambda self, n: None if ".claim-" in n else real_delete(self, n))
        with pytest.raises(killed):
            send_waiting(outbox, dying)
    assert [n for n in outbox.names() if ".claim-" in n]
    (first,) = slack.messages()
    assert first["metadata"] == {"event_type": REPORT_EVENT, "event_payload": {"report_id": stem}}
    # Its claim lapses: the next round runs as though the post were CLAIM_S ago and more.
    later = lambda: time.time() + notify.CLAIM_S + 1  # noqa: E731
    (result,) = send_waiting(outbox, WebClient(token=slack.token, base_url=slack.base_url), clock=later)
    assert result["sent"] is True
    assert result["posted_before"] is True
    assert result["chart"] is True
    assert len(slack.messages()) == 1
    (history,) = [c for c in slack.calls if c["method"] == "conversations.history"]
    assert history["body"]["channel"] == "C0ROLLOUT"
    assert history["body"]["include_all_metadata"] == "1"
    assert [c["method"] == "conversations.list" for c in slack.calls].count(True) == (channel.startswith("#"))
    (complete,) = [c for c in slack.calls if c["method"] == "files.completeUploadExternal"]
    assert complete["body"]["thread_ts"] == result["ts"]
    assert outbox.names() == []


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit, "mark refused"])
def test_a_sender_stopped_once_slack_took_the_post_keeps_its_claim_and_it_is_posted_once(
    slack, tmp_path, monkeypatch, stop
):
    """A sender stopped by an exception between Slack's answer and its ``.posted`` mark (Ctrl-C,
    Airflow's SIGTERM or task timeout raised in the task, the store refusing the mark's write)
    removed its claim on the way out, unlike a killed one: nothing told the next round that the
    report may have been posted, and it posted it a second time. The claim stays, as a killed
    sender's: once it lapsed, the next round finds the post in the history."""
    from slack_sdk import WebClient

    from vision_rollout import notify
    from vision_rollout.notify import send_waiting

    outbox = Folder(str(tmp_path / "outbox"))
    SlackNotifier("#model-rollouts", outbox=outbox).send(rollback_message(SPEC, "once"))
    client = WebClient(token=slack.token, base_url=slack.base_url)
    post = client.chat_postMessage

    def posted_then_stopped(**kwargs: object) -> None:
        post(**kwargs)
        raise stop("stopped")

    if stop == "mark refused":  # (the store refusing the mark's write: an OSError out of the round)
        real_write = Folder.write

        def refused(self, name, data):
            if name.endswith(".posted"):
                raise OSError("the store refused the write")
            return real_write(self, name, data)

        with monkeypatch.context() as m:
            m.setattr(Folder, "write", refused)
            with pytest.raises(OSError, match="refused the write"):
                send_waiting(outbox, client)
    else:
        client.chat_postMessage = posted_then_stopped  # type: ignore[method-assign]
        with pytest.raises(stop):
            send_waiting(outbox, client)
    assert len(slack.messages()) == 1
    later = lambda: time.time() + notify.CLAIM_S + 1  # noqa: E731
    (result,) = send_waiting(outbox, WebClient(token=slack.token, base_url=slack.base_url), clock=later)
    assert result["sent"] is True
    assert result["posted_before"] is True
    assert len(slack.messages()) == 1
    assert outbox.names() == []


def test_a_report_whose_answer_was_lost_is_looked_for_before_it_is_posted_again(slack, tmp_path):
    """Slack took a new report but its answer was cut off (a proxy, a timeout): the report went to
    the outbox and the next round posted it a second time. The outbox keeps when that post was
    tried without an answer, and the round finds it in the channel's history first; one that
    failed where Slack surely did not take it (its own error, a 429) is not looked for."""
    from slack_sdk import WebClient

    from vision_rollout.notify import REPORT_EVENT, send_waiting, waiting_reports

    outbox = Folder(str(tmp_path / "outbox"))
    slack.lose_answers = 1
    lost = SlackNotifier("#model-rollouts", token=slack.token, base_url=slack.base_url, outbox=outbox).send(
        rollback_message(SPEC, "lost answer")
    )
    assert "incompleteread" in lost["slack_error"].lower()
    stem = lost["outbox"].rsplit("/", 1)[1].removesuffix(".json")
    (first,) = slack.messages()
    assert first["metadata"] == {"event_type": REPORT_EVENT, "event_payload": {"report_id": stem}}
    (waiting,) = waiting_reports(outbox)
    assert waiting.maybe_posted is not None
    slack.refuse = {"chat.postMessage": "invalid_auth"}
    SlackNotifier("#model-rollouts", token=slack.token, base_url=slack.base_url, outbox=outbox).send(
        rollback_message(SPEC, "refused token")
    )
    slack.refuse = {}
    assert [w.maybe_posted is None for w in waiting_reports(outbox)] == [False, True]
    results = send_waiting(outbox, WebClient(token=slack.token, base_url=slack.base_url))
    assert [(r["sent"], r.get("posted_before", False)) for r in results] == [(True, True), (True, False)]
    assert [m["text"] for m in slack.messages()] == [
        "Rolled back digits v3: lost answer",
        "Rolled back digits v3: refused token",
    ]
    assert [c["method"] for c in slack.calls].count("conversations.history") == 1
    assert outbox.names() == []


def _lost_answer(slack, outbox, text="lost answer"):
    """A report Slack took whose answer was cut off: in the outbox, noted as maybe posted."""
    slack.lose_answers = 1
    SlackNotifier("#model-rollouts", token=slack.token, base_url=slack.base_url, outbox=outbox).send(
        rollback_message(SPEC, text)
    )
    assert len(slack.messages()) == 1


@pytest.mark.parametrize("refused", ["channels:history", "not_in_channel", "channels:read"])
def test_a_report_maybe_posted_is_posted_as_before_where_slack_refuses_the_look_up(slack, tmp_path, refused, caplog):
    """A token without the history's scopes, a bot not in the channel: the look-up is refused, the
    report is posted as before (perhaps twice), never failed for it, and the log says why."""
    from slack_sdk import WebClient

    from vision_rollout.notify import send_waiting

    outbox = Folder(str(tmp_path / "outbox"))
    _lost_answer(slack, outbox)
    if refused.startswith("channels:"):
        slack.scopes.discard(refused)
    else:
        slack.refuse = {"conversations.history": refused}
    (result,) = send_waiting(outbox, WebClient(token=slack.token, base_url=slack.base_url))
    assert result["sent"] is True
    assert "posted_before" not in result
    assert len(slack.messages()) == 2
    assert outbox.names() == []
    (line,) = [r.getMessage() for r in caplog.records if "may have been posted already" in r.getMessage()]
    assert "perhaps a second time" in line
    assert ("missing_scope" if refused.startswith("channels:") else refused) in line


def test_a_look_up_is_bounded_and_one_slack_does_not_answer_keeps_the_report_waiting(slack, tmp_path, monkeypatch):
    """The history is read a bounded number of pages back: a report's post further back is posted
    again, saying so. Slack not answering the look-up (an outage): the report waits, not posted."""
    from slack_sdk import WebClient

    from vision_rollout import notify
    from vision_rollout.notify import send_waiting

    outbox = Folder(str(tmp_path / "outbox"))
    client = WebClient(token=slack.token, base_url=slack.base_url)
    _lost_answer(slack, outbox)
    slack.outage = 503
    (result,) = send_waiting(outbox, client)
    assert "conversations.list" in result["error"]
    assert "upstream connect error" in result["error"]
    assert len(slack.messages()) == 1
    assert len(outbox.names()) == 1
    slack.outage = None
    for i in range(5):
        SlackNotifier("#model-rollouts", token=slack.token, base_url=slack.base_url).send(
            rollback_message(SPEC, str(i))
        )
    monkeypatch.setattr(notify, "LOOKUP_PAGE", 2)
    monkeypatch.setattr(notify, "LOOKUP_PAGES", 2)
    before = len(slack.calls)
    (result,) = send_waiting(outbox, client)
    assert result["sent"] is True
    assert "posted_before" not in result
    assert [c["method"] for c in slack.calls[before:]] == [
        "conversations.list",
        "conversations.history",
        "conversations.history",
        "chat.postMessage",
    ]
    assert [c["body"]["limit"] for c in slack.calls[before + 1 : before + 3]] == ["2", "2"]


@pytest.mark.parametrize(
    "blocks",
    [
        [1],
        [{"type": "section", "text": "a text that is no text object"}],
        [{"type": "section", "fields": [{"type": "mrkdwn", "text": 3}]}],
        [{"type": "section", "text": {"type": "mrkdwn", "text": "x"}}] * 51,
    ],
)
def test_a_waiting_report_whose_blocks_cannot_be_sent_is_not_a_report(slack, tmp_path, blocks):
    """A report file whose blocks are not Block Kit's shape (edited by hand, another writer's)
    failed inside the round (AttributeError, ValueError) as a report Slack did not take: kept
    waiting with its channel, failing every hourly shadow audit (whose round sends the outbox
    first) until someone removed it. It is not a report, as a file that is no JSON: listed and
    answered so, Slack never called, no audit failed for it."""
    from slack_sdk import WebClient

    from vision_rollout.notify import send_waiting, waiting_reports

    outbox = Folder(str(tmp_path / "outbox"))
    name = "20261203T000000-000000000-abcdef.json"
    outbox.write(name, json.dumps({"channel": "#c", "text": "t", "blocks": blocks}).encode())
    (listed,) = waiting_reports(outbox)
    assert listed.problem.startswith("not a report: ")
    (result,) = send_waiting(outbox, WebClient(token=slack.token, base_url=slack.base_url))
    assert result == {"name": name, "error": listed.problem}
    assert slack.calls == []
    assert outbox.names() == [name]


def _refused_with_its_chart(slack, tmp_path):
    """A report with a chart that Slack refused (channel_not_found), set aside in the outbox's
    refused/ with its chart: the outbox, and a client of the fake Slack to send it again."""
    from slack_sdk import WebClient

    outbox = Folder(str(tmp_path / "outbox"))
    client = WebClient(token=slack.token, base_url=slack.base_url)
    slack.refuse = {"chat.postMessage": "channel_not_found"}
    SlackNotifier("#typo", token=slack.token, base_url=slack.base_url, outbox=outbox).send(
        rollback_message(SPEC, "x", chart=b"\x89PNG chart")
    )
    return outbox, client


def test_a_report_set_aside_then_posted_whose_chart_waits_leaves_refused_for_the_outbox(slack, tmp_path):
    """A report sent again from refused/ (the channel fixed) that Slack took, its chart's upload
    failing for a while, stayed in refused/: listed as refused (channel_not_found) though posted,
    its chart uploaded by no round but another --retry-refused. It now waits in the outbox with
    the mark of its post, as a new report's chart does: the next round uploads it into the thread."""
    from vision_rollout.notify import POSTED, REFUSED, send_refused, send_waiting, waiting_reports

    outbox, client = _refused_with_its_chart(slack, tmp_path)
    slack.refuse = {"upload": "HTTP Error 500"}
    (result,) = send_refused(outbox, client)
    assert result["sent"] is True
    assert "chart_error" in result
    assert (outbox / REFUSED).names() == []
    stem = result["name"].removesuffix(".json")
    assert outbox.names() == sorted([f"{stem}.json", f"{stem}.png", stem + POSTED])
    (waiting,) = waiting_reports(outbox)
    assert waiting.refused is None
    assert waiting.slack_error.startswith("its chart was not uploaded: ")
    slack.refuse = {}
    (done,) = send_waiting(outbox, client)
    assert (done["posted_before"], done["chart"]) == (True, True)
    (complete,) = [c for c in slack.calls if c["method"] == "files.completeUploadExternal"]
    assert complete["body"]["thread_ts"] == result["ts"]
    assert len(slack.messages()) == 1
    assert outbox.names() == []


def test_a_report_whose_move_back_to_the_outbox_fails_after_its_mark_leaves_no_mark_there(slack, tmp_path, monkeypatch):
    """A report sent again from refused/ that Slack took, its chart's upload failing, is moved
    back to the outbox, its mark written there first (a report there without its mark would be
    posted again); a failed write of the report itself (a full disk) left that mark, and its
    chart's copy, in the outbox with no report. What was written there is taken back: the report
    stays in refused/ with its mark and chart, the outbox holds nothing of it."""
    from slack_sdk import WebClient

    from vision_rollout.notify import POSTED, REFUSED, send_refused

    outbox = Folder(str(tmp_path / "outbox"))
    client = WebClient(token=slack.token, base_url=slack.base_url)
    slack.refuse = {"chat.postMessage": "channel_not_found"}
    SlackNotifier("#typo", token=slack.token, base_url=slack.base_url, outbox=outbox).send(
        rollback_message(SPEC, "x", chart=b"\x89PNG chart")
    )
    real = Folder.write

    def write(folder: Folder, name: str, data: bytes) -> str:
        if folder == outbox and name.endswith(".json"):  # (the mark and the chart written: the report not)
            raise OSError(28, "No space left on device")
        return real(folder, name, data)

    monkeypatch.setattr(Folder, "write", write)
    slack.refuse = {"upload": "HTTP Error 500"}
    (result,) = send_refused(outbox, client)
    assert result["sent"] is True
    assert "not moved back to the outbox" in result["chart_error"]
    assert "No space left on device" in result["chart_error"]
    stem = result["name"].removesuffix(".json")
    assert (outbox / REFUSED).names() == sorted([f"{stem}.json", f"{stem}.png", stem + POSTED])
    assert outbox.names() == []  # (no stray mark, no chart's copy)


def test_a_report_set_aside_then_posted_whose_move_back_to_the_outbox_fails_stays_aside_named(
    slack, tmp_path, monkeypatch, caplog
):
    """A report sent again from refused/ that Slack took, its chart's upload failing, is moved
    back to the outbox; that move ran outside any handling: a full disk or a folder it may not
    write raised out of the round (PostedNotKept), the reports after it not sent. The failure is
    named in its result and logged; the report stays in refused/ with the mark of its post, its
    chart with it (never lost, never posted twice): a later --retry-refused uploads the chart."""
    import logging

    from vision_rollout.notify import POSTED, REFUSED, send_refused, waiting_reports

    outbox, client = _refused_with_its_chart(slack, tmp_path)
    real = Folder.write

    def write(folder: Folder, name: str, data: bytes) -> str:
        if folder == outbox:  # (the outbox itself, not its refused/: full)
            raise OSError(28, "No space left on device")
        return real(folder, name, data)

    monkeypatch.setattr(Folder, "write", write)
    slack.refuse = {"upload": "HTTP Error 500"}
    with caplog.at_level(logging.WARNING, logger="vision_rollout.notify"):
        (result,) = send_refused(outbox, client)
    assert result["sent"] is True
    assert "not moved back to the outbox" in result["chart_error"]
    assert "No space left on device" in result["chart_error"]
    assert any("not moved back to the outbox" in r.getMessage() for r in caplog.records)
    stem = result["name"].removesuffix(".json")
    assert (outbox / REFUSED).names() == sorted([f"{stem}.json", f"{stem}.png", stem + POSTED])
    assert outbox.names() == []  # (nothing half moved: no mark, no copy)
    monkeypatch.setattr(Folder, "write", real)
    (waiting,) = waiting_reports(outbox)
    assert waiting.refused is not None
    slack.refuse = {}
    (done,) = send_refused(outbox, client)
    assert (done["posted_before"], done["chart"]) == (True, True)
    assert len(slack.messages()) == 1
    assert (outbox / REFUSED).names() == []


def test_a_report_set_aside_then_posted_moved_back_but_not_removed_from_refused_says_both_places(
    slack, tmp_path, monkeypatch
):
    """A report sent again from refused/ that Slack took, its chart's upload failing, written back
    into the outbox but not removed from refused/ (an I/O error), was said to wait "in refused/
    with its mark": it waits in both, each with its mark, and the message says so."""
    from vision_rollout.notify import POSTED, REFUSED, send_refused

    outbox, client = _refused_with_its_chart(slack, tmp_path)
    real = Folder.delete

    def delete(folder: Folder, name: str) -> None:
        if folder == outbox / REFUSED and name.endswith(".json"):
            raise OSError(5, "Input/output error")
        real(folder, name)

    monkeypatch.setattr(Folder, "delete", delete)
    slack.refuse = {"upload": "HTTP Error 500"}
    (result,) = send_refused(outbox, client)
    stem = result["name"].removesuffix(".json")
    assert (outbox / REFUSED).names() == sorted([f"{stem}.json", f"{stem}.png", stem + POSTED])
    assert f"{stem}.json" in outbox.names()
    assert stem + POSTED in outbox.names()
    assert f"it waits in the outbox and in {REFUSED}/, each with its mark" in result["chart_error"]
    assert "Input/output error" in result["chart_error"]


@pytest.mark.parametrize(("failing", "left"), [("posted", "its mark"), ("png", "its chart's copy and its mark")])
def test_a_report_moved_back_to_the_outbox_whose_leftover_in_refused_is_not_removed_is_said_moved_back(
    slack, tmp_path, monkeypatch, caplog, failing, left
):
    """A report sent again from refused/ that Slack took, its chart's upload failing, moved back
    to the outbox (the report and its mark there, the report gone from refused/), whose mark or
    chart in refused/ could not be removed (an I/O error), was said "not moved back to the
    outbox (it waits there)": it waits in the outbox, where the next round uploads its chart; what
    is left in refused/ (its mark; its chart's copy too), strays, is pruned later (prune_outbox).
    The message says so."""
    import logging

    from vision_rollout.notify import POSTED, REFUSED, prune_outbox, send_refused, waiting_reports

    outbox, client = _refused_with_its_chart(slack, tmp_path)
    real = Folder.delete

    def delete(folder: Folder, name: str) -> None:
        if folder == outbox / REFUSED and name.endswith(f".{failing}"):
            raise OSError(5, "Input/output error")
        real(folder, name)

    monkeypatch.setattr(Folder, "delete", delete)
    slack.refuse = {"upload": "HTTP Error 500"}
    with caplog.at_level(logging.WARNING, logger="vision_rollout.notify"):
        (result,) = send_refused(outbox, client)
    assert result["sent"] is True
    stem = result["name"].removesuffix(".json")
    assert outbox.names() == sorted([f"{stem}.json", f"{stem}.png", stem + POSTED])
    assert f"{stem}.json" not in (outbox / REFUSED).names()
    assert "not moved back" not in result["chart_error"]
    assert f"moved back to the outbox; {left} in {REFUSED}/ not removed" in result["chart_error"]
    assert "pruned" in result["chart_error"]
    assert "Input/output error" in result["chart_error"]
    assert any(f"{left} in {REFUSED}/ not removed" in r.getMessage() for r in caplog.records)
    (waiting,) = waiting_reports(outbox)
    assert waiting.refused is None
    monkeypatch.setattr(Folder, "delete", real)
    assert prune_outbox(outbox, time.time() + 2 * 3600)
    assert (outbox / REFUSED).names() == []


@pytest.mark.parametrize("error", ["metadata_must_be_sent_from_app", "invalid_metadata_format", "metadata_too_large"])
def test_a_post_whose_metadata_slack_refuses_is_posted_without_it(slack, tmp_path, error, caplog):
    """Slack refusing a report's metadata (a token that is no app's, a limit) must not cost the
    report: those errors are set aside for good, and a user token was refused every report. It is
    posted again without its metadata, the log saying a lost answer can no longer be found."""
    from slack_sdk import WebClient

    from vision_rollout.notify import send_waiting

    outbox = Folder(str(tmp_path / "outbox"))
    slack.metadata_refused = error
    sent = SlackNotifier("#c", token=slack.token, base_url=slack.base_url, outbox=outbox).send(
        rollback_message(SPEC, "direct")
    )
    assert sent["ts"]
    SlackNotifier("#c", outbox=outbox).send(rollback_message(SPEC, "waiting"))
    (result,) = send_waiting(outbox, WebClient(token=slack.token, base_url=slack.base_url))
    assert result["sent"] is True
    assert [m["text"] for m in slack.messages()] == ["Rolled back digits v3: direct", "Rolled back digits v3: waiting"]
    assert all("metadata" not in m for m in slack.messages())
    assert outbox.names() == []
    lines = [r.getMessage() for r in caplog.records if "without its metadata" in r.getMessage()]
    assert len(lines) == 2
    assert error in lines[0]


def test_an_outbox_report_or_chart_over_its_size_is_named_not_read_whole(tmp_path):
    """The outbox's reports, their charts and their sent marks were read whole, whatever their
    size: a file of gigabytes dropped there (or a run folder's lease.json, a failed reads count)
    was read into the sender's memory. A report over ``MAX_REPORT_BYTES`` is one that cannot be
    sent, named with its size, read no further; one within it is sent as before."""
    from vision_rollout import notify
    from vision_rollout.folders import TooLarge

    outbox = Folder(str(tmp_path))
    padded = b'{"channel": "#c", "text": "t", "blocks": []' + b" " * (2 << 20) + b"}"  # (a valid report)
    outbox.write("big.json", padded)
    outbox.write("small.json", b'{"channel": "#c", "text": "t", "blocks": []}')
    (big, small) = notify.waiting_reports(outbox)
    assert big.problem is not None
    assert "holds over 1048576 bytes" in big.problem
    assert str(tmp_path / "big.json") in big.problem
    assert small.problem is None
    with pytest.raises(TooLarge, match=rf"{tmp_path}/big\.json holds over 10 bytes"):
        outbox.read_within("big.json", 10)


class _Clock:
    """The ``time`` module as a sender whose clock is ``ahead_s`` seconds ahead of Slack's sees it."""

    def __init__(self, ahead_s: float) -> None:
        import time

        self._time, self.ahead_s = time, ahead_s

    def time(self) -> float:
        return self._time.time() + self.ahead_s

    def time_ns(self) -> int:
        return self._time.time_ns() + int(self.ahead_s * 1e9)

    def __getattr__(self, name: str):  # (monotonic, sleep, strftime, ...: as they are)
        return getattr(self._time, name)


@pytest.mark.parametrize("ahead_s", [-3600, 400, 3600])
def test_a_sender_whose_clock_is_off_finds_its_own_post_and_posts_it_once(slack, tmp_path, monkeypatch, ahead_s):
    """A sender whose clock was more than CLOCK_SKEW_S (300 s) ahead of Slack's looked for its
    report's post since its own clock's time of the try, after Slack's time of that post: not
    found, the report was posted a second time. The look-up goes by Slack's clock (its answers'
    Date), the history read back from the newest."""
    from slack_sdk import WebClient

    from vision_rollout import notify
    from vision_rollout.notify import send_waiting

    monkeypatch.setattr(notify, "time", _Clock(ahead_s))
    outbox = Folder(str(tmp_path / "outbox"))
    _lost_answer(slack, outbox)
    for i in range(3):  # (posts after it: the look-up reads past them)
        SlackNotifier("#model-rollouts", token=slack.token, base_url=slack.base_url).send(
            rollback_message(SPEC, str(i))
        )
    monkeypatch.setattr(notify, "LOOKUP_PAGE", 2)
    (result,) = send_waiting(outbox, WebClient(token=slack.token, base_url=slack.base_url))
    assert result["sent"] is True
    assert result.get("posted_before") is True
    assert len(slack.messages()) == 4
    assert outbox.names() == []


def test_a_sender_stalled_past_its_claim_does_not_post_what_another_sender_took_over(slack, tmp_path, monkeypatch):
    """A sender that stalled (a pause, a slow store) between its claim and its post for longer than
    CLAIM_S: another sender took its lapsed claim as a dead sender's and posted the report, then
    the stalled one posted it too. Right before posting, a sender checks that its claim is still
    there and live and the report still waiting; else it withdraws."""
    from slack_sdk import WebClient

    from vision_rollout import notify
    from vision_rollout.notify import send_waiting

    outbox = Folder(str(tmp_path / "outbox"))
    SlackNotifier("#model-rollouts", outbox=outbox).send(rollback_message(SPEC, "once"))
    client = WebClient(token=slack.token, base_url=slack.base_url)
    real = notify._waiting
    stalled: list[list[dict]] = []

    def stall(folder, name):  # (the first sender stalls once it read the report: the other runs)
        found = real(folder, name)
        if not stalled:
            stalled.append([])
            later = time.time() + notify.CLAIM_S + 1  # (the first's claim has lapsed)
            stalled[0] = send_waiting(outbox, client, clock=lambda: later)
        return found

    monkeypatch.setattr(notify, "_waiting", stall)
    (first,) = send_waiting(outbox, client)
    (other,) = stalled[0]
    assert other["sent"] is True
    assert "sent" not in first
    assert "skipped" in first
    assert len(slack.messages()) == 1
    assert outbox.names() == []


def test_a_report_for_a_channel_named_with_capitals_is_found_in_its_history(slack, tmp_path):
    """Slack's channel names are lower case: a report for ``#Model-Rollouts`` whose answer was lost
    was looked for among conversations.list's channels by its name as written, not found, and
    posted a second time. The name is matched as Slack keeps it."""
    from slack_sdk import WebClient

    from vision_rollout.notify import send_waiting

    outbox = Folder(str(tmp_path / "outbox"))
    slack.lose_answers = 1
    SlackNotifier("#Model-Rollouts", token=slack.token, base_url=slack.base_url, outbox=outbox).send(
        rollback_message(SPEC, "capitals")
    )
    assert slack.channels == {"C0ROLLOUT": "model-rollouts"}
    (result,) = send_waiting(outbox, WebClient(token=slack.token, base_url=slack.base_url))
    assert result["sent"] is True
    assert result.get("posted_before") is True
    assert len(slack.messages()) == 1


def test_a_look_up_slack_rate_limits_waits_its_retry_after_and_posts_once(slack, tmp_path, monkeypatch):
    """conversations.history is limited for a new non-Marketplace app to one call a minute of 15
    messages: a look-up needing a second page got a 429 whose Retry-After (60 s) was longer than
    the client's retries wait (30 s), and the report stayed waiting, each round failing the same
    way. The look-up waits out Retry-After (within its time) and finds the post; a wait longer
    than that keeps the report waiting, never posted a second time."""
    from slack_sdk import WebClient

    from vision_rollout import notify
    from vision_rollout.notify import send_waiting

    monkeypatch.setattr(notify, "MAX_RETRY_AFTER_S", 1)  # (Slack's 60 s past the client's retries, here 2 s)
    outbox = Folder(str(tmp_path / "outbox"))
    _lost_answer(slack, outbox)
    for i in range(3):
        SlackNotifier("#model-rollouts", token=slack.token, base_url=slack.base_url).send(
            rollback_message(SPEC, str(i))
        )
    slack.history_most, slack.history_every_s = 2, 2.0
    client = WebClient(token=slack.token, base_url=slack.base_url)
    monkeypatch.setattr(notify, "LOOKUP_WAIT_S", 1, raising=False)  # (a wait past the look-up's time: the report waits)
    (result,) = send_waiting(outbox, client)
    assert "ratelimited" in result["error"]
    assert len(slack.messages()) == 4
    monkeypatch.setattr(notify, "LOOKUP_WAIT_S", 60, raising=False)
    slack._history_at = -1e9
    (result,) = send_waiting(outbox, client)
    assert result["sent"] is True
    assert result.get("posted_before") is True
    assert len(slack.messages()) == 4
    assert [c["method"] for c in slack.calls].count("conversations.history") >= 3  # (a 429 among them)
    assert outbox.names() == []


def _look_ups_throttled(slack, client):
    """Slack answering one ``conversations.history`` call in 30 s, and that one taken: a look-up's
    next call is answered 429, Retry-After 30."""
    slack.history_every_s = 30.0
    client.conversations_history(channel="C0ROLLOUT")


def _found_posted_before(slack, outbox, client, **kwargs):
    """A round that finds the outbox's one report posted already: marked sent, not posted again."""
    from vision_rollout.notify import send_waiting

    (result,) = send_waiting(outbox, client, **kwargs)
    assert result["sent"] is True
    assert result["posted_before"] is True
    assert len(slack.messages()) == 1
    assert outbox.names() == []


@pytest.mark.parametrize("slow", ["rate limit", "stalled answer"])
def test_a_look_up_ends_within_the_rounds_budget_leaving_the_report_waiting(slack, tmp_path, monkeypatch, slow):
    """A round's budget (``send_waiting``'s ``budget_s``: the shadow audit's 120 s) only kept it
    from starting a report: a look-up begun within it waited out Slack's Retry-After (150 s at
    most) and its calls' timeouts past it, the round ending minutes late. The look-up's waits
    and calls end within the budget: one that cannot finish leaves the report waiting, never
    posted a second time; a round with the time finds it."""
    from slack_sdk import WebClient

    from vision_rollout import notify
    from vision_rollout.notify import send_waiting

    monkeypatch.setattr(notify, "MAX_RETRY_AFTER_S", 1)  # (the client's own retries: 2 s at most)
    outbox = Folder(str(tmp_path / "outbox"))
    _lost_answer(slack, outbox)
    client = WebClient(token=slack.token, base_url=slack.base_url)
    if slow == "rate limit":
        _look_ups_throttled(slack, client)
    else:
        slack.stall = {"conversations.list": 30.0}
    (result,) = send_waiting(outbox, client, budget_s=3)
    assert "the round's budget ran out" in result["error"] or "past the round's budget" in result["error"]
    assert "sent" not in result
    assert len(slack.messages()) == 1
    assert len(outbox.names()) == 1  # (it waits)
    slack.history_every_s, slack._history_at, slack.stall = 0.0, -1e9, {}
    _found_posted_before(slack, outbox, client, budget_s=3)


def test_a_dead_senders_claim_removed_by_a_look_up_the_budget_cut_leaves_the_report_maybe_posted(
    slack, tmp_path, monkeypatch
):
    """A sender stopped once Slack took its post leaves its claim (the report may be posted); the
    next round removed that lapsed claim, then its look-up ran out of the round's budget: the
    report waited with nothing saying it may be posted, and the round after posted it a second
    time. That dead sender's claim stays (lapsed), and the next round looks first."""
    from slack_sdk import WebClient

    from vision_rollout import notify
    from vision_rollout.notify import send_waiting

    monkeypatch.setattr(notify, "MAX_RETRY_AFTER_S", 1)
    outbox = Folder(str(tmp_path / "outbox"))
    SlackNotifier("#model-rollouts", outbox=outbox).send(rollback_message(SPEC, "once"))
    dying, killed = _dying_after_post(slack)
    with pytest.raises(killed):
        send_waiting(outbox, dying)
    later = lambda: time.time() + notify.CLAIM_S + 1  # noqa: E731
    client = WebClient(token=slack.token, base_url=slack.base_url)
    _look_ups_throttled(slack, client)
    (result,) = send_waiting(outbox, client, budget_s=3, clock=later)
    assert "budget" in result["error"]
    assert len(slack.messages()) == 1
    slack.history_every_s, slack._history_at = 0.0, -1e9
    _found_posted_before(slack, outbox, client, clock=later)  # (later still: the claim lapsed for it too)


def test_a_dead_senders_post_found_whose_mark_cannot_be_written_is_looked_for_again_not_posted_twice(
    slack, tmp_path, monkeypatch
):
    """A round that took over a dead sender's lapsed claim removed that claim before looking for
    its post; it found the post, and the write of its ``.posted`` mark failed (a full disk, an
    I/O error): its own claim removed too (nothing of its own posted), the report was left with
    no claim, no mark and no note, and the next round posted it a second time. The dead sender's
    claim stays until its post is marked: the next round looks for it first."""
    import errno

    from slack_sdk import WebClient

    from vision_rollout import notify
    from vision_rollout.notify import PostedNotKept, send_waiting

    outbox = Folder(str(tmp_path / "outbox"))
    SlackNotifier("#model-rollouts", outbox=outbox).send(rollback_message(SPEC, "once"))
    dying, killed = _dying_after_post(slack)
    with pytest.raises(killed):
        send_waiting(outbox, dying)
    real_write = Folder.write

    def failing_write(self, name, data):
        if name.endswith(notify.POSTED):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, name, data)

    later = lambda: time.time() + notify.CLAIM_S + 1  # noqa: E731
    client = WebClient(token=slack.token, base_url=slack.base_url)
    monkeypatch.setattr(Folder, "write", failing_write)
    for _ in range(2):  # (the disk full over two rounds: each finds the post, neither can mark it)
        with pytest.raises(PostedNotKept):
            send_waiting(outbox, client, clock=later)
    monkeypatch.setattr(Folder, "write", real_write)
    _found_posted_before(slack, outbox, client, clock=later)


@pytest.mark.parametrize("answer", [b"[1, 2]", b'"ok"', b'{"ok": true}', b'{"ok": true, "channel": 5}'])
def test_an_answer_that_is_no_slack_object_keeps_the_report_and_fails_no_round(slack, tmp_path, answer):
    """A base URL that is not Slack's, a proxy answering 200 with JSON that is no object (or an
    ``ok`` without the post's channel and ts): slack-sdk's AttributeError escaped, the new report
    was lost (not in the outbox) and a round sending the outbox stopped at it; an ``ok`` without
    them was taken for a post. Each is an answer that could not be read, the report kept as
    maybe posted (looked for first), the round going on."""
    from slack_sdk import WebClient

    from vision_rollout.notify import send_waiting, waiting_reports

    outbox = Folder(str(tmp_path / "outbox"))
    slack.outage, slack.outage_body = 200, answer
    result = SlackNotifier("#model-rollouts", token=slack.token, base_url=slack.base_url, outbox=outbox).send(
        rollback_message(SPEC, "unreadable", chart=b"\x89PNG chart")
    )
    assert "not a Slack answer" in result["slack_error"]
    (waiting,) = waiting_reports(outbox)
    assert waiting.maybe_posted is not None
    results = send_waiting(outbox, WebClient(token=slack.token, base_url=slack.base_url))
    assert [("not a Slack answer" in r.get("error", "")) for r in results] == [True]
    assert len(waiting_reports(outbox)) == 1
    slack.outage = None
    (result,) = send_waiting(outbox, WebClient(token=slack.token, base_url=slack.base_url))
    assert (result["sent"], result["chart"]) == (True, True)


@pytest.mark.parametrize("what", ["chart too large", "chart a folder", "mark a folder"])
def test_a_reports_chart_or_mark_that_cannot_be_read_fails_that_report_not_the_round(
    slack, tmp_path, monkeypatch, what
):
    """A waiting report's chart or ``.posted`` mark over its size or not a regular file (a folder,
    a pipe): its TooLarge or NotAFile escaped the round, so no report after it was sent, and the
    hourly audit, which sends the outbox first, failed every run. That report's line names the
    file; the others are sent."""
    from slack_sdk import WebClient

    from vision_rollout import notify
    from vision_rollout.notify import send_waiting

    outbox = Folder(str(tmp_path / "outbox"))
    SlackNotifier("#model-rollouts", outbox=outbox).send(rollback_message(SPEC, "first", chart=b"\x89PNG chart"))
    SlackNotifier("#model-rollouts", outbox=outbox).send(rollback_message(SPEC, "second"))
    stem = outbox.names()[0].rsplit(".", 1)[0]
    if what == "chart too large":
        monkeypatch.setattr(notify, "MAX_CHART_BYTES", 4)
    elif what == "chart a folder":
        (tmp_path / "outbox" / f"{stem}.png").unlink()
        (tmp_path / "outbox" / f"{stem}.png").mkdir()
    else:
        (tmp_path / "outbox" / f"{stem}.posted").mkdir()
    first, second = send_waiting(outbox, WebClient(token=slack.token, base_url=slack.base_url))
    assert first["error"].startswith("not a report: ")
    assert str(tmp_path / "outbox" / stem) in first["error"]
    assert "channel" not in first
    assert second["sent"] is True
    assert [m["text"] for m in slack.messages()] == ["Rolled back digits v3: second"]
    assert f"{stem}.json" in outbox.names()


@pytest.mark.parametrize(
    ("error", "maybe"), [("internal_error", True), ("fatal_error", True), ("service_unavailable", False)]
)
def test_slacks_own_transient_errors_keep_the_report_and_its_chart_for_a_later_round(slack, tmp_path, error, maybe):
    """Slack answers some failures of its own with HTTP 200 and ok:false: ``internal_error`` and
    ``fatal_error`` ("it's possible some aspect of the operation succeeded"), ``service_unavailable``.
    They were taken as Slack's refusal: a post so failed was sent again without looking for it
    (twice in the channel where it had landed), and a chart so failed was dropped for good. A post
    that may have landed is now looked for first; a chart so failed waits for a later round."""
    from slack_sdk import WebClient

    from vision_rollout.notify import send_waiting, waiting_reports

    outbox = Folder(str(tmp_path / "outbox"))
    notifier = SlackNotifier("#model-rollouts", token=slack.token, base_url=slack.base_url, outbox=outbox)
    slack.refuse = {"chat.postMessage": error}
    notifier.send(rollback_message(SPEC, "post"))
    (waiting,) = waiting_reports(outbox)
    assert (waiting.maybe_posted is not None) == maybe
    slack.refuse = {"files.completeUploadExternal": error}
    result = notifier.send(rollback_message(SPEC, "chart", chart=b"\x89PNG chart"))
    assert error in result["chart_error"]
    assert len(waiting_reports(outbox)) == 2  # (the chart waits with its report's mark)
    slack.refuse = {}
    results = send_waiting(outbox, WebClient(token=slack.token, base_url=slack.base_url))
    assert [r["sent"] for r in results] == [True, True]
    assert results[1]["chart"] is True
    assert [c["method"] for c in slack.calls].count("conversations.history") == (1 if maybe else 0)
    assert [m["text"] for m in slack.messages()] == ["Rolled back digits v3: chart", "Rolled back digits v3: post"]
    assert outbox.names() == []


def test_a_crowded_outbox_is_sent_from_only_where_its_listing_is_whole_and_its_marks_are_kept(
    slack, tmp_path, monkeypatch
):
    """A sender listed the outbox whole to see other senders' claims (an outbox of millions of
    files held in memory). A listing holds ``MAX_LISTED`` entries at most: a sender whose listing
    was partial (another's claim may be one not listed) sends nothing, saying why, and sweeps no
    ``.posted`` mark (its report may be one not listed); drop looks the report up, no listing."""
    import os

    from slack_sdk import WebClient

    from vision_rollout import folders
    from vision_rollout.notify import POSTED, drop_report, send_waiting

    outbox = Folder(str(tmp_path / "outbox"))
    SlackNotifier("#model-rollouts", outbox=outbox).send(rollback_message(SPEC, "once"))
    (name,) = outbox.names()
    stem = name.removesuffix(".json")
    outbox.write("z" + POSTED, b"{}")  # (a mark whose report is gone, old)
    old = time.time() - 2 * 86400
    os.utime(tmp_path / "outbox" / ("z" + POSTED), (old, old))
    for k in range(4):
        outbox.write(f"{stem}-{k}.txt", b"someone's")
    monkeypatch.setattr(folders, "MAX_LISTED", 3, raising=False)
    client = WebClient(token=slack.token, base_url=slack.base_url)
    results = send_waiting(outbox, client)
    assert not slack.messages()
    assert all("MAX_LISTED" in r["skipped"] for r in results)
    assert (tmp_path / "outbox" / ("z" + POSTED)).exists()
    assert drop_report(outbox, name) == name
    assert not (tmp_path / "outbox" / name).exists()


@pytest.mark.parametrize(
    "text",
    [
        "a." * 500_000,  # a word boundary at every letter, no "://"
        "http://x/" + "?a" * 500_000,  # a query of parameters without "="
        "http://x/?" + "key" * 333_333,  # a parameter name holding the secret words, no "="
        "token " * 170_000,  # a key's word, then prose
        "://" * 333_333,  # user information never closed by "@"
        "http://x/?" + "a_sig" * 200_000,  # a parameter name ending in a secret's word, no "="
    ],
)
def test_scrubbing_a_megabyte_of_hostile_text_is_linear(text):
    """A server's 1 MB error of "a.a.a..." held the report's scrub for hours: each word start
    scanned the rest of the text for a URL's "://" (each "?" its query for "=")."""
    assert scrub(text) == text


@pytest.mark.parametrize("text", sorted(CREDENTIALS_IN_TEXT))
def test_a_report_scrubs_every_credential_the_masking_finds(text):
    """The reports' scrub was a second redactor, narrower than the model server's masking: a
    cookie, a JWT after "token", an AWS key id, a GitHub token, a private key's body,
    ``db_password: '...'`` and ``password hunter2`` reached Slack. Both find them alike now."""
    scrubbed = scrub(f"note {text} end")
    assert CREDENTIALS_IN_TEXT[text] not in scrubbed
    assert "***" in scrubbed
    assert scrubbed.startswith("note ")


def test_a_report_scrubs_a_private_key_block():
    scrubbed = scrub(f"loaded {PEM} from file")
    assert "MIIEpAIBAAKCAQEA1b2c3d4" not in scrubbed
    assert "q+/zYx" not in scrubbed
    assert scrubbed.startswith("loaded -----BEGIN RSA PRIVATE KEY-----")


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("GET /login?next=password%3Dhunter2 failed", "hunter2"),
        ("GET https://x.example/cb?access%5Ftoken=abc123 401", "abc123"),
        ("api\u00a0key AbC123xyz refused", "AbC123xyz"),  # a no-break space
        ("pass\u200bword: hunter2", "hunter2"),  # a zero-width space in the key
        ("token\uff1a hunter2", "hunter2"),  # a full-width colon
        ("password=h\\u0075nter2", "h\\u0075nter2"),  # a JSON escape
    ],
)
def test_a_report_scrubs_a_credential_written_in_escapes_or_other_forms(text, secret):
    """The masking reads text as a person does (percent-encoding, escapes, NFKC, invisible
    characters); the reports' scrub read it raw, so ``password%3Dhunter2`` reached Slack."""
    scrubbed = scrub(text)
    assert secret not in scrubbed
    assert "hunter2" not in scrubbed
    assert "***" in scrubbed


@pytest.mark.parametrize("when", ["after its post", "during its chart's upload"])
def test_a_report_whose_task_died_once_slack_took_it_is_posted_once_with_one_chart_by_its_retry(
    slack, tmp_path, monkeypatch, when
):
    """A task's report (``send_report``: the model_rollout DAG's notify) whose try was killed once
    Slack took its post, or while its chart was uploading: nothing was in the outbox, and the retry
    posted it a second time (and a chart cut off mid-upload was lost). Written to the outbox first,
    sent by its round: the retry, within its claim's life, posts it once and its chart once."""
    from slack_sdk import WebClient

    from vision_rollout.notify import report_name, send_report

    class Killed(BaseException):
        pass

    outbox = Folder(str(tmp_path / "outbox"))
    message = rollback_message(SPEC, "once", chart=b"\x89PNG chart")
    stem = report_name()
    dying = WebClient(token=slack.token, base_url=slack.base_url)
    post, upload = dying.chat_postMessage, dying.files_upload_v2

    def posted_then_killed(**kwargs: object) -> None:
        post(**kwargs)
        raise Killed

    def uploaded_then_killed(**kwargs: object) -> None:
        upload(**kwargs)
        raise Killed

    if when == "after its post":
        dying.chat_postMessage = posted_then_killed  # type: ignore[method-assign]
    else:
        dying.files_upload_v2 = uploaded_then_killed  # type: ignore[method-assign]
    real_delete = Folder.delete
    queued = time.time()
    with monkeypatch.context() as m:  # (killed: its claim stays)
        m.setattr(Folder, "delete", lambda self, n: None if ".claim-" in n else real_delete(self, n))
        with pytest.raises(Killed):
            send_report(SlackNotifier("#model-rollouts", outbox=outbox, client=dying), message, stem, None, 120)
    assert len(slack.messages()) == 1
    client = WebClient(token=slack.token, base_url=slack.base_url)
    again = send_report(SlackNotifier("#model-rollouts", outbox=outbox, client=client), message, stem, queued, 120)
    assert again["chart"] is True
    assert again["posted_before"] is True
    assert len(slack.messages()) == 1
    assert [c["method"] for c in slack.calls].count("files.completeUploadExternal") == 1
    assert outbox.names() == []
    third = send_report(SlackNotifier("#model-rollouts", outbox=outbox, client=client), message, stem, queued, 120)
    assert (third["ts"], third["posted_before"]) == (again["ts"], True)
    assert len(slack.messages()) == 1


def test_a_threaded_report_whose_answer_was_lost_is_looked_for_in_its_thread(slack, tmp_path):
    """A report "Sent again" as a reply in the thread of the run's first report, Slack took it but
    its answer was cut off: the next round looked for it in conversations.history only, where Slack
    never lists a thread's replies, and posted it a second time. It is looked for in its thread."""
    from slack_sdk import WebClient

    from vision_rollout.notify import send_waiting, sent_again

    outbox = Folder(str(tmp_path / "outbox"))
    notifier = SlackNotifier("#model-rollouts", token=slack.token, base_url=slack.base_url, outbox=outbox)
    first = notifier.send(rollback_message(SPEC, "first"))
    slack.lose = {"chat.postMessage": 1}
    lost = notifier.send(sent_again(rollback_message(SPEC, "again"), first["ts"]))
    assert "slack_error" in lost
    assert len(slack.thread_replies(first["channel"], first["ts"])) == 1
    (result,) = send_waiting(outbox, WebClient(token=slack.token, base_url=slack.base_url))
    assert (result["sent"], result.get("posted_before")) == (True, True)
    assert len(slack.thread_replies(first["channel"], first["ts"])) == 1
    assert [c["method"] for c in slack.calls].count("conversations.replies") == 1
    assert outbox.names() == []


def test_a_threaded_report_a_task_sent_before_its_retry_is_found_in_its_thread(slack, tmp_path):
    """A task's try posted its report as a reply and was killed once it was out of the outbox: the
    retry looked for it in the channel's history only and posted it again; it finds it in the thread."""
    from vision_rollout.notify import report_name, send_report, sent_again

    outbox = Folder(str(tmp_path / "outbox"))
    notifier = SlackNotifier("#model-rollouts", token=slack.token, base_url=slack.base_url, outbox=outbox)
    first = notifier.send(rollback_message(SPEC, "first"))
    message, stem, queued = sent_again(rollback_message(SPEC, "again"), first["ts"]), report_name(), time.time()
    sent = send_report(notifier, message, stem, queued)
    again = send_report(notifier, message, stem, queued)
    assert (again["ts"], again.get("posted_before")) == (sent["ts"], True)
    assert len(slack.thread_replies(first["channel"], first["ts"])) == 1
    assert outbox.names() == []


@pytest.mark.parametrize("other", ["sent it meanwhile", "is sending it", "keeps it", "marked its post"])
def test_a_task_report_another_round_took_first_is_its_post_not_a_slack_error(slack, tmp_path, monkeypatch, other):
    """The shadow audit's outbox round listed the outbox between notify's write of its report and
    notify's claim, and posted it: notify's round skipped it ("sent meanwhile", "another sender is
    sending it") and send_report answered slack_error, the teardown failing a run promoted and
    reported. It waits (within its budget) for the report to leave the outbox, then answers that
    post; one still held past its budget is in the outbox, maybe posted, never posted twice."""
    import threading

    from slack_sdk import WebClient

    from vision_rollout import notify
    from vision_rollout.notify import report_name, send_report, send_waiting

    outbox = Folder(str(tmp_path / "outbox"))
    client = WebClient(token=slack.token, base_url=slack.base_url)
    notifier = SlackNotifier("#model-rollouts", outbox=outbox, client=client)
    stem = report_name()
    real_round = notify._send_round
    timers: list[threading.Timer] = []

    def audit_round_first(*args, **kwargs):  # (the shadow audit's round, between write and claim)
        if kwargs.get("sender") is None:  # (the audit's round itself)
            return real_round(*args, **kwargs)
        if other == "sent it meanwhile":
            send_waiting(outbox, WebClient(token=slack.token, base_url=slack.base_url))
        else:  # (its claim written, its post a moment later)
            claim = f"{stem}.claim-{time.time_ns()}-{'a' * 12}"
            outbox.write(claim, b"")

            def post() -> None:
                notify._send_claimed(outbox, f"{stem}.json", claim, client, time.time(), {})
                outbox.delete(claim)

            if other == "is sending it":
                timers.append(threading.Timer(1.0, post))
                timers[-1].start()
            elif other == "marked its post":  # (its chart's upload under way: its post marked)
                slack.refuse = {"upload": "500"}
                notify._send_claimed(outbox, f"{stem}.json", claim, client, time.time(), {})
                slack.refuse = {}
        return real_round(*args, **kwargs)

    monkeypatch.setattr(notify, "_send_round", audit_round_first)
    message = rollback_message(SPEC, "once", chart=b"\x89PNG chart" if other == "marked its post" else None)
    sent = send_report(notifier, message, stem, None, 60 if other in ("sent it meanwhile", "is sending it") else 4)
    for t in timers:
        t.join()
    if other == "keeps it":  # (held past the budget: where it is, not a failure Slack gave)
        assert sent["outbox"] == str(outbox / f"{stem}.json")
        assert sent["maybe_posted"] is True
        assert "another sender" in sent["slack_error"]
        assert slack.messages() == []
        return
    assert "slack_error" not in sent
    assert len(slack.messages()) == 1
    assert sent["ts"] == slack.history[sent["channel"]][0]["ts"]
    assert sent["posted_before"] is True
    if other != "marked its post":  # (its chart waits there, with the mark, for that sender's)
        assert outbox.names() == []


def test_a_task_reports_error_note_never_writes_back_a_report_another_round_posted(slack, tmp_path, monkeypatch):
    """send_report noted Slack's error in its report after its round had released its claim: an
    outbox round (the shadow audit's) could claim the report in between, post it and remove it,
    and the note wrote it back, to be posted a second time. The note is written under the claim,
    and only over the report as it was read (``write_if``); its guard file is no report."""
    from slack_sdk import WebClient

    from vision_rollout import notify
    from vision_rollout.notify import prune_outbox, report_name, send_report, send_waiting, waiting_reports

    outbox = Folder(str(tmp_path / "outbox"))
    client = WebClient(token=slack.token, base_url=slack.base_url)
    stem = report_name()
    name = f"{stem}.json"
    slack.refuse = {"chat.postMessage": "invalid_auth"}  # (a token refused: the report waits)
    real_note, real_read = notify._note, Folder.read_within
    noting: list[bool] = []

    def note(*args, **kwargs):
        noting.append(True)
        return real_note(*args, **kwargs)

    def read_within(self, file, limit):  # (the audit's round, between the note's read and its write)
        data = real_read(self, file, limit)
        if noting and len(noting) == 1 and file == name:
            noting.append(True)
            slack.refuse = {}
            send_waiting(outbox, WebClient(token=slack.token, base_url=slack.base_url))
        return data

    monkeypatch.setattr(notify, "_note", note)
    monkeypatch.setattr(Folder, "read_within", read_within)
    sent = send_report(
        SlackNotifier("#model-rollouts", outbox=outbox, client=client), rollback_message(SPEC, "x"), stem
    )
    assert "invalid_auth" in sent["slack_error"]
    monkeypatch.undo()
    assert slack.messages() == []  # (the audit's round found it claimed: the note, then the report waits)
    assert not (tmp_path / "outbox" / f".{name}.lock").exists()  # (the note's lock, gone with it)
    assert [(w.name, w.slack_error) for w in waiting_reports(outbox)] == [(name, sent["slack_error"])]
    (result,) = send_waiting(outbox, client)  # (the next round)
    assert result["sent"] is True
    assert len(slack.messages()) == 1  # (posted once, never written back after its post)
    assert outbox.names() == []
    notify._note(outbox, name, slack_error="late")  # (a note after its post: nothing written back)
    assert outbox.names() == []
    (tmp_path / "outbox" / f".{name}.lock").touch()  # (a note killed under its lock left its guard file)
    assert prune_outbox(outbox, time.time()) == []  # (it goes with the leftovers)
    assert prune_outbox(outbox, time.time() + 2 * 3600) == [f".{name}.lock"]
    assert list((tmp_path / "outbox").iterdir()) == []


def test_a_task_reports_claim_held_by_a_try_still_running_is_not_taken_for_a_dead_ones(slack, tmp_path):
    """An earlier try's claim (the same task's sender) was taken for a dead sender's at once: a
    zombie try still posting (Airflow retrying a task whose process it lost track of) and its
    retry both posted the report. A try's claim is dead at once only where its process is gone
    (on this machine), or is this process and none of its rounds holds it; else it lapses by its
    time, and the retry waits for the running try's post."""
    import hashlib
    import subprocess
    import threading

    from slack_sdk import WebClient

    from vision_rollout import notify
    from vision_rollout.notify import report_name, send_report

    outbox = Folder(str(tmp_path / "outbox"))
    message = rollback_message(SPEC, "once")
    stem, queued = report_name(), time.time()
    slack.stall = {"chat.postMessage": 2.0}  # (the first try's post, under way)

    def notifier() -> SlackNotifier:
        return SlackNotifier(
            "#model-rollouts", outbox=outbox, client=WebClient(token=slack.token, base_url=slack.base_url)
        )

    tries: list[dict] = []
    zombie = threading.Thread(target=lambda: tries.append(send_report(notifier(), message, stem, None, 60)))
    zombie.start()
    while not [n for n in outbox.names() if ".claim-" in n]:
        time.sleep(0.01)
    retry = send_report(notifier(), message, stem, queued, 60)
    zombie.join()
    assert len(slack.messages()) == 1
    assert (retry["ts"], retry["posted_before"]) == (tries[0]["ts"], True)
    assert outbox.names() == []
    # A claim of a process gone on this machine is dead at once; another machine's lapses by its time.
    sender = hashlib.sha256(stem.encode()).hexdigest()[:16]
    dead = subprocess.Popen(["true"])
    dead.wait()
    here = notify._process()[:8]
    assert notify._dead_try(f"{stem}.claim-1-{sender}{here}{dead.pid:08x}", sender)
    assert not notify._dead_try(f"{stem}.claim-1-{sender}{'0' * 8}{dead.pid:08x}", sender)
    assert not notify._dead_try(f"{stem}.claim-1-{sender}{here}{1:08x}", sender)  # (init: alive)


def test_a_claim_of_another_host_sharing_its_host_name_and_pid_namespace_is_not_taken_for_a_dead_ones(
    tmp_path, monkeypatch
):
    """A claim's machine was its host name and pid namespace's inode alone: two hosts (or
    containers on them) sharing both looked like one, and a sender on one took a live sender's
    claim on the other for a dead one's (its pid not there) and posted the report a second time.
    The machine ID and boot ID tell them apart: only the same machine, booted once, judges a pid."""
    import hashlib
    import subprocess

    from vision_rollout import notify

    machine_id, boot_id = tmp_path / "machine-id", tmp_path / "boot_id"
    machine_id.write_text("5f1c0e0e9d2b4c6f8a1d3e5b7c9f0a12\n")
    boot_id.write_text("host-a-boot\n")
    monkeypatch.setattr(notify, "MACHINE_FILES", (str(machine_id), str(boot_id)))
    stem = notify.report_name()
    sender = hashlib.sha256(stem.encode()).hexdigest()[:16]
    gone = subprocess.Popen(["true"])
    gone.wait()
    claim = f"{stem}.claim-1-{sender}{notify._process()[:8]}{gone.pid:08x}"  # (made on host A)
    assert notify._dead_try(claim, sender)  # (host A: its pid is gone)
    boot_id.write_text("host-b-boot\n")  # (host B: the same host name, pid namespace and machine ID)
    assert not notify._dead_try(claim, sender)
    boot_id.unlink()  # (no boot ID: the machine ID alone tells them)
    machine_id.write_text("0b8e6d4c2a0f4e1d9c7b5a3f1e0d2c4b\n")
    assert not notify._dead_try(claim, sender)


class _Stepping(_Clock):
    """``_Clock``, whose ``sleep`` moves its clocks on at once (no test waits for it)."""

    def __init__(self, ahead_s: float) -> None:
        super().__init__(ahead_s)
        self.slept = 0.0

    def time(self) -> float:
        return super().time() + self.slept

    def time_ns(self) -> int:
        return super().time_ns() + int(self.slept * 1e9)

    def monotonic(self) -> float:
        return self._time.monotonic() + self.slept

    def sleep(self, seconds: float) -> None:
        self.slept += seconds


@pytest.mark.parametrize("later_s", [200, 30])
def test_a_claim_of_a_try_killed_on_another_machine_holds_the_report_until_its_budgets_end_not_claim_s(
    slack, tmp_path, monkeypatch, later_s
):
    """A try killed on another machine once Slack took its post left its claim, which this
    machine cannot judge dead (its pid is another machine's): the retry waited for it out its
    whole budget and failed, until the claim was CLAIM_S (15 minutes) old. A sender with a budget
    makes no Slack call past it (``_within``): its claim says so (``until``: the budget's end and
    CLAIM_MARGIN_S), and holds the report no longer; the retry (``later_s`` after the try) takes
    it over as soon as it lapsed, finds the killed try's post and posts nothing more."""
    from slack_sdk import WebClient

    from vision_rollout import notify
    from vision_rollout.notify import CLAIM_MARGIN_S, CLAIM_S, report_name, send_report

    outbox = Folder(str(tmp_path / "outbox"))
    message = rollback_message(SPEC, "once")
    stem, queued, budget_s = report_name(), time.time(), 60

    def notifier() -> SlackNotifier:
        return SlackNotifier(
            "#model-rollouts", outbox=outbox, client=WebClient(token=slack.token, base_url=slack.base_url)
        )

    real = SlackNotifier.send

    def killed(self, *args, **kwargs):  # (the try is killed once Slack took its post)
        real(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(SlackNotifier, "send", killed)
    with pytest.raises(KeyboardInterrupt):
        send_report(notifier(), message, stem, None, budget_s)
    monkeypatch.setattr(SlackNotifier, "send", real)
    (claim,) = [n for n in outbox.names() if ".claim-" in n]
    other = claim[:-16] + "0" * 8 + claim[-8:]  # (made on another machine)
    outbox.write(other, outbox.read(claim))
    outbox.delete(claim)
    assert budget_s + CLAIM_MARGIN_S < later_s + 2 * budget_s  # (it lapses within the retry's budget)
    assert later_s < CLAIM_S  # (long before CLAIM_S)
    clock = _Stepping(later_s)
    monkeypatch.setattr(notify, "time", clock)
    retry = send_report(notifier(), message, stem, queued, 2 * budget_s)
    assert clock.slept <= max(0, budget_s + CLAIM_MARGIN_S - later_s) + 1  # (until it lapsed, no longer)
    assert (retry["channel"], retry.get("posted_before")) == ("C0ROLLOUT", True), retry
    assert len(slack.messages()) == 1
    assert outbox.names() == []


def test_a_report_removed_before_its_mark_is_found_posted(tmp_path):
    """A sender killed once Slack took its report, after it removed the report and before its
    ``.posted`` mark: report_left read the mark only while the report was there, and answered
    None (as for a report never posted). The mark alone says it was posted."""
    from vision_rollout.notify import POSTED, report_left, report_name

    outbox = Folder(str(tmp_path / "outbox"))
    stem = report_name()
    outbox.write(stem + POSTED, json.dumps({"channel": "C1", "ts": "1.5"}).encode())
    assert report_left(outbox, stem) == {"channel": "C1", "ts": "1.5", "posted_before": True}


@pytest.mark.parametrize(("n", "correct"), [(10, 1.0), (3, 0.0)])
def test_a_chart_of_an_arm_right_or_wrong_every_time_is_drawn(n, correct):
    """Every answer of an arm right (or wrong): its Wilson bound computed a hair under 1 (over 0)
    for some counts, a negative error bar matplotlib refuses (ValueError), and no chart."""
    df = samples(n).assign(correct=correct)
    assert latency_accuracy_chart(df, "v3")[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_report_chart_whose_samples_take_too_long_is_given_up_within_its_budget(monkeypatch, tmp_path):
    """A store that stalls the read of the deciding stage's records (a GET waiting out its
    timeout): the report's chart is given up at its budget, saying so, and the report goes."""
    import threading

    from vision_rollout import engine, notify

    released = threading.Event()
    monkeypatch.setattr(engine, "judged_samples", lambda *args: released.wait(30))
    verdict = {"decision": "pass", "look": 3, "looks": 3, "bake": {"window": 1.8e9, "until": 1.8e9 + 60}}
    began = time.monotonic()
    chart, why = notify.report_chart(SPEC, [verdict], str(tmp_path / "log"), tmp_path, budget_s=0.5)
    released.set()
    assert time.monotonic() - began < 5
    assert chart is None
    assert why == "the 5% stage's samples were not read and drawn within 0.5 s"


STALLED_CHART_READ = """
import sys, time
from datetime import UTC, datetime
from pathlib import Path

from model_server import predictionlog
from vision_rollout.notify import report_chart
from vision_rollout.spec import RolloutSpec

tmp, t0 = Path(sys.argv[1]), time.time() - 900
at = datetime.fromtimestamp(t0 + 50, UTC)
hour = tmp / "log" / "model=digits" / f"dt={at:%Y-%m-%d}" / f"hour={at:%H}"
hour.mkdir(parents=True)
(hour / f"part-aaa-{at:%Y%m%dT%H%M%S}Z-{0:012x}.parquet").write_bytes(b"a file on a hung mount")
predictionlog._read_file = lambda *args: time.sleep(3600)  # (its read never returns)
verdict = {"decision": "fail", "look": 2, "looks": 3, "bake": {"window": t0, "until": t0 + 100}}
spec = RolloutSpec.from_dict({"candidate_version": "2", "stages": [50, 100]})
print(report_chart(spec, [verdict], str(tmp / "log"), tmp, budget_s=1)[1], flush=True)
"""


def test_a_chart_whose_read_of_the_log_stalls_never_holds_the_process_at_exit(tmp_path):
    """A read of the deciding stage's records that stalls (a hung NFS or S3 read): report_chart
    gave it up at its budget, but its read's worker threads (a ThreadPoolExecutor's, which
    interpreter exit joins, whatever the chart thread's daemon flag) held the process at exit
    for ever: the notify task, dag.test(), pytest never ended. The process now exits."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(root / p) for p in (".", "include", "plugins"))}
    out = subprocess.run(
        [sys.executable, "-c", STALLED_CHART_READ, str(tmp_path)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "the 50% stage's samples were not read and drawn within 1 s"


def test_one_line_scrubs_a_private_keys_lines_before_it_joins_them():
    """A key's body logged without its BEGIN line kept its last, shorter line readable once on one
    line: joined by spaces, that line was no line of its own. The text is scrubbed as it came too."""
    body = ["MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj"] * 2 + ["q+/zYx3Lm9Wq=="]
    line = one_line("load failed: " + "\n".join([*body, "-----END PRIVATE KEY-----"]))
    assert "q+/zYx" not in line
    assert "MIIEvQ" not in line
    assert line == "load failed: *** *** *** -----END PRIVATE KEY-----"
    assert one_line("db password:\nhunter2x9 rejected") == "db password: *** rejected"


def test_a_report_slack_refuses_that_cannot_be_set_aside_keeps_slacks_reason(slack, tmp_path, monkeypatch):
    """Slack refusing a report for good (channel_not_found) while its move into ``refused/``
    fails (a full disk, an I/O error): the round went up with the move's OSError alone, Slack's
    reason lost, and its other reports not tried. The report waits in the outbox, the round's
    result saying Slack's reason and why it was not set aside; the round goes on."""
    import errno

    from slack_sdk import WebClient

    from vision_rollout import notify
    from vision_rollout.notify import REFUSED, send_waiting

    outbox = Folder(str(tmp_path / "outbox"))
    client = WebClient(token=slack.token, base_url=slack.base_url)
    slack.outage = 503
    for channel in ("#typo", "#ok"):
        SlackNotifier(channel, token=slack.token, base_url=slack.base_url, outbox=outbox).send(
            rollback_message(SPEC, channel)
        )
    slack.outage = None
    slack.refuse = {"chat.postMessage": "channel_not_found"}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(notify, "_move", full)
    results = send_waiting(outbox, client)
    assert len(results) == 2
    for result in results:
        assert "channel_not_found" in result["error"]
        assert f"not set aside in {REFUSED}/: [Errno 28] No space left on device" in result["error"]
        assert "refused" not in result
    assert len([n for n in outbox.names() if n.endswith(".json")]) == 2  # (both wait in the outbox)


def test_a_report_set_aside_whose_outbox_copy_cannot_be_removed_is_posted_once(slack, tmp_path, monkeypatch):
    """A report Slack refused for good (channel_not_found) written into ``refused/`` whose outbox
    copy's removal then failed (EIO): the round said "not set aside" while it lay in both
    folders, and once the channel was fixed send_waiting posted it and send_refused posted it
    again. The copy in ``refused/`` is taken back: it waits in the outbox alone, posted once; and
    send_refused leaves a report still waiting in the outbox to the outbox's rounds."""
    import errno

    from slack_sdk import WebClient

    from vision_rollout.notify import REFUSED, send_refused, send_waiting

    outbox = Folder(str(tmp_path / "outbox"))
    refused = outbox / REFUSED
    client = WebClient(token=slack.token, base_url=slack.base_url)
    SlackNotifier("#typo", outbox=outbox).send(rollback_message(SPEC, "#typo"))  # (no token: not maybe_posted)
    slack.refuse = {"chat.postMessage": "channel_not_found"}
    (name,) = [n for n in outbox.names() if n.endswith(".json")]
    delete = Folder.delete
    failed: list[str] = []

    def eio_once(self, file):
        if file == name and self.parts == outbox.parts and not failed:
            failed.append(file)
            raise OSError(errno.EIO, "Input/output error")
        return delete(self, file)

    monkeypatch.setattr(Folder, "delete", eio_once)
    (result,) = send_waiting(outbox, client)
    assert failed
    assert "channel_not_found" in result["error"]
    assert f"not set aside in {REFUSED}/" in result["error"]
    assert name in outbox.names()
    assert name not in refused.names()  # (the copy set aside taken back: it waits in one place)
    refused.write(name, outbox.read_within(name, 1 << 20))  # (a copy left there all the same)
    slack.refuse = {}
    assert send_refused(outbox, client) == [
        {"name": name, "skipped": "it waits in the outbox too: the outbox's rounds send it"}
    ]
    (result,) = send_waiting(outbox, client)
    assert result["sent"]
    assert len(slack.messages()) == 1


def test_a_report_set_aside_whose_outbox_chart_cannot_be_removed_says_it_was_set_aside(slack, tmp_path, monkeypatch):
    """A report Slack refused for good moved into ``refused/`` with its chart, the removal of the
    chart's outbox copy then failing (EIO): the round said "not set aside" while the report lay
    in ``refused/`` alone. It says the report was set aside and only its chart's copy was left."""
    import errno

    from slack_sdk import WebClient

    from vision_rollout.notify import REFUSED, send_waiting

    outbox = Folder(str(tmp_path / "outbox"))
    refused = outbox / REFUSED
    client = WebClient(token=slack.token, base_url=slack.base_url)
    SlackNotifier("#typo", outbox=outbox).send(rollback_message(SPEC, "#typo", chart=b"\x89PNG"))
    slack.refuse = {"chat.postMessage": "channel_not_found"}
    (name,) = [n for n in outbox.names() if n.endswith(".json")]
    (chart,) = [n for n in outbox.names() if n.endswith(".png")]
    delete = Folder.delete

    def eio(self, file):
        if file == chart and self.parts == outbox.parts:
            raise OSError(errno.EIO, "Input/output error")
        return delete(self, file)

    monkeypatch.setattr(Folder, "delete", eio)
    (result,) = send_waiting(outbox, client)
    assert "channel_not_found" in result["error"]
    assert "not set aside" not in result["error"]
    assert f"set aside in {REFUSED}/" in result["error"]
    assert "its chart's copy in the outbox was not removed: [Errno 5] Input/output error" in result["error"]
    assert result["refused"] is True
    assert name not in outbox.names()
    assert {name, chart} <= set(refused.names())
