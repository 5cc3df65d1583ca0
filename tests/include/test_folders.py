"""The run folder on a disk and in an object store (moto's S3 API on loopback, pyarrow's client)."""

from __future__ import annotations

import hashlib
import re
import stat
import threading
from datetime import UTC, datetime, timedelta

import pytest

from tests.support import files_under
from vision_rollout.folders import Folder
from vision_rollout.notify import Message, SlackNotifier


@pytest.fixture(params=["folder", "s3"])
def root(request, tmp_path) -> str:
    return request.getfixturevalue("s3").uri() if request.param == "s3" else str(tmp_path / "run")


def test_files_are_written_whole_read_back_and_listed(root):
    folder = Folder(root) / "audits" / "digits"
    assert folder.names() == []  # not made yet
    where = folder.write("report.md", b"# one")
    folder.write("report.md", b"# two")  # replaced
    folder.write("summary.json", b"{}")
    (folder / "below").write("x", b"not listed")
    assert folder.read("report.md") == b"# two"
    assert folder.names() == ["report.md", "summary.json"]
    assert files_under(root) == {
        "audits/digits/report.md": b"# two",
        "audits/digits/summary.json": b"{}",
        "audits/digits/below/x": b"not listed",
    }
    # Where it is, as logs and reports show it: without the URI's options (endpoint, region).
    assert where == f"{folder}/report.md"
    assert "?" not in where
    if root.startswith("s3://"):
        assert where.startswith("s3://") and "/audits/digits/report.md" in where  # noqa: PT018
    else:
        assert stat.S_IMODE((folder.path / "report.md").stat().st_mode) == 0o600  # type: ignore[operator]


def test_the_outbox_in_an_object_store_keeps_each_report_and_its_chart(s3):
    outbox = Folder(s3.uri()) / "outbox"
    sent = SlackNotifier("#rollouts", outbox=outbox).send(Message("rolled back", [], chart=b"\x89PNG..."))
    assert sent["outbox"].startswith("s3://")
    [json_name] = [n for n in outbox.names() if n.endswith(".json")]
    assert sent["outbox"].endswith(json_name)
    record = outbox.read(json_name)
    assert b'"rolled back"' in record
    assert outbox.read(json_name.replace(".json", ".png")) == b"\x89PNG..."


def test_a_write_that_fails_raises_and_leaves_nothing(s3, tmp_path):
    """A bucket that does not exist, and a file where a folder should be: OSError, nothing half
    written (the caller, such as the rollout's report, fails and says so)."""
    missing = Folder(s3.uri().replace(f"s3://{s3.bucket}/", "s3://no-such-bucket/"))
    with pytest.raises(OSError):  # noqa: PT011 (pyarrow's errors name the bucket, not a type)
        missing.write("x.json", b"{}")
    (tmp_path / "outbox").write_text("a file")
    with pytest.raises(OSError):  # noqa: PT011
        (Folder(str(tmp_path)) / "outbox").write("x.json", b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outbox"]


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b", "a\0b"])
def test_a_name_is_one_file_or_folder(name, tmp_path):
    with pytest.raises(ValueError, match="not a file or folder name"):
        Folder(str(tmp_path)) / name
    with pytest.raises(ValueError, match="not a file or folder name"):
        Folder(str(tmp_path)).write(name, b"")


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        ("http://host/run", "not 'http'://"),
        ("s3://KEY:SECRET@bucket/run", "credentials in the URI"),
        ("s3://bucket/run?secret_key=SECRET", "credentials in the URI"),
        ("gs://bucket/run?Access_Token=SECRET", "credentials in the URI"),
        # an option's URL with user:password (the endpoint is shown in the store's errors)
        ("s3://bucket/run?endpoint_override=http://minio:SECRET@minio:9000", "credentials in the URI"),
        ("s3://bucket/run?endpoint_override=minio:SECRET@minio:9000", "credentials in the URI"),
    ],
)
def test_a_folder_uri_with_credentials_or_another_scheme_is_refused(uri, needle):
    with pytest.raises(ValueError, match=needle) as caught:
        Folder(uri)
    assert "SECRET" not in str(caught.value)


def test_a_folder_is_checked_for_its_bucket_not_its_prefix(s3, tmp_path):
    """A prefix is there once written; a bucket that does not exist is named (listing it answers
    nothing, as an empty folder)."""
    Folder(s3.uri("not-written-yet")).check()
    Folder(str(tmp_path / "not-made-yet")).check()
    missing = Folder(s3.uri("x").replace(f"s3://{s3.bucket}/", "s3://no-such-bucket/"))
    assert missing.names() == []
    with pytest.raises(FileNotFoundError, match="no bucket 'no-such-bucket'"):
        missing.check()


def test_folders_nothing_changed_in_since_a_time_are_pruned_in_turns(root, tmp_path):
    """A run folder per rollout run and nothing removing one: in a disk's folder or an object
    store, those idle since a time lose their files, then go; a file of someone else's keeps its
    folder (its own files removed), a file changed since keeps all, and each pass looks into
    ``limit`` folders at most, the next ones at the next turn."""
    import time

    runs = Folder(root) / "rollouts" / "digits"
    for run in ("a", "b", "c", "d", "e"):
        (runs / run).write("stage-1.json", b"{}")
    (runs / "b").write("notes.txt", b"someone else's")
    ((runs / "c") / "below").write("x", b"")
    ours = {"stage-1.json", "report.md"}.__contains__
    now = time.time()
    if runs.path is None:  # (an object store's times are its own: every file is older than a time to come)
        before = now + 60
    else:
        import os

        before = now - 86400
        for run in ("a", "b", "c", "d", "e"):
            for f in (runs.path / run).iterdir():
                os.utime(f, (now - 2 * 86400, now - 2 * 86400))
        (runs.path / "e" / ".report.md.77.tmp").write_bytes(b"a write going on")
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "stage-1.json").write_bytes(b"not the store's")
        os.utime(tmp_path / "elsewhere" / "stage-1.json", (now - 2 * 86400, now - 2 * 86400))
        (runs.path / "f").symlink_to(tmp_path / "elsewhere")
    assert runs.prune(before, ours, limit=10, dry_run=True) == ["a", "d"] + (["e"] if runs.path is None else [])
    assert files_under(root)["rollouts/digits/a/stage-1.json"] == b"{}"
    assert len(runs.folders()) == 5
    assert runs.prune(before, ours, limit=2, turn=0) == ["a"]  # (a and b looked into)
    assert (runs / "b").names() == ["notes.txt"]
    in_store = runs.path is None
    assert runs.prune(before, ours, limit=2, turn=1) == ["d"] + (["e"] if in_store else [])  # (of b, c, d, e)
    assert runs.prune(before, ours, limit=2, turn=2) == []  # (b and c again: c holds a folder)
    assert (runs / "c").names() == []
    assert runs.prune(before - 3 * 86400, ours, limit=10) == []  # (nothing idle that long)
    assert runs.folders() == ["b", "c"] + (["e"] if runs.path is not None else [])
    if runs.path is not None:
        assert (tmp_path / "elsewhere" / "stage-1.json").exists()
        assert (runs / "e").names() == ["stage-1.json"]
        (runs.path / "g").mkdir()  # (emptied by hand, or a pass killed before its last step)
        os.utime(runs.path / "g", (now - 2 * 86400, now - 2 * 86400))
        (runs.path / "h").mkdir()  # (a write about to fill it)
        assert runs.prune(before, ours, limit=10, dry_run=True) == ["g"]
        assert runs.prune(before, ours, limit=10) == ["g"]
        assert runs.folders() == ["b", "c", "e", "h"]


def test_files_of_a_kind_unchanged_since_a_time_are_removed_oldest_first(tmp_path):
    import os
    import time

    folder = Folder(str(tmp_path / "approvals"))
    now = time.time()
    for age, name in ((5, "old.json"), (3, "older-not.json"), (9, "oldest.json"), (0, "new.json"), (9, "x.txt")):
        folder.write(name, b"{}")
        os.utime(tmp_path / "approvals" / name, (now - age * 86400, now - age * 86400))
    (tmp_path / "approvals" / "a\\b.json").write_bytes(b"{}")
    os.utime(tmp_path / "approvals" / "a\\b.json", (now - 9 * 86400, now - 9 * 86400))
    (tmp_path / "approvals" / "link.json").symlink_to(tmp_path / "approvals" / "new.json")
    kind = re.compile(r".+\.json").fullmatch
    assert folder.remove_older(now - 4 * 86400, kind, limit=1, dry_run=True) == ["oldest.json"]
    assert folder.remove_older(now - 4 * 86400, kind, limit=1) == ["oldest.json"]
    assert folder.remove_older(now - 4 * 86400, kind, limit=10) == ["old.json"]
    assert sorted(folder.names()) == sorted(["a\\b.json", "link.json", "new.json", "older-not.json", "x.txt"])


def test_a_conditional_write_refuses_a_file_changed_since_it_was_read(root):
    from vision_rollout.folders import WriteConflict

    folder = Folder(root) / "rollouts"
    folder.write_if("stage.json", b"one", None)  # absent, as read
    with pytest.raises(WriteConflict, match="changed since it was read"):
        folder.write_if("stage.json", b"two", None)
    folder.write("stage.json", b"another writer's")
    with pytest.raises(WriteConflict):
        folder.write_if("stage.json", b"two", b"one")
    assert folder.read("stage.json") == b"another writer's"
    folder.write_if("stage.json", b"two", b"another writer's")
    assert folder.read("stage.json") == b"two"
    assert folder.names() == ["stage.json"]  # (its guard file on a disk is hidden)


@pytest.mark.parametrize("before", [None, b"one"])
def test_a_conditional_write_in_an_object_store_loses_to_a_put_landing_after_its_read(s3, before):
    """Of two writers of what they both read, one writes and the other gets WriteConflict, also
    when the other's PUT lands between this one's last read and its PUT: that PUT overwrote it
    (pyarrow's PUT has no condition), the other writer's change lost without a word. The PUT
    carries the condition: ``If-Match`` the ETag read, or ``If-None-Match: *`` for a file read
    absent."""
    from tests.support.s3proxy import s3_proxy
    from vision_rollout.folders import WriteConflict

    prefix = s3.uri().split("?")[0].rsplit("/", 1)[1]
    other = Folder(s3.uri(prefix)) / "rollouts"  # straight to the store
    if before is not None:
        other.write("stage.json", before)
    landed: list[str] = []

    with s3_proxy(s3.port) as proxy:

        def other_writer_first(seen):
            if seen.put_of("/stage.json") and not landed:  # (another machine's: a process of its own)
                landed.append(_write_if_elsewhere(other, "stage.json", b"the other writer's", before))
            return None

        proxy.before = other_writer_first
        ours = Folder(proxy.uri(s3.bucket, prefix)) / "rollouts"
        with pytest.raises(WriteConflict, match="changed since it was read"):
            ours.write_if("stage.json", b"ours", before)
        (put,) = proxy.puts(f"/{prefix}/rollouts/stage.json")
    assert landed
    assert other.read("stage.json") == b"the other writer's"
    if before is None:
        assert put.headers.get("if-none-match") == "*"
        assert "if-match" not in put.headers
    else:
        etag = f'"{hashlib.md5(before).hexdigest()}"'  # (the ETag of a one-part PUT, unencrypted)
        assert put.headers.get("if-match") == etag
        assert "if-none-match" not in put.headers


def test_a_conditional_write_the_store_answers_409_to_is_a_conflict_with_nothing_written(s3):
    """S3 answers 409 ConditionalRequestConflict to a conditional PUT racing another write of the
    same key: a conflict (read and made again), not an error of the store."""
    from tests.support.s3proxy import s3_proxy
    from vision_rollout.folders import WriteConflict

    prefix = s3.uri().split("?")[0].rsplit("/", 1)[1]
    direct = Folder(s3.uri(prefix))
    direct.write("stage.json", b"one")
    conflict = (
        b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ConditionalRequestConflict</Code>"
        b"<Message>A conflicting operation occurred.</Message></Error>"
    )
    with s3_proxy(s3.port) as proxy:
        proxy.before = lambda seen: (409, conflict) if seen.put_of("/stage.json") else None
        with pytest.raises(WriteConflict, match="changed since it was read"):
            Folder(proxy.uri(s3.bucket, prefix)).write_if("stage.json", b"two", b"one")
    assert direct.read("stage.json") == b"one"


def _write_if_elsewhere(folder: Folder, name: str, data: bytes, read: bytes | None) -> str:
    """``folder.write_if`` run by another process (another worker's)."""
    import subprocess
    import sys

    code = (
        "import sys; from vision_rollout.folders import Folder; "
        f"print((Folder({folder.uri!r}, {folder.parts!r})).write_if({name!r}, {data!r}, {read!r}))"
    )
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def test_a_file_in_an_object_store_is_read_whole_as_one_version_while_it_is_replaced(s3):
    """A read was a HEAD for the size, then a GET: a file replaced in between (another worker
    writing the stage's record) was read as the first bytes of the new one, cut at the old
    one's size (the stage then failed on "not the record of stage 1"). It is one GET now."""
    from tests.support.s3proxy import s3_proxy

    prefix = s3.uri().split("?")[0].rsplit("/", 1)[1]
    direct = Folder(s3.uri(prefix))
    direct.write("stage.json", b'{"v": 1}')
    replaced: list[str] = []
    with s3_proxy(s3.port) as proxy:

        def replace_before_its_get(seen):
            if seen.method == "GET" and not replaced:
                replaced.append(_write_if_elsewhere(direct, "stage.json", b'{"v": 2, "longer": true}', b'{"v": 1}'))
            return None

        proxy.before = replace_before_its_get
        got = Folder(proxy.uri(s3.bucket, prefix)).read("stage.json")
    assert got in (b'{"v": 1}', b'{"v": 2, "longer": true}')


def test_the_s3_client_of_a_folder_takes_the_uris_options_as_pyarrow_does():
    """The conditional writes go through boto3: the same endpoint, scheme, region and path-style
    addressing under an endpoint override as pyarrow's S3 filesystem of the URI, AWS's own
    endpoint without one."""
    import pyarrow.fs as pafs

    from model_server.files import s3_client

    uri = "s3://bucket/run?endpoint_override=minio.example:9000&scheme=http&region=eu-west-1"
    fs, _ = pafs.FileSystem.from_uri(uri)
    client = s3_client(uri, fs.region)
    assert client.meta.endpoint_url == "http://minio.example:9000"
    assert client.meta.region_name == "eu-west-1"
    assert client.meta.config.s3 == {"addressing_style": "path"}
    aws = s3_client("s3://bucket/run?region=us-east-2", "us-east-2")
    assert aws.meta.endpoint_url == "https://s3.us-east-2.amazonaws.com"
    assert not aws.meta.config.s3


def test_a_conditional_put_that_landed_but_whose_answer_was_lost_is_written_not_a_conflict(s3):
    """boto3 sends a PUT again when its answer is lost (a 500, a dropped connection); the PUT
    had landed, so its condition no longer holds and the second one is answered 412: that was
    a WriteConflict, and the caller made its change again on its own write (a stage's weights
    counted as applied twice). A conflict whose file holds what was written is that write."""
    from tests.support.s3proxy import s3_proxy

    prefix = s3.uri().split("?")[0].rsplit("/", 1)[1]
    direct = Folder(s3.uri(prefix))
    direct.write("stage.json", b"one")
    with s3_proxy(s3.port) as proxy:
        lost: list[bool] = []

        def lose_the_first_puts_answer(seen):
            if seen.put_of("/stage.json") and not lost:
                lost.append(True)
                direct.write("stage.json", seen.body)  # (landed: as the store would have it)
                return 500, b"<Error><Code>InternalError</Code><Message>lost</Message></Error>"
            return None

        proxy.before = lose_the_first_puts_answer
        Folder(proxy.uri(s3.bucket, prefix)).write_if("stage.json", b"two", b"one")
        assert len(proxy.puts(f"/{prefix}/stage.json")) == 2  # sent again
    assert direct.read("stage.json") == b"two"


def test_a_store_that_ignores_conditional_puts_is_refused_naming_it_and_nothing_written(s3):
    """A store that ignores ``If-Match`` and ``If-None-Match`` (older MinIO and Ceph RGW, some
    gateways) answered a conditional write 200 whatever the object held: two writers of a
    stage's record both won and nothing said so. The store is probed at its first conditional
    write (a probe object put, then put with a wrong ``If-Match`` and with ``If-None-Match: *``),
    and refused naming the store and the conditions it ignored; the probe object is removed."""
    from tests.support.s3proxy import s3_proxy
    from vision_rollout.objects import ConditionsIgnored

    prefix = s3.uri().split("?")[0].rsplit("/", 1)[1]
    direct = Folder(s3.uri(prefix)) / "rollouts"
    direct.write("stage.json", b"one")
    with s3_proxy(s3.port) as proxy:
        proxy.ignore_conditions = True
        ours = Folder(proxy.uri(s3.bucket, prefix)) / "rollouts"
        for _ in range(2):  # (a refusal is not remembered: the store may be fixed meanwhile)
            with pytest.raises(ConditionsIgnored) as refused:
                ours.write_if("stage.json", b"two", b"one")
            message = str(refused.value)
            assert f"127.0.0.1:{proxy.port}" in message
            assert f"bucket {s3.bucket!r}" in message
            assert "If-Match and one whose If-None-Match: * did not hold" in message
        probes = {s.path.split("?")[0] for s in proxy.seen if s.method == "PUT" and "probe" in s.path}
        assert len(probes) == 2
        assert all(p.startswith(f"/{s3.bucket}/{prefix}/.conditional-put-probe-") for p in probes)
        assert not proxy.puts("/stage.json")
    assert direct.read("stage.json") == b"one"
    assert Folder(s3.uri(prefix)).names() == []  # (no probe object left)
    assert direct.names() == ["stage.json"]


def test_a_store_that_honours_conditional_puts_is_probed_once_per_process(s3, monkeypatch):
    """moto, as S3, refuses both probes (412): the writes go on, the store probed once for the
    process (its verdict kept for ``PROBED_MAX`` stores, the oldest forgotten first)."""
    from tests.support.s3proxy import s3_proxy
    from vision_rollout import objects

    monkeypatch.setattr(objects, "PROBED_MAX", 2)
    prefixes = [s3.uri().split("?")[0].rsplit("/", 1)[1] for _ in range(3)]
    with s3_proxy(s3.port) as proxy:
        folders = [Folder(proxy.uri(s3.bucket, p)) / "rollouts" for p in prefixes]

        def probed() -> int:
            return len({s.path for s in proxy.seen if s.method == "PUT" and "probe" in s.path})

        folders[0].write_if("stage.json", b"one", None)
        probe_puts = [s for s in proxy.seen if s.method == "PUT" and "probe" in s.path]
        assert [s.headers.get("if-match") for s in probe_puts] == [None, objects.NO_ETAG, None]
        assert [s.headers.get("if-none-match") for s in probe_puts] == [None, None, "*"]
        folders[0].write_if("stage.json", b"two", b"one")
        folders[0].check_conditional()
        assert probed() == 1
        folders[1].write_if("stage.json", b"one", None)
        folders[2].write_if("stage.json", b"one", None)
        assert probed() == 3
        folders[2].write_if("stage.json", b"two", b"one")  # (remembered)
        folders[0].write_if("stage.json", b"three", b"two")  # (forgotten, the oldest of three)
        assert probed() == 4
    for p in prefixes:
        assert Folder(s3.uri(p)).names() == []
        assert (Folder(s3.uri(p)) / "rollouts").names() == ["stage.json"]


def test_a_store_answering_a_conditional_put_otherwise_than_412_is_refused_naming_its_answer(s3):
    """A store that answers a PUT whose condition does not hold 501 NotImplemented (or anything
    but S3's 412 or 409) is not taken for one that honours conditions: refused, its answer named,
    nothing written."""
    from tests.support.s3proxy import s3_proxy

    prefix = s3.uri().split("?")[0].rsplit("/", 1)[1]
    direct = Folder(s3.uri(prefix))
    direct.write("stage.json", b"one")
    unsupported = b"<Error><Code>NotImplemented</Code><Message>If-Match</Message></Error>"
    with s3_proxy(s3.port) as proxy:
        proxy.before = lambda seen: (501, unsupported) if "if-match" in seen.headers else None
        with pytest.raises(OSError, match="If-Match did not hold with 501 NotImplemented, not S3's 412"):
            Folder(proxy.uri(s3.bucket, prefix)).write_if("stage.json", b"two", b"one")
    assert direct.read("stage.json") == b"one"
    assert direct.names() == ["stage.json"]


def test_a_read_with_a_limit_reads_no_further_and_a_conditional_write_compares_no_further(root):
    """A reader that takes no file over ``limit`` (a stage record: 4 MiB) read whatever sat at
    its name whole, a file of gigabytes dropped there included; so did a conditional write's
    comparison with what it had read. Both read ``limit`` bytes and one more at most."""
    from vision_rollout.folders import WriteConflict

    folder = Folder(root) / "rollouts"
    folder.write("stage.json", b"x" * (1 << 20))
    assert folder.read("stage.json", 10) == b"x" * 11
    assert folder.read("stage.json", 1 << 21) == b"x" * (1 << 20)
    with pytest.raises(WriteConflict, match="changed since it was read"):
        folder.write_if("stage.json", b"two", b"x" * 10)
    with pytest.raises(WriteConflict, match="changed since it was read"):
        folder.write_if("stage.json", b"two", None)
    folder.write_if("stage.json", b"two", b"x" * (1 << 20))
    assert folder.read("stage.json") == b"two"


def test_a_stage_record_of_gigabytes_is_refused_without_being_read(tmp_path):
    """A file of 4 GiB at a stage record's name (sparse here) was read whole before its size was
    judged: a worker limited to 1 GiB of memory died on it (MemoryError). It is refused as not
    the stage's record, having read 4 MiB and a byte."""
    import subprocess
    import sys

    from vision_rollout.attempts import record_name

    folder = tmp_path / "run"
    folder.mkdir()
    with open(folder / record_name("run-a", 0), "wb") as f:
        f.truncate(4 << 30)
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); "
        "from vision_rollout import attempts; from vision_rollout.folders import Folder\n"
        "try:\n    attempts.load(Folder(sys.argv[1]), 'run-a', 0)\n"
        "except attempts.RecordError as exc:\n    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-500:]
    assert "is not the record of stage 1: over 4194304 bytes" in done.stdout


def test_a_store_that_sends_no_etag_is_named_not_a_crash(s3):
    """A conditional write needs the ETag of what it read: a store (or a proxy) that sends none
    made every read of a stage record a KeyError: 'ETag' in the poke. It is an OSError naming
    the object and what the store left out, nothing written."""
    from tests.support.s3proxy import s3_proxy

    prefix = s3.uri().split("?")[0].rsplit("/", 1)[1]
    direct = Folder(s3.uri(prefix))
    direct.write("stage.json", b"one")
    with s3_proxy(s3.port) as proxy:
        proxy.drop_response_headers = ("etag",)
        ours = Folder(proxy.uri(s3.bucket, prefix))
        with pytest.raises(OSError, match=r"stage\.json.*answered without an ETag"):
            ours.read("stage.json")
        with pytest.raises(OSError, match=r"stage\.json.*answered without an ETag"):
            ours.write_if("stage.json", b"two", b"one")
    assert direct.read("stage.json") == b"one"


def test_a_store_that_accepts_and_never_answers_is_given_up_on_after_a_few_short_tries(monkeypatch):
    """boto3's defaults (60 s a read, 60 s a connection, retried) held a run folder's read or
    conditional write on an S3 endpoint that accepts and never answers for three minutes: a
    poke makes several (its lease, its stage's record), each past the lease it renews. The
    client waits ``READ_TIMEOUT_S`` for an answer, ``ATTEMPTS`` times, then the call raises
    OSError naming the object."""
    import socket
    import threading

    from model_server import files

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:  # (closed: the test is over)
                return

    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.setattr(files, "READ_TIMEOUT_S", 0.2)
    files._s3_client.cache_clear()
    for name, value in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}.items():
        monkeypatch.setenv(name, value)
    folder = Folder(
        f"s3://bucket/run?endpoint_override=127.0.0.1:{server.getsockname()[1]}&scheme=http&region=us-east-1"
    )
    try:
        with pytest.raises(OSError, match=r"reading 'bucket/run/record\.json'"):
            folder.read("record.json")
        assert len(accepted) == files.ATTEMPTS
    finally:
        files._s3_client.cache_clear()
        server.close()
        for conn in accepted:
            conn.close()


# What sits at a file's name on a disk and is no regular file: a named pipe nobody writes to or
# reads (opened, a reader waited for a writer for good, a writer for a reader), a folder, a link
# (followed, one to /dev/zero read until memory ran out, without a limit).
NOT_REGULAR = pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda f: __import__("os").mkfifo(f), "a named pipe"),
        (lambda f: f.mkdir(), "a folder"),
        (lambda f: f.symlink_to("/dev/zero"), "a link"),
    ],
    ids=["fifo", "folder", "link-to-dev-zero"],
)


@NOT_REGULAR
@pytest.mark.timeout(60)
def test_what_is_no_regular_file_at_a_files_name_is_refused_naming_it_without_reading_it(tmp_path, make, needle):
    """A stage record's, the run's lease.json's or an outbox report's path on a disk holding a
    named pipe hung its reader (the poke, ``rolloutctl prune``) waiting for a writer; a link was
    followed. Each is an OSError naming the file and what it is, nothing read, whatever the
    reader; a regular file is read as before."""
    from vision_rollout import attempts

    folder = Folder(str(tmp_path))
    for name in ("lease.json", attempts.record_name("run-a", 0)):
        make(tmp_path / name)
        for limit in (10, None):  # (with a limit first: the link, followed, read no further)
            with pytest.raises(OSError, match=rf"{re.escape(str(tmp_path / name))} is {needle}, not a regular file"):
                folder.read(name, limit)
    with pytest.raises(OSError, match=r"is .*, not a regular file"):
        attempts.load(folder, "run-a", 0)
    folder.write("report.json", b"{}")
    assert folder.read("report.json") == b"{}"


@NOT_REGULAR
@pytest.mark.timeout(60)
def test_what_is_no_regular_file_at_a_guard_files_name_is_refused_naming_it(tmp_path, make, needle):
    """The guard files a conditional write (``.<name>.lock``) and the local lock
    (``<model>.guard``) flock were opened with ``open(path, "a")``: a named pipe there hung the
    write or the lock's acquire waiting for a reader, and a link was followed. Each is an OSError
    naming the file and what it is, nothing written; a guard that is a regular file works."""
    from vision_rollout.locks import FileLock

    folder = Folder(str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    make(tmp_path / "run" / ".record.json.lock")
    with pytest.raises(OSError, match=rf"\.record\.json\.lock is {needle}, not a regular file"):
        folder.write_if("record.json", b"{}", None)
    assert not (tmp_path / "run" / "record.json").exists()
    make(tmp_path / "digits.guard")
    with pytest.raises(OSError, match=rf"digits\.guard is {needle}, not a regular file"):
        FileLock("digits", tmp_path).acquire("run-a")
    assert not (tmp_path / "digits.lock").exists()
    folder.write_if("other.json", b"{}", None)
    assert folder.read("other.json") == b"{}"
    FileLock("mnist", tmp_path).acquire("run-a")


@pytest.mark.timeout(120)
def test_a_gcs_store_that_cannot_be_reached_is_given_up_on_within_its_retry_limit(monkeypatch, tmp_path):
    """pyarrow's GCS client retries a call it cannot make (no credentials reachable, an endpoint
    that never answers) for 15 minutes by default (google-cloud-cpp's retry policy): a gs://
    run folder's or prediction log's read held its task that long. ``filesystem`` gives a gs://
    URI ``retry_limit_seconds`` (``GCS_RETRY_LIMIT_S``) unless it sets its own: the call raises
    OSError once it is spent."""
    from model_server import files

    monkeypatch.setattr(files, "GCS_RETRY_LIMIT_S", 2.0, raising=False)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")  # (the credentials' server: none answers)
    monkeypatch.setenv("HOME", str(tmp_path))  # (no gcloud user credentials)
    folder = Folder("gs://bucket/run?endpoint_override=127.0.0.1:9&scheme=http")
    with pytest.raises(OSError, match="Retry policy exhausted"):
        folder.read("record.json")
    fs, _ = files.filesystem("gs://bucket/run?retry_limit_seconds=7")
    assert fs.__reduce__()[1][0]["retry_time_limit"].total_seconds() == 7


def test_a_gcs_store_whose_credentials_cannot_be_loaded_is_an_oserror_naming_it(monkeypatch, tmp_path, capsys):
    """pyarrow raises a GCS call's permanent failure of google-cloud-cpp's UNKNOWN status (a
    credentials file that cannot be loaded) as ArrowException, no OSError: every caller's
    "the store cannot be read" missed it, a poke failed on a traceback and ``rolloutctl audit``
    printed one. It is an OSError naming the store and the cause, as pyarrow's other store
    errors are; the CLI says it in one line, exit 4."""
    from model_server.predictionlog import read
    from tests.include.test_cli import run

    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "none.json"))
    folder = Folder("gs://bucket/run")
    for call in (lambda: folder.read("record.json"), folder.names, folder.folders, folder.changed):
        with pytest.raises(OSError, match="Cannot open credentials file"):
            call()
    now = datetime.now(UTC)
    with pytest.raises(OSError, match="Cannot open credentials file"):
        read("gs://bucket/log", now - timedelta(hours=1), now)
    code, out, err = run(capsys, "audit", "--prediction-log", "gs://bucket/log")
    assert (code, out) == (4, "")
    assert "Traceback" not in err
    assert err.count("\n") == 1
    assert "Cannot open credentials file" in err


def lock_waits(monkeypatch) -> threading.Event:
    """Set once a thread other than the test's finds a lock taken (``flock`` refusing it) and
    goes on to wait for it."""
    import types

    from vision_rollout import folders

    waited = threading.Event()
    real_flock = folders.fcntl.flock

    def flock(fd, op):
        try:
            return real_flock(fd, op)
        except BlockingIOError:
            if threading.current_thread() is not threading.main_thread():
                waited.set()
            raise

    monkeypatch.setattr(folders, "fcntl", types.SimpleNamespace(**{**vars(folders.fcntl), "flock": flock}))
    return waited


def test_a_folder_holding_more_than_a_listing_takes_is_listed_in_part_and_pruned_not(root, monkeypatch):
    """``names``, ``folders`` and ``changed`` listed a folder whole (a run folder of millions of
    files held them all in memory, for as long as its listing took), and prune took what it listed
    for all that was there. A listing holds ``MAX_LISTED`` entries at most (in S3 by pages, the
    log reader's ``list_folder``) and says it is partial; prune leaves such a folder as it is."""
    import time

    from vision_rollout import folders

    monkeypatch.setattr(folders, "MAX_LISTED", 4, raising=False)
    monkeypatch.setattr(folders, "LIST_PAGE", 2, raising=False)
    runs = Folder(root) / "rollouts" / "digits"
    for k in range(6):
        (runs / "crowded").write(f"stage-{k}.json", b"{}")
    (runs / "few").write("stage-1.json", b"{}")
    crowded, few = runs / "crowded", runs / "few"
    names, changed = crowded.names(), crowded.changed()
    assert len(names) == len(changed) == 4
    assert not names.complete
    assert not changed.complete
    assert few.names() == ["stage-1.json"]
    assert few.names().complete
    assert few.changed().complete
    assert runs.folders() == ["crowded", "few"]
    assert runs.folders().complete
    before = time.time() + 60  # (every file older: on a disk too)
    assert runs.prune(before, lambda n: n.startswith("stage-"), limit=10) == ["few"]
    monkeypatch.setattr(folders, "MAX_LISTED", 10, raising=False)
    assert len(crowded.names()) == 6  # (nothing in it removed)


def test_a_file_removed_while_a_conditional_write_of_it_runs_is_not_brought_back(tmp_path, monkeypatch):
    """On a disk, ``delete`` took no lock: a report another sender removed (posted) between a
    note's read and its write (``write_if``'s) was brought back by that write, and posted a second
    time. A file ``write_if`` wrote is removed under its lock: after the write, never within; and
    no guard file stays (it did: the emptied folder could not be removed)."""
    import threading

    folder = Folder(str(tmp_path)) / "outbox"
    folder.write_if("report.json", b"one", None)
    waited = lock_waits(monkeypatch)  # (the removal done, or waiting for the lock)
    real_remove = Folder.remove_temporaries
    removal: list[threading.Thread] = []

    def remove_temporaries(self, *args, **kwargs):  # (under the lock, its read done, its write not)
        if not removal:
            removal.append(threading.Thread(target=lambda: (folder.delete("report.json"), waited.set())))
            removal[0].start()
            waited.wait(60)  # (a bound: a removal that hung fails the test below, never hangs it)
        return real_remove(self, *args, **kwargs)

    monkeypatch.setattr(Folder, "remove_temporaries", remove_temporaries)
    folder.write_if("report.json", b"two", b"one")
    removal[0].join()
    assert folder.names() == []
    folder.delete("never-written-so.json")  # (no guard file: none made)
    assert list((tmp_path / "outbox").iterdir()) == []  # (nor one left)
    assert folder.remove_if_empty()


def test_a_removal_that_looked_for_the_lock_before_a_conditional_write_made_it_waits_for_it(tmp_path, monkeypatch):
    """``delete`` took the lock only where its guard file was there: a report a plain ``write``
    wrote (``_to_outbox``'s) had none until its first ``write_if`` (a note's) made it, and a
    removal that looked for it just before went on unlocked, between that write's read and its
    rename, which brought the removed report back (to be posted a second time). Every removal on
    a disk takes the lock, made for the while: it waits for the write, then removes the file;
    and neither leaves a guard file behind."""
    import threading

    from vision_rollout import folders

    folder = Folder(str(tmp_path)) / "outbox"
    folder.write("report.json", b"one")
    looked, read, waited = threading.Event(), threading.Event(), lock_waits(monkeypatch)
    real_guard_file = folders.guard_file

    def guard_file(path, create=True):  # (the removal, once it looked for the guard file)
        try:
            return real_guard_file(path, create)
        finally:
            if threading.current_thread() is not threading.main_thread():
                looked.set()
                read.wait(60)  # (a bound: the write's read done, it goes on)

    monkeypatch.setattr(folders, "guard_file", guard_file)
    real_remove = Folder.remove_temporaries

    def remove_temporaries(self, *args, **kwargs):  # (under the lock, its read done, its write not)
        read.set()
        waited.wait(60)  # (the removal done, or waiting for the lock)
        return real_remove(self, *args, **kwargs)

    monkeypatch.setattr(Folder, "remove_temporaries", remove_temporaries)
    removal = threading.Thread(target=lambda: (folder.delete("report.json"), waited.set()))
    removal.start()
    assert looked.wait(60)
    folder.write_if("report.json", b"two", b"one")
    removal.join()
    assert folder.names() == []
    assert list((tmp_path / "outbox").iterdir()) == []


def test_a_removal_that_waited_on_a_guard_file_its_holder_removed_locks_the_one_there_now(tmp_path, monkeypatch):
    """A lock's guard file is removed by its holder once done (``_guard``): a removal waiting on
    it then locks a file no longer there, while the next conditional write makes a new one and
    locks that. The removal locks the guard file there now, and waits for that write: it never
    removes the file between the write's read and its rename (which would bring it back)."""
    import fcntl
    import threading
    import types

    from vision_rollout import folders

    folder = Folder(str(tmp_path)) / "outbox"
    folder.write("report.json", b"one")
    blocked, locked, moved = threading.Event(), threading.Event(), threading.Event()
    real_flock, real_remove = folders.fcntl.flock, Folder.remove_temporaries

    def removal() -> bool:
        return threading.current_thread().name == "removal"

    def flock(fd, op):
        if removal() and op & fcntl.LOCK_EX and blocked.is_set():
            locked.wait(60)  # (its next try once the next write holds its own guard file)
        try:
            return real_flock(fd, op)
        except BlockingIOError:
            if removal():
                (moved if locked.is_set() else blocked).set()
            raise

    remover = threading.Thread(target=lambda: (folder.delete("report.json"), moved.set()), name="removal")

    def remove_temporaries(self, *args, **kwargs):  # (under the lock, its read done, its write not)
        if threading.current_thread().name == "next":
            locked.set()
            moved.wait(60)  # (the removal done, or waiting for this write)
        elif not remover.is_alive():
            remover.start()
            blocked.wait(60)  # (the removal waiting on this write's guard file)
        return real_remove(self, *args, **kwargs)

    monkeypatch.setattr(folders, "fcntl", types.SimpleNamespace(**{**vars(folders.fcntl), "flock": flock}))
    monkeypatch.setattr(Folder, "remove_temporaries", remove_temporaries)
    folder.write_if("report.json", b"two", b"one")
    following = threading.Thread(target=lambda: folder.write_if("report.json", b"three", b"two"), name="next")
    following.start()
    following.join()
    remover.join()
    assert folder.names() == []
    assert list((tmp_path / "outbox").iterdir()) == []


def test_a_file_removed_on_a_disk_stays_removed_after_a_crash(tmp_path, monkeypatch):
    """A write syncs its folder (``write_private``), a removal did not: after a crash a report
    removed once posted could be back in the outbox, and posted again. Its folder is synced once
    it is gone; nothing to sync where nothing was there."""
    from vision_rollout import folders

    folder = Folder(str(tmp_path)) / "outbox"
    folder.write("report.json", b"{}")
    synced: list[object] = []
    monkeypatch.setattr(folders, "sync_folder", synced.append, raising=False)
    folder.delete("report.json")
    assert synced == [tmp_path / "outbox"]
    assert folder.names() == []
    folder.delete("report.json")
    (folder / "nowhere").delete("report.json")
    assert synced == [tmp_path / "outbox"]


def test_a_removal_whose_folder_another_prune_removes_right_after_it_ends_without_an_error(tmp_path, monkeypatch):
    """A removal synced its folder once its lock was released: another process's prune emptying
    the same folder (``remove_if_empty``) could remove it in between, and the sync's open raised
    FileNotFoundError, though the file was gone, cutting that prune short. The folder is synced
    under the lock, whose guard file keeps it from being removed meanwhile."""
    from model_server.files import sync_folder
    from vision_rollout import folders

    runs = Folder(str(tmp_path))
    run = runs / "run-a"
    run.write("record.json", b"{}")
    removed: list[bool] = []

    def removed_then_synced(path):  # (another process's prune, right before the sync)
        removed.append((runs / "run-a").remove_if_empty())
        sync_folder(path)

    monkeypatch.setattr(folders, "sync_folder", removed_then_synced)
    run.delete("record.json")
    assert removed == [False]  # (its lock's guard file there: not empty)
    assert not (tmp_path / "run-a" / "record.json").exists()
    assert run.remove_if_empty()


def locked_guards(monkeypatch) -> list[str]:
    """The names of the guard files locked from now on (``folders.guard_file``'s calls), in order."""
    from vision_rollout import folders

    locked: list[str] = []
    real_guard_file = folders.guard_file

    def guard_file(path, create=True):
        locked.append(path.name)
        return real_guard_file(path, create)

    monkeypatch.setattr(folders, "guard_file", guard_file)
    return locked


def test_a_temporary_is_removed_without_a_lock_leaving_no_guard_file_a_prune_could_not_attribute(tmp_path, monkeypatch):
    """A prune removing a write's temporary (``.<name>.<pid>.tmp``) through ``delete`` locked it,
    making a guard file ``..<name>.<pid>.tmp.lock``; a prune killed under that lock left it, and
    no later prune removed it (a guard of a temporary is attributed to no file of its own): the
    run's folder stayed for good. A temporary is removed without a lock, as
    ``remove_temporaries`` removes one (no conditional write of it to wait for): no guard file."""
    import os
    import time

    runs = Folder(str(tmp_path))
    (runs / "run-a").write("record.json", b"{}")
    (tmp_path / "run-a" / ".record.json.4242.tmp").write_bytes(b"{")  # (a write killed mid-way)
    guards = locked_guards(monkeypatch)
    old = time.time() - 40 * 86400
    for p in [*(tmp_path / "run-a").iterdir(), tmp_path / "run-a"]:
        os.utime(p, (old, old))
    assert runs.prune(time.time() - 30 * 86400, {"record.json"}.__contains__, 10) == ["run-a"]
    assert guards == [".record.json.lock"]
    assert runs.folders() == []


def test_a_guard_file_a_killed_removal_left_is_removed_under_its_lock_with_the_temporaries(tmp_path, monkeypatch):
    """A removal on a disk locks ``.<name>.lock`` beside the file, made for it and removed once
    done: one killed after removing the file, before removing its guard, left the guard there
    for good (no later write or removal of that name came), and the pruners that empty a
    folder through ``remove_temporaries`` (the audit's hours, the stage caches) could not
    remove the folder. ``remove_temporaries`` removes such a guard once older than ``before``,
    under its lock (``delete``); a younger one (a lock being held) stays, as a temporary does."""
    import os
    import time

    run = Folder(str(tmp_path)) / "run-a"
    run.write("record.json", b"{}")
    (tmp_path / "run-a" / "record.json").unlink()  # (a removal killed under its lock: its guard left)
    (tmp_path / "run-a" / ".record.json.lock").write_bytes(b"")
    (tmp_path / "run-a" / ".notes.json.lock").write_bytes(b"")  # (a lock of someone else's name)
    (tmp_path / "run-a" / ".stage.json.lock").write_bytes(b"")  # (a lock being held: recent)
    old = time.time() - 7200
    for name in (".record.json.lock", ".notes.json.lock"):
        os.utime(tmp_path / "run-a" / name, (old, old))
    locked = locked_guards(monkeypatch)
    ours = {"record.json", "stage.json"}.__contains__
    assert run.remove_temporaries(ours, time.time() - 3600, dry_run=True) == [".record.json.lock"]
    assert locked == []
    assert run.remove_temporaries(ours, time.time() - 3600) == [".record.json.lock"]
    assert locked == [".record.json.lock"]  # (removed under its lock)
    assert sorted(p.name for p in (tmp_path / "run-a").iterdir()) == [".notes.json.lock", ".stage.json.lock"]
    (tmp_path / "run-a" / ".notes.json.lock").unlink()
    assert not run.remove_if_empty()
    assert run.remove_temporaries(ours, time.time() + 1) == [".stage.json.lock"]
    assert run.remove_if_empty()


@pytest.mark.parametrize("op", ["delete", "write_if"])
def test_a_stale_nfs_handle_from_flock_names_the_file_and_the_mount_options(tmp_path, monkeypatch, op):
    """On NFS, ``flock`` of a file's guard file can fail with ESTALE (a handle the server no longer
    knows: the file removed by another machine, a name cached by the client): the outbox's removal
    or conditional write (a report's claim, its note: a report's send before its post) failed with a
    bare "[Errno 116] Stale file handle", naming no file nor what to check. It now fails, not retried, with
    an OSError (ESTALE still) naming the guard file and what to check: the mount's locking and
    ``lookupcache=none``, as the README says; nothing written nor removed."""
    import errno
    import types

    from vision_rollout import folders

    folder = Folder(str(tmp_path / "outbox"))
    folder.write("r.json", b"{}")

    def stale(fd, operation):
        raise OSError(errno.ESTALE, "Stale file handle")

    monkeypatch.setattr(folders, "fcntl", types.SimpleNamespace(**{**vars(folders.fcntl), "flock": stale}))
    with pytest.raises(OSError, match="Stale file handle") as e:
        folder.delete("r.json") if op == "delete" else folder.write_if("r.json", b"[]", b"{}")
    assert e.value.errno == errno.ESTALE
    message = str(e.value)
    assert str(tmp_path / "outbox" / ".r.json.lock") in message
    assert "lookupcache=none" in message
    assert "nolock" in message
    assert folder.read("r.json") == b"{}"


@pytest.mark.parametrize("op", ["delete", "write_if"])
@pytest.mark.parametrize("step", ["opening", "looking up", "removing", "unlocking"])
def test_a_stale_nfs_handle_at_any_step_of_a_lock_names_the_file_and_the_mount_options(tmp_path, monkeypatch, op, step):
    """ESTALE (NFS) opening a file's guard file, looking it up (is it the one held still?), or
    at the end, looking it up to remove it or unlocking it, went up bare ("[Errno 116] Stale
    file handle"), unlike ``flock``'s: no file named, nothing said of the mount. Each is now an
    OSError (ESTALE still) naming the step, the guard file and the mount options to check, and
    whether the removal or write under the lock was done."""
    import errno
    import types
    from pathlib import Path

    from vision_rollout import folders

    folder = Folder(str(tmp_path / "outbox"))
    folder.write("r.json", b"{}")
    guard = tmp_path / "outbox" / ".r.json.lock"

    def stale(*args, **kwargs):
        raise OSError(errno.ESTALE, "Stale file handle")

    if step == "opening":
        monkeypatch.setattr(folders, "guard_file", stale)
    elif step == "unlocking":
        real_flock = folders.fcntl.flock

        def flock(fd, operation):
            return stale() if operation == folders.fcntl.LOCK_UN else real_flock(fd, operation)

        monkeypatch.setattr(folders, "fcntl", types.SimpleNamespace(**{**vars(folders.fcntl), "flock": flock}))
    else:
        real_lstat, looked = Path.lstat, []

        def lstat(self, *args, **kwargs):
            if self == guard:
                looked.append(self)
                if len(looked) == (1 if step == "looking up" else 2):
                    stale()
            return real_lstat(self, *args, **kwargs)

        monkeypatch.setattr(Path, "lstat", lstat)
    with pytest.raises(OSError, match="Stale file handle") as e:
        folder.delete("r.json") if op == "delete" else folder.write_if("r.json", b"[]", b"{}")
    assert e.value.errno == errno.ESTALE
    message = str(e.value)
    assert f"{step} {guard}" in message
    assert "lookupcache=none" in message
    assert "nolock" in message
    done = step in ("removing", "unlocking")
    assert ("done" in message) is done
    assert ("nothing written nor removed" in message) is not done
    if not done:
        assert folder.read("r.json") == b"{}"
    elif op == "delete":
        assert not folder.exists("r.json")
    else:
        assert folder.read("r.json") == b"[]"


def _stale_at(monkeypatch, guard, step):
    """ESTALE (NFS) at ``step`` of the lock of the guard file ``guard``: its second look-up, the
    one before removing it ("removing"), or its unlocking."""
    import errno
    import types

    from vision_rollout import folders

    def stale(*args, **kwargs):
        raise OSError(errno.ESTALE, "Stale file handle")

    if step == "unlocking":
        real_flock = folders.fcntl.flock

        def flock(fd, operation):
            return stale() if operation == folders.fcntl.LOCK_UN else real_flock(fd, operation)

        monkeypatch.setattr(folders, "fcntl", types.SimpleNamespace(**{**vars(folders.fcntl), "flock": flock}))
        return
    real_same, looked = folders._same_file, []

    def same_file(opened, path):
        if path == guard:
            looked.append(path)
            if len(looked) == 2:
                stale()
        return real_same(opened, path)

    monkeypatch.setattr(folders, "_same_file", same_file)


@pytest.mark.parametrize("op", ["delete", "write_if"])
def test_a_stale_nfs_handle_closing_a_guard_file_names_it_and_the_mount_options(tmp_path, monkeypatch, op):
    """ESTALE (NFS) closing a file's guard file once done went up bare, unlike the lock's other
    steps. It is named as they are: the step, the guard file, the mount options, and that the
    write or removal was done."""
    import errno

    from vision_rollout import folders

    real = folders.guard_file

    class StaleAtClose:
        def __init__(self, opened):
            self.opened = opened

        def fileno(self):
            return self.opened.fileno()

        def close(self):
            self.opened.close()
            raise OSError(errno.ESTALE, "Stale file handle")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

    folder = Folder(str(tmp_path))
    folder.write("r.json", b"{}")
    monkeypatch.setattr(folders, "guard_file", lambda *args, **kwargs: StaleAtClose(real(*args, **kwargs)))
    with pytest.raises(OSError, match=f"Stale file handle closing {tmp_path / '.r.json.lock'}") as e:
        folder.delete("r.json") if op == "delete" else folder.write_if("r.json", b"[]", b"{}")
    assert e.value.errno == errno.ESTALE
    assert "lookupcache=none" in str(e.value)
    assert "the write or removal under its lock done" in str(e.value)
    assert not folder.exists("r.json") if op == "delete" else folder.read("r.json") == b"[]"


def test_a_stale_nfs_handle_removing_a_leftover_guard_file_says_it_is_not_removed(tmp_path, monkeypatch):
    """A guard file a killed writer left, deleted (under its own lock: the guard's removal is
    the deletion), whose removal answered ESTALE: the error said "the write or removal under its
    lock done" while the file was still there. It says what is so: nothing removed."""
    import errno

    leftover = tmp_path / ".r.json.lock"
    leftover.write_bytes(b"")
    _stale_at(monkeypatch, leftover, "removing")
    with pytest.raises(OSError, match="Stale file handle removing") as e:
        Folder(str(tmp_path)).delete(".r.json.lock")
    assert e.value.errno == errno.ESTALE
    assert "nothing written nor removed" in str(e.value)
    assert leftover.exists()


@pytest.mark.parametrize("step", ["removing", "unlocking"])
def test_a_stale_nfs_handle_after_a_write_conflict_leaves_the_conflict_to_go_up(tmp_path, monkeypatch, caplog, step):
    """A conditional write that found the file changed (WriteConflict: a report's claim another
    sender took) whose guard file's removal or unlocking then answered ESTALE: the ESTALE went up
    in its place, the conflict (which callers act on) lost. The conflict goes up; the ESTALE,
    naming the guard file, is logged."""
    import logging

    from vision_rollout.folders import WriteConflict

    folder = Folder(str(tmp_path))
    folder.write("r.json", b"{}")
    guard = tmp_path / ".r.json.lock"
    _stale_at(monkeypatch, guard, step)
    with caplog.at_level(logging.WARNING), pytest.raises(WriteConflict, match="changed since it was read"):
        folder.write_if("r.json", b"[]", b"[1]")
    assert f"Stale file handle {step} {guard}" in caplog.text
    assert folder.read("r.json") == b"{}"


@pytest.mark.parametrize("op", ["delete", "write_if"])
def test_a_stale_nfs_handle_of_a_guard_file_its_holder_removed_locks_the_one_there_now(tmp_path, monkeypatch, op):
    """On NFSv3 a waiter holds the guard file open while the holder, on another machine, finishes
    and removes it: the waiter's next ``flock`` of that removed file answers ESTALE. That is the
    guard file "removed by its holder meanwhile" that a waiter reopens; the ESTALE failed the
    removal or conditional write (a report's claim) blaming the mount options. The guard file at
    the name is no longer the one held: the waiter locks the one there now and goes on."""
    import errno
    import types

    from vision_rollout import folders

    folder = Folder(str(tmp_path / "outbox"))
    folder.write("r.json", b"{}")
    guard = tmp_path / "outbox" / ".r.json.lock"
    real = folders.fcntl.flock
    calls = []

    def flock(fd, operation):
        calls.append(operation)
        if len(calls) == 1:
            raise BlockingIOError(errno.EAGAIN, "held by another machine")
        if len(calls) == 2:  # (the holder finished and removed its guard file: this handle is stale)
            guard.unlink()
            raise OSError(errno.ESTALE, "Stale file handle")
        return real(fd, operation)

    monkeypatch.setattr(folders, "fcntl", types.SimpleNamespace(**{**vars(folders.fcntl), "flock": flock}))
    if op == "delete":
        folder.delete("r.json")
        assert not (tmp_path / "outbox" / "r.json").exists()
    else:
        folder.write_if("r.json", b"[]", b"{}")
        assert folder.read("r.json") == b"[]"
    assert not guard.exists()


@pytest.mark.parametrize("how", ["pickle", "copy", "deepcopy"])
def test_a_path_that_is_no_file_can_be_pickled_and_copied(how):
    """NotAFile, an OSError built from its path and what sits there, could not be pickled nor
    copied (a TypeError: its __init__ given the message alone): the error Airflow hands on from a
    task's process was lost in another error. It comes back as it was, ``why`` too."""
    import copy
    import pickle

    from vision_rollout.folders import NotAFile

    back = {"pickle": lambda e: pickle.loads(pickle.dumps(e)), "copy": copy.copy, "deepcopy": copy.deepcopy}[how]
    error = NotAFile("/run/spec.json", "a named pipe, not a regular file")
    again = back(error)
    assert (type(again), str(again), again.why) == (NotAFile, str(error), error.why)


def test_a_stale_lock_says_a_removal_done_only_where_its_file_is_gone(tmp_path, monkeypatch):
    """An ESTALE (NFS) after a removal under a guard file's lock says whether the removal was done
    by looking at the file removed: ``os.path.lexists``, False on any OSError, read the file as
    gone (the removal "done") where the look-up itself failed (ESTALE, EIO). Only a file not
    found (ENOENT) is gone; one that cannot be looked at leaves it unknown, and says so."""
    import errno
    import os

    from vision_rollout.folders import stale_guard

    gone, guard = tmp_path / "r.json", tmp_path / ".r.json.lock"
    real_lstat = os.lstat

    def lstat(path, *args, **kwargs):
        if os.fspath(path) == str(gone):
            raise OSError(errno.EIO, "Input/output error")
        return real_lstat(path, *args, **kwargs)

    said = {}
    for case in ("not found", "unreadable"):
        if case == "unreadable":
            monkeypatch.setattr(os, "lstat", lstat)
        with (
            pytest.raises(OSError, match="Stale file handle removing") as e,
            stale_guard("removing", guard, True, gone),
        ):
            raise OSError(errno.ESTALE, "Stale file handle")
        said[case] = str(e.value)
    assert said["not found"].endswith("the write or removal under its lock done")
    assert "removal under its lock done" not in said["unreadable"]
    assert f"not known whether the write or removal under its lock was done ({gone}" in said["unreadable"]
