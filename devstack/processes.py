"""Local processes of the one-machine setup: start a model server on loopback, scrape it, stop it.

Used by the tests, the benchmarks and ``make demo``; services listen on 127.0.0.1 only, on a
free port, and are stopped by whoever started them, by process id.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from vision_rollout.metrics import parse_exposition
from vision_rollout.serving import ModelServerAdmin

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")
logger = logging.getLogger(__name__)


def source_path(source: Path) -> str:
    """The PYTHONPATH of a copy of this project's code, as the Makefile sets it."""
    return os.pathsep.join(str(source / p) for p in ("", "include", "plugins"))


PYTHONPATH = source_path(ROOT)


# free_port hands out ports below the kernel's ephemeral range (which bind(0) and connect() draw
# from), each process its own turn through them from a random start, and each pytest-xdist worker
# its own slice: a port picked for a server is not picked again, here or by another test worker,
# in the second or two before that server binds it.
PORTS_FROM = 10000


def port_slice(environ: Mapping[str, str] = os.environ) -> range:
    """This process's ports: its test worker's share of PORTS_FROM up to the ephemeral range."""
    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return range(0)
    workers = max(int(environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), 1)
    worker = int(environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")) % workers
    size = max(ephemeral - PORTS_FROM, 0) // workers
    return range(PORTS_FROM + worker * size, PORTS_FROM + (worker + 1) * size)


_PORTS = port_slice()
_next_port = itertools.count(secrets.randbelow(len(_PORTS) or 1))


def free_port() -> int:
    """A port free on 127.0.0.1 now, for a server about to bind it."""
    for _ in range(min(len(_PORTS), 1000)):
        port = _PORTS[next(_next_port) % len(_PORTS)]
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no range of our own (or all of it taken): the kernel's choice
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PortTaken(RuntimeError):
    """Another process listens on the port a server this code started was to bind."""


def proc_hex(packed: bytes, byteorder: Literal["little", "big"] = sys.byteorder) -> str:
    """An address (``packed``, as inet_pton gives it) as /proc/net/tcp and tcp6 write it: 32-bit
    words, each in the host's byte order."""
    return "".join(f"{int.from_bytes(packed[i : i + 4], byteorder):08X}" for i in range(0, len(packed), 4))


# The local addresses a connection to 127.0.0.1 reaches: 127.0.0.1, either family's wildcard (a
# [::] socket with IPV6_V6ONLY does not take it: v6_only_listeners tells which), and ::ffff:127.0.0.1.
LOOPBACK = frozenset(
    proc_hex(socket.inet_pton(family, address))
    for family, address in (
        (socket.AF_INET, "127.0.0.1"),
        (socket.AF_INET, "0.0.0.0"),  # noqa: S104 (an address to look for, not to bind)
        (socket.AF_INET6, "::"),
        (socket.AF_INET6, "::ffff:127.0.0.1"),
    )
)


ANY_V6 = proc_hex(socket.inet_pton(socket.AF_INET6, "::"))

TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")


def v6_only_listeners() -> set[str] | None:
    """The ``socket:[inode]`` links of the listening IPv6 TCP sockets with IPV6_V6ONLY (a [::] one
    takes no connection to 127.0.0.1), as the kernel's socket diagnostics (sock_diag, what ``ss``
    reads) say; None where they cannot be asked (no netlink: macOS, some sandboxes)."""
    nlmsg, sock_diag_by_family, done, error = struct.Struct("=IHHII"), 20, 3, 2
    listen_only = 1 << 10  # (TCP_LISTEN: 10)
    request = struct.pack("=BBBxI", socket.AF_INET6, socket.IPPROTO_TCP, 0, listen_only) + bytes(48)
    out: set[str] = set()
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4) as nl:  # (NETLINK_SOCK_DIAG)
            nl.settimeout(2)
            nl.sendall(nlmsg.pack(nlmsg.size + len(request), sock_diag_by_family, 0x301, 1, 0) + request)
            while True:  # (NLM_F_REQUEST | NLM_F_DUMP: the replies until NLMSG_DONE)
                data, at = nl.recv(1 << 16), 0
                while at + nlmsg.size <= len(data):
                    length, kind = nlmsg.unpack_from(data, at)[:2]
                    if kind in (done, error) or length < nlmsg.size:
                        return out if kind == done else None
                    # inet_diag_msg: 4 bytes, the socket's id (48), expires, queues, uid, then inode
                    # (offset 68); then attributes: INET_DIAG_SKV6ONLY (11), one byte.
                    msg = data[at + nlmsg.size : at + length]
                    inode, attr = struct.unpack_from("=I", msg, 68)[0], 72
                    while attr + 4 < len(msg):
                        size, kind = struct.unpack_from("=HH", msg, attr)
                        if kind == 11 and msg[attr + 4]:
                            out.add(f"socket:[{inode}]")
                        attr += max((size + 3) & ~3, 4)
                    at += (length + 3) & ~3
    except (OSError, AttributeError, struct.error):  # (AttributeError: no AF_NETLINK)
        return None


def listening_sockets(ports: Iterable[int]) -> set[str] | None:
    """The ``socket:[inode]`` links (as /proc/PID/fd has them) of the sockets listening where a
    connection to 127.0.0.1 on one of ``ports`` lands; None where the tables cannot tell: neither
    can be read (no /proc: macOS) or neither lists any listening socket (WSL1, some sandboxes)."""
    wanted, out, known, any_v6 = set(ports), set(), False, set()
    for table in TCP_TABLES:
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == "0A":  # state 0A: LISTEN
                    known = True
                    address, _, port = fields[1].rpartition(":")
                    if address in LOOPBACK and int(port, 16) in wanted:
                        out.add(f"socket:[{fields[9]}]")
                        if address == ANY_V6:  # ([::] takes 127.0.0.1 unless IPV6_V6ONLY)
                            any_v6.add(f"socket:[{fields[9]}]")
    if any_v6:
        out -= any_v6 & (v6_only_listeners() or set())  # (counted where sock_diag cannot tell)
    return out if known else None


def holds_any(pid: int, sockets: set[str]) -> bool:
    """Whether process ``pid`` has one of ``sockets`` open (False once it exited)."""
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) in sockets:
                    return True
    return False


def lineage() -> dict[int, tuple[int, int, int]]:
    """Each process's parent, process group and session, by process id: one scan of /proc (empty
    without one)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid, pgrp, session = stat.read_text().rpartition(")")[2].split()[1:4]  # fields 4 to 6
            out[int(stat.parent.name)] = (int(ppid), int(pgrp), int(session))
    return out


def parents(table: Mapping[int, tuple[int, int, int]] | None = None) -> dict[int, int]:
    """Each process's parent, by process id (``table``: lineage(), read when not given)."""
    return {pid: ppid for pid, (ppid, _, _) in (lineage() if table is None else table).items()}


def descendants(pid: int, parent_of: Mapping[int, int]) -> set[int]:
    """The processes ``pid`` started, the ones they started, and so on (``parent_of``: parents())."""
    return _below([pid], _children_of(parent_of))


def _children_of(parent_of: Mapping[int, int]) -> dict[int, list[int]]:
    """Each process's children, by process id: one pass over ``parent_of``."""
    below: dict[int, list[int]] = {}
    for child, parent in parent_of.items():
        below.setdefault(parent, []).append(child)
    return below


def _below(roots: Iterable[int], children_of: Mapping[int, list[int]]) -> set[int]:
    """The descendants of each of ``roots`` (not the roots, unless one is another's)."""
    out: set[int] = set()
    todo = [child for root in roots for child in children_of.get(root, ())]
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo += children_of.get(p, ())
    return out


def kin(pid: int, table: Mapping[int, tuple[int, int, int]]) -> set[int]:
    """The processes of ``pid``'s making (``table``: lineage()): its descendants, and where it leads
    a process group or a session (started with start_new_session), each process in them, with
    theirs. A daemon's listener, forked twice, is a child of init but keeps its session (or group).
    An id that leads a group or a session is not given to another process while it lasts. The
    map of children is made once (a session of many processes not read again for each)."""
    led = {p for p, (_, pgrp, session) in table.items() if pid in (pgrp, session) and p != pid}
    return _below([pid, *led], _children_of(parents(table))) | led


def children(pid: int) -> set[int]:
    """The processes whose parent is ``pid``."""
    return {child for child, parent in parents().items() if parent == pid}


Holder = bool | None | Literal["unknown"]
_unknown_logged = False


def port_holder(pid: int, port: int) -> Holder:
    """Who listens on 127.0.0.1:``port``: True for process ``pid`` or a process it started (or they
    did: a server's workers; or one of its session or group: kin), False for another process, None for none (yet), "unknown" where the
    TCP tables cannot tell (listening_sockets: None; said once in the log)."""
    global _unknown_logged
    sockets = listening_sockets([port])
    if sockets is None:
        if not _unknown_logged:
            _unknown_logged = True
            logger.warning(
                "cannot tell which process listens on a port (%s unreadable or listing no listening "
                "socket): servers started here are taken for their port's without that check",
                " and ".join(TCP_TABLES),
            )
        return "unknown"
    if not sockets:
        return None
    if holds_any(pid, sockets):
        return True
    return any(holds_any(p, sockets) for p in kin(pid, lineage()))


def whose_port(proc: subprocess.Popen[bytes], port: int) -> Holder | Literal["another"]:
    """port_holder for ``proc``, asked twice before another is named: "another" where another
    process holds 127.0.0.1:``port`` (``proc`` cannot bind it, and what answers there is not its
    own); False where ``proc`` exited (a server that crashed once it bound its port, between the
    read of the listening sockets and the walk of its file descriptors, is not "held by another
    process": its exit says why); else port_holder's answer."""
    holder = port_holder(proc.pid, port)
    if holder is False:
        # Another's only if it still listens there once more, with ours still running after.
        holder = port_holder(proc.pid, port)
        if holder is False and proc.poll() is None:
            return "another"
    return holder


def listening(proc: subprocess.Popen[bytes], port: int, what: str) -> Holder:
    """whose_port for ``proc``: True when it (or one it started) listens on 127.0.0.1:``port``
    now, so that what answers there is its own; "unknown" where the tables cannot tell (asked as
    before). PortTaken when another process holds the port. False when ``proc`` exited: the
    caller's check of its exit reports its code and log."""
    holder = whose_port(proc, port)
    if holder == "another":
        raise PortTaken(f"{what}: port {port} is held by another process{_holders(port)}")
    return holder


def _holders(port: int) -> str:
    """The text " (pid N, name)" for each process holding a socket that listens on 127.0.0.1:``port``
    (its name, not its command line: another's arguments may hold a secret); "" where none is
    seen. A scan of every process's descriptors: for an error's message only."""
    sockets = listening_sockets([port]) or set()
    found = []
    for pid in sorted(parents()):
        if holds_any(pid, sockets):
            with contextlib.suppress(OSError):
                found.append(f"pid {pid}, {Path(f'/proc/{pid}/comm').read_text().strip()}")
    return f" ({'; '.join(found)})" if found else ""


PORT_TRIES = 3  # a server's tries of a port picked free, the first one's included


def on_a_free_port(start: Callable[[int], T], port: int | None) -> T:
    """``start(port)``; without ``port``, ``start`` on a free port, picked again (PORT_TRIES in
    all) when another process binds it first (``start`` raising PortTaken, its process stopped)."""
    if port:
        return start(port)
    tried = []
    while True:
        tried.append(free_port())
        try:
            return start(tried[-1])
        except PortTaken as exc:
            if len(tried) == PORT_TRIES:
                raise PortTaken(f"ports {', '.join(map(str, tried))} tried: {exc}") from exc


def start_mark(pid: int) -> str | None:
    """What tells this process from a later one given the same id (after a reboot, or once ids
    wrap): the boot's id and the process's start time in clock ticks since boot; None where no
    process has this id."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"  # field 22; the name before ')' may hold spaces


def alive(pid: int) -> bool:
    """Whether a process with this id exists (a zombie counts until reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (loopback URL we built)
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def port_in_use(log: str, port: int) -> bool:
    """Whether ``log`` says its process could not bind ``port``: a line "address already in use"
    naming the port (the model server's, Prometheus', uvicorn's), or werkzeug's "Port N is in use"."""
    lines = re.findall(r"(?im)^.*address already in use.*$", log)
    return any(re.search(rf"(?<![0-9]){port}(?![0-9])", line) for line in lines) or (
        bool(lines) and re.search(rf"(?i)\bport {port} is in use\b", log) is not None
    )


def spawn(cmd: list[str], log: Path, **kw: Any) -> subprocess.Popen[bytes]:
    """``cmd`` started with its output (stdout and stderr) in ``log``, written anew."""
    with log.open("wb") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)


@dataclass
class ManagedProcess:
    """A service this code started: stopped by its process id, SIGTERM then SIGKILL."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    _owned: bool = field(default=False, init=False, repr=False)  # its port's listening socket is its own

    def owns_port(self, what: str) -> Holder:
        """``listening`` for this process on its port, asked until it is its own (another cannot
        take a port it listens on); stopped when another process holds the port."""
        if self._owned:
            return True
        try:
            holder = listening(self.proc, self.port, what)
        except PortTaken:
            self.stop()
            raise
        self._owned = holder is True
        return holder

    def wait_for(
        self,
        what: str,
        ready: Callable[[], bool],
        wait_s: float,
        every_s: float,
        tail: int = 3000,
        not_yet: tuple[type[Exception], ...] = (OSError,),
    ) -> bool:
        """Ask ``ready()`` every ``every_s`` until it is True (True), asked only while this process
        holds its port (owns_port: PortTaken, the process stopped, where another holds it); an
        error of ``not_yet`` from it (a refused connection) is "not yet", another raised at once.
        The process's exit is raised (exited, with ``tail``). False once ``wait_s`` passed: the
        caller says what was not ready."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            ours = self.owns_port(what)
            if self.proc.poll() is not None:
                raise self.exited(what, tail)
            try:
                if ours and ready():
                    return True
            except not_yet:
                pass
            time.sleep(every_s)
        return False

    def exited(self, what: str, tail: int = 3000) -> RuntimeError:
        """What to raise once the process exited: its code and its log's last ``tail`` characters;
        PortTaken where it could not bind its port ("Address already in use", where no listening
        socket showed another's: one bound but not listening, or one gone since)."""
        text = self.log.read_text(errors="replace")[-tail:] if tail else self.log.read_text(errors="replace")
        message = f"{what} exited with {self.proc.returncode}:\n{text}"
        return PortTaken(message) if self.port and port_in_use(text, self.port) else RuntimeError(message)

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@dataclass
class ModelServerProcess(ManagedProcess):
    """A server speaking the v2 protocol: this project's model server, or another started
    through it (KServe's, a benchmark's floor server), which ``name`` says in its errors."""

    token: str | None = None
    url: str = field(init=False)  # host:port, as tritonclient takes it
    name: str = field(default="model server", kw_only=True)

    def __post_init__(self) -> None:
        self.url = f"127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://{self.url}"

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def client(self, **kw: Any) -> Any:
        import tritonclient.http as httpclient

        return httpclient.InferenceServerClient(self.url, **kw)

    @property
    def api(self) -> ModelServerAdmin:
        return ModelServerAdmin(self.http, self.token)

    def load_versions(self, model: str, *versions: int | str) -> None:
        """Serve exactly these versions (Triton's load API with a specific version policy)."""
        self.api.load(model, versions)

    def wait_until(self, health: str = "ready", timeout_s: float = 60.0) -> None:
        """Wait until /v2/health/<health> ("live" or "ready") answers 200 from this process (on a
        port it listens on, not another's: PortTaken); RuntimeError (with the log) when the
        process exits first or ``timeout_s`` passes."""

        def answers() -> bool:
            return _get(f"{self.http}/v2/health/{health}", timeout=1)[0] == 200

        if self.wait_for(self.name, answers, timeout_s, 0.1, tail=0):
            return
        raise RuntimeError(f"{self.name} not {health} within {timeout_s:g} s:\n{self.log.read_text()}")

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample's value from /metrics as Prometheus reads it; None when absent."""
        _, body = _get(f"{self.http}/metrics")
        for sample, sample_labels, value in parse_exposition(body.decode()):
            if sample == name and all(sample_labels.get(k) == v for k, v in labels.items()):
                return value
        return None


def start_model_server(
    repository: Path,
    log_dir: Path,
    *args: str,
    token: str | None = None,
    port: int | None = None,
    wait_s: float = 60.0,
    until: str = "ready",
    source: Path = ROOT,
) -> ModelServerProcess:
    """Start ``python -m model_server`` on 127.0.0.1 and wait until it is ready (``until``
    "live": until it answers, ready or not); ``source``: another copy of this project's code
    (a benchmark's earlier commit).

    Traffic policies persist under ``log_dir`` unless ``--state-dir`` is among ``args``.

    The admin token travels in a 0600 file, never on the command line (visible in ``ps``),
    removed once the server has started (it reads the file once, at its start).

    Without ``port``, on a free port, picked again where another process binds it first.
    """

    def start(port: int) -> ModelServerProcess:
        log_dir.mkdir(parents=True, exist_ok=True)
        opts, state = args, log_dir / f"state-{port}"
        if "--state-dir" not in args:  # never leave policies behind in a shared repository
            opts = (*args, "--state-dir", str(state))
        log = log_dir / f"model-server-{port}.log"
        made = [path for path in (log, state) if not path.exists()]  # removed if the port is given up
        cmd = [
            sys.executable,
            "-m",
            "model_server",
            "--repository",
            str(repository),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *opts,
        ]
        token_file = log_dir / f"admin-token-{port}"
        if token:
            token_file.unlink(missing_ok=True)  # (one left by a crash: its mode is not ours to trust)
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token)
            cmd += ["--admin-token-file", str(token_file)]
        # Another copy runs its own code alone (this environment's PYTHONPATH points at this one).
        inherited = os.environ.get("PYTHONPATH", "") if source == ROOT else ""
        pythonpath = os.pathsep.join(p for p in (source_path(source), inherited) if p)
        env = {**os.environ, "PYTHONPATH": pythonpath, "ORT_DISABLE_TELEMETRY": "1"}
        server = ModelServerProcess(spawn(cmd, log, env=env, cwd=source), port, log, token)
        try:
            server.wait_until(until, wait_s)
        except RuntimeError as exc:
            server.stop()
            if isinstance(exc, PortTaken):
                for path in made:
                    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            raise
        finally:  # read once at the server's start: no copy of the token left behind
            if token:
                token_file.unlink(missing_ok=True)
        return server

    return on_a_free_port(start, port)


@dataclass
class PrometheusProcess(ManagedProcess):
    targets: int = 0  # its static targets (the model-server job's)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_scraped(self, wait_s: float = 30.0) -> PrometheusProcess:
        """Once every static target has been scraped successfully (as this process answers: PortTaken
        where another holds its port); stopped if not within ``wait_s``."""

        def scraped() -> bool:  # (ready is not enough: target discovery starts scraping up to 5 s later)
            status, body = _get(f"{self.url}/api/v1/targets?state=active", timeout=1)
            if status != 200:
                return False
            active = json.loads(body)["data"]["activeTargets"]
            static = [t for t in active if t["discoveredLabels"].get("__meta_filepath") is None]
            return len(static) == self.targets and all(t["health"] == "up" for t in static)

        if self.wait_for("prometheus", scraped, wait_s, 0.2, not_yet=(OSError, ValueError, KeyError)):
            return self
        self.stop()
        raise RuntimeError(f"prometheus not ready within {wait_s:g} s:\n{self.log.read_text()[-3000:]}")


def start_prometheus(
    targets: list[str],
    work_dir: Path,
    scrape_interval_s: float = 1.0,
    port: int | None = None,
    wait_s: float = 30.0,
    jobs: tuple[dict[str, Any], ...] = (),
    wait: bool = True,
) -> PrometheusProcess:
    """Debian's ``prometheus`` on 127.0.0.1 with its own config and data folder, scraping ``targets``.

    Returns once every target has been scraped successfully (``wait_scraped``); at once without
    ``wait``, for a caller that starts the targets meanwhile (the 5 s before Prometheus' first
    scrape run beside their start) and then waits. ``jobs``: more scrape jobs, as Prometheus'
    configuration has them (the one-machine cluster's: its pods found through a file,
    ``manifests.scrape_job``); their targets are not waited for. Without ``port``, on a free
    port, picked again where another process binds it first (when waiting).
    """
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("prometheus is not installed: apt-get install --no-install-recommends prometheus")
    work_dir.mkdir(parents=True, exist_ok=True)
    config = work_dir / "prometheus.yml"
    config.write_text(
        "global:\n"
        f"  scrape_interval: {scrape_interval_s:g}s\n"
        f"  evaluation_interval: {scrape_interval_s:g}s\n"
        "scrape_configs:\n"
        + (
            f"  - job_name: model-server\n    static_configs:\n      - targets: {json.dumps(targets)}\n"
            if targets
            else ""
        )
        + "".join(f"  - {json.dumps(job)}\n" for job in jobs)  # JSON is YAML
    )
    log = work_dir / "prometheus.log"

    def start(port: int) -> PrometheusProcess:
        cmd = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={work_dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
        ]
        prom = PrometheusProcess(spawn(cmd, log), port, log, len(targets))
        return prom.wait_scraped(wait_s) if wait else prom

    return on_a_free_port(start, port)


S3_BUCKET = "predictions"
S3_CREDENTIALS = {  # moto's: any key is accepted; the model servers and readers take them from the environment
    "AWS_ACCESS_KEY_ID": "test-access-key",
    "AWS_SECRET_ACCESS_KEY": "test-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass
class S3Process(ManagedProcess):
    """An S3 API on loopback (moto's server mode) with one bucket: object storage for the prediction log."""

    bucket: str = S3_BUCKET

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def uri(self, prefix: str) -> str:
        """A prefix in the bucket, as the model server and the reader take it."""
        return f"s3://{self.bucket}/{prefix}?endpoint_override={self.endpoint}&scheme=http&region=us-east-1"

    def filesystem(self) -> Any:
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            access_key=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            secret_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            endpoint_override=self.endpoint,
            scheme="http",
            region="us-east-1",
            allow_bucket_creation=True,
        )


def start_s3(work_dir: Path, port: int | None = None, wait_s: float = 60.0) -> S3Process:
    """``python -m moto.server`` on 127.0.0.1 with the bucket made; stopped by its pid. Without
    ``port``, on a free port, picked again where another process binds it first."""
    work_dir.mkdir(parents=True, exist_ok=True)
    log = work_dir / "moto.log"

    def start(port: int) -> S3Process:
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        server = S3Process(spawn(cmd, log, env={**os.environ, **S3_CREDENTIALS}), port, log)
        last: OSError = ConnectionRefusedError(f"moto server does not listen on 127.0.0.1:{port} yet")

        def bucket_made() -> bool:
            nonlocal last
            try:
                server.filesystem().create_dir(server.bucket)
            except OSError as exc:
                last = exc  # (raised once the time is up, as before)
                raise
            return True

        try:
            if server.wait_for("moto server", bucket_made, wait_s, 0.2):
                return server
        except BaseException:  # (another error than a connection's: raised at once, as before)
            server.stop()
            raise
        server.stop()
        raise last

    return on_a_free_port(start, port)


AIRFLOW_COMPONENTS = (
    ("scheduler", "--skip-serve-logs"),
    ("dag-processor",),
    ("triggerer", "--skip-serve-logs"),
    ("api-server",),
)


@dataclass
class AirflowProcesses:
    """The four processes ``airflow standalone`` runs, on loopback, each with its pid and log.

    ``airflow standalone`` itself starts the scheduler's and triggerer's log servers on all
    interfaces (the host is hard-coded); here they are off (``--skip-serve-logs``): the API
    server reads the task logs from the shared folder.
    """

    home: Path
    port: int
    components: dict[str, ManagedProcess]
    user: str
    password: str  # generated once, in AIRFLOW_HOME/admin-password (0600)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, timeout_s: float = 30.0) -> None:
        for proc in self.components.values():  # the API server last: it reports the others' state
            if proc.proc.poll() is None:
                os.killpg(proc.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in self.components.values():
            try:
                proc.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.proc.pid, signal.SIGKILL)
                proc.proc.wait(timeout=5)


def airflow_env(
    home: Path, port: int, connections: dict[str, dict[str, Any]], extra: dict[str, str] | None = None
) -> dict[str, str]:
    """Environment of the local Airflow: settings, generated secrets in 0600 files, connections,
    and ``extra`` (the object store's credentials, as a worker's pod would have them)."""
    import secrets

    from cryptography.fernet import Fernet

    home.mkdir(parents=True, exist_ok=True)

    def secret(name: str, make: Any = lambda: secrets.token_urlsafe(32)) -> str:
        path = home / name
        if not path.exists():
            path.touch(mode=0o600)
            path.write_text(make())
        return path.read_text().strip()

    passwords = home / "simple_auth_manager_passwords.json"
    passwords.touch(mode=0o600)
    passwords.write_text(json.dumps({"admin": secret("admin-password", lambda: secrets.token_urlsafe(12))}))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": PYTHONPATH,
        "ORT_DISABLE_TELEMETRY": "1",
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__FERNET_KEY": secret("fernet-key", lambda: Fernet.generate_key().decode()),
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__API__SECRET_KEY": secret("api-secret-key"),
        "AIRFLOW__API_AUTH__JWT_SECRET": secret("jwt-secret"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
    }
    env.update(extra or {})
    env.pop("AIRFLOW__CORE__UNIT_TEST_MODE", None)
    for conn_id, conn in connections.items():
        env[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(conn)
    return env


def start_airflow(
    home: Path,
    connections: dict[str, dict[str, Any]],
    port: int | None = None,
    wait_s: float = 180.0,
    extra_env: dict[str, str] | None = None,
) -> AirflowProcesses:
    """Migrate the database, start Airflow's components on 127.0.0.1, wait until all are healthy
    (the API server answering from its port: PortTaken where another process holds it). Without
    ``port``, on a free port, picked again where another process binds it first (the database
    migrated once: it is the same whichever port the API server takes)."""
    airflow = str(Path(sys.executable).parent / "airflow")
    env = airflow_env(home, port or 0, connections, extra_env)
    migrate = subprocess.run([airflow, "db", "migrate"], env=env, capture_output=True, text=True, cwd=ROOT)
    if migrate.returncode:
        raise RuntimeError(f"airflow db migrate failed:\n{migrate.stdout[-2000:]}{migrate.stderr[-3000:]}")

    def start(port: int) -> AirflowProcesses:
        env = airflow_env(home, port, connections, extra_env)
        (home / "logs").mkdir(exist_ok=True)
        components: dict[str, ManagedProcess] = {}
        stack = AirflowProcesses(home, port, components, "admin", (home / "admin-password").read_text().strip())
        for name, *flags in AIRFLOW_COMPONENTS:
            log = home / "logs" / f"{name}.log"
            with log.open("ab") as f:
                proc = subprocess.Popen(  # (the scheduler with the tasks' modules imported: devstack.airflow_main)
                    [sys.executable, "-m", "devstack.airflow_main", name, *flags],
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=ROOT,
                    start_new_session=True,
                )
            components[name] = ManagedProcess(proc, port if name == "api-server" else 0, log)
        deadline = time.monotonic() + wait_s
        ours: Holder = None
        while time.monotonic() < deadline:
            try:  # (asked until the socket is its own)
                ours = ours if ours is True else listening(components["api-server"].proc, port, "airflow api-server")
            except PortTaken:
                stack.stop()
                raise
            dead = [n for n, p in components.items() if p.proc.poll() is not None]
            if dead:
                stack.stop()
                logs = "\n".join(f"--- {n}:\n{components[n].log.read_text()[-2000:]}" for n in dead)
                api = components["api-server"]
                taken = "api-server" in dead and isinstance(api.exited("airflow api-server"), PortTaken)
                raise (PortTaken if taken else RuntimeError)(f"airflow {', '.join(dead)} exited:\n{logs}")
            try:
                status, body = _get(f"{stack.url}/api/v2/monitor/health", timeout=2) if ours else (0, b"")
                if status == 200:
                    health = json.loads(body)
                    if all(
                        health.get(c, {}).get("status") == "healthy"
                        for c in ("metadatabase", "scheduler", "triggerer", "dag_processor")
                    ):
                        return stack
            except (OSError, ValueError):
                pass
            time.sleep(1)
        stack.stop()
        raise RuntimeError(f"airflow not healthy within {wait_s:g} s; logs in {home / 'logs'}")

    return on_a_free_port(start, port)


def local_connections(
    server: ModelServerProcess,
    prometheus_url: str,
    repository: Path,
    prediction_log: Path | str,
    run_dir: Path,
) -> dict[str, dict[str, Any]]:
    """The Airflow connections of the one-machine stack (no ``slack_api_default``: the outbox)."""
    host, port = prometheus_url.rsplit("/", 1)[-1].rsplit(":", 1)
    return {
        "model_server_default": {
            "conn_type": "http",
            "host": "127.0.0.1",
            "port": server.port,
            "password": server.token,
            "extra": {"repository": str(repository), "prediction_log": str(prediction_log), "run_dir": str(run_dir)},
        },
        "prometheus_default": {"conn_type": "http", "host": host, "port": int(port)},
    }
