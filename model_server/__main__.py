"""``python -m model_server`` / ``model-server``: start the server on a model repository."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import os
import secrets
import socket
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

# Only light modules here: the arguments are parsed and checked before the inference stack
# (onnxruntime, numpy, pandas, pyarrow: seconds) is imported, so a bad one ends the start at once.
from model_server.config import (
    MAX_ADMIN_CONNECTIONS,
    MAX_CONNECTIONS,
    MAX_COPY_AGE_S,
    MAX_FLUSH_S,
    MAX_JSON_BYTES,
    MAX_QUEUE,
    MIN_FLUSH_S,
    NAME_RE,
    SHOW_LOG,
    ascii_uint,
    copy_age_problem,
    int64_version,
)
from model_server.errors import MaskingUnavailable, ServerError
from model_server.files import folder_problem

if TYPE_CHECKING:
    from collections.abc import Callable

    from model_server.masking import Masker
    from model_server.predictionlog import PredictionLog

log = logging.getLogger("model_server")


def bounded(
    noun: str, low: float, high: float = math.inf, *, above: bool = False, whole: bool = False
) -> Callable[[str], float]:
    """An argument's type: a finite number (``whole``: an int) from ``low`` (``above``: past it)
    to ``high``; out of range, NaN or infinite, argparse's error naming the flag says so."""

    def parse(text: str) -> float:
        value: float | None
        if whole:
            value = ascii_uint(text.strip())
        else:
            try:
                value = float(text)
            except ValueError:
                value = None
        if value is None or not (low < value if above else low <= value) or not value <= high or value == math.inf:
            bound = f"{'above' if above else 'at least'} {low:g}" + (
                f" and at most {high:g}" if high < math.inf else ""
            )
            raise argparse.ArgumentTypeError(f"must be {noun} {bound}, got {text[:40]!r}")
        return value

    return parse


at_least_one = bounded("a whole number", 1, whole=True)
positive_mb = bounded("a number of MiB", 0, above=True)
positive_s = bounded("seconds", 0, above=True)
MAX_KEEP_ALIVE_S = 3600.0
keep_alive_s = bounded("seconds", 0, MAX_KEEP_ALIVE_S, above=True)


def copy_age(text: str) -> float:
    """--shadow-copy-max-age: seconds above 0 and at most ``MAX_COPY_AGE_LIMIT_S``."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    problem = copy_age_problem(value, text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


def parser(kind: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The server's arguments, as ``parse_args`` reads them. ``kind``: the parser's class (the
    one-machine stack's pods read a container's ``--admin-port`` with one whose ``error`` raises)."""
    p = kind(prog="model-server", description=__doc__)
    p.add_argument("--repository", type=Path, required=True, help="model repository folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--admin-port",
        type=int,
        help="serve the admin API (traffic, load/unload, fault injection) on this port only, the data "
        "port answering it 404 (default: every call on --port)",
    )
    p.add_argument(
        "--load-model",
        action="append",
        metavar="NAME",
        help="model to load at start (repeatable); default: every model in the repository",
    )
    p.add_argument(
        "--serve",
        action="append",
        default=[],
        metavar="MODEL:VERSION",
        help="serve exactly this version of this model (repeatable; a pod of one version's Deployment): "
        "loaded at start, the server ready only once it is, and no load or unload may change it",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="execution provider: CUDA where a GPU is found (auto), or forced",
    )
    token = p.add_mutually_exclusive_group()
    token.add_argument("--admin-token", help="bearer token for admin calls (prefer --admin-token-file)")
    token.add_argument("--admin-token-file", type=Path, help="file holding the admin bearer token")
    p.add_argument(
        "--allow-open-admin",
        action="store_true",
        help="start without an admin token on a --host that is not loopback: the admin API (load, unload, "
        "traffic, fault injection) open to whoever reaches the port (refused otherwise)",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        help="where traffic policies persist across restarts (default: <repository>/.state)",
    )
    p.add_argument(
        "--traffic-file",
        type=Path,
        help='policy file watched for changes: {"models": {"<model>": <traffic policy>}}',
    )
    p.add_argument(
        "--shadow-queue",
        type=at_least_one,
        default=256,
        help="mirrored requests that may wait for the shadow; more are dropped and counted",
    )
    p.add_argument(
        "--shadow-queue-mb",
        type=positive_mb,
        default=256.0,
        help="the inputs of the waiting mirrored requests together; more are dropped and counted",
    )
    p.add_argument(
        "--shadow-copy-max-age",
        type=copy_age,
        default=MAX_COPY_AGE_S,
        metavar="S",
        help="seconds a shadow copy may wait for idle time (Istio's from its arrival, the server's own mirror's "
        "from when it was queued; at most 60: the audit's margin); then dropped and counted too_old",
    )
    p.add_argument("--shadow-workers", type=at_least_one, default=2, help="concurrent shadow executions")
    p.add_argument(
        "--mesh-mirror",
        action="store_true",
        help="a mesh in front mirrors requests (Istio, Envoy: a copy's Host ends in -shadow): serve such a copy as "
        "the shadow's. Without it the server is its own mesh, mirroring in process, and a -shadow Host is a client's",
    )
    p.add_argument(
        "--prediction-log",
        metavar="URI",
        help="append every inference and label here: a folder, file:///path or s3://bucket/prefix "
        "(S3 options as query parameters, e.g. ?endpoint_override=host:port&scheme=http; "
        "credentials from the AWS_* variables)",
    )
    p.add_argument("--shadow-log", metavar="DIR", help="deprecated: the old name of --prediction-log (a folder)")
    p.add_argument(
        "--show-prediction-log",
        choices=SHOW_LOG,
        default="admin",
        help="to whom GET /v2 says where the prediction log is written (parameters.prediction_log): "
        "callers with the admin token (default; anyone without --admin-token), everyone, or nobody",
    )
    p.add_argument(
        "--replica-id",
        default=None,
        help="this process's name in the log's file names and records (default: <hostname>-<pid>)",
    )
    p.add_argument(
        "--prediction-log-flush-s",
        "--shadow-log-flush-s",
        dest="prediction_log_flush_s",
        type=bounded("seconds", MIN_FLUSH_S, MAX_FLUSH_S),
        default=2.0,
        help="seconds between the writer's flushes (one file per model and hour each)",
    )
    p.add_argument(
        "--prediction-log-sample",
        type=bounded("a share", 0, 1),
        default=1.0,
        help="share of primary requests logged, by request id (requests of a mirrored version, "
        "requests naming their version, shadow copies and labels are always logged)",
    )
    p.add_argument("--prediction-log-topk", type=at_least_one, default=5, help="classes kept per prediction (top-k)")
    p.add_argument(
        "--prediction-log-full-max",
        type=bounded("a whole number", 0, whole=True),
        default=32,
        help="keep the whole probability vector when it has at most this many classes",
    )
    p.add_argument(
        "--mask-keys",
        type=Path,
        help="masking key file (default for a folder log: created beside it, mode 0600; required for object storage)",
    )
    p.add_argument(
        "--mask-header",
        action="append",
        default=[],
        metavar="NAME",
        help="header whose whole value is masked in the prediction log (repeatable)",
    )
    p.add_argument(
        "--feedback-ttl-s",
        type=positive_s,
        default=3600.0,
        help="how long a served prediction waits for its label",
    )
    p.add_argument(
        "--feedback-key-file",
        type=Path,
        help="secret of the feedback tokens, shared by every replica (default: made in the state folder)",
    )
    p.add_argument(
        "--feedback-capacity",
        type=at_least_one,
        default=200_000,
        help="served items (a batch of N is N) kept for labels",
    )
    p.add_argument("--max-body-mb", type=positive_mb, default=64.0, help="request body limit (413 above)")
    p.add_argument(
        "--max-bodies-mb",
        type=positive_mb,
        help="the request bodies being received on all connections together (503 with Retry-After above; "
        "default: 4 x --max-body-mb)",
    )
    p.add_argument(
        "--max-json-mb",
        type=positive_mb,
        default=MAX_JSON_BYTES / 2**20,
        help="limit of an infer request's JSON part and of any other JSON body (413 above)",
    )
    p.add_argument(
        "--max-queue",
        type=at_least_one,
        default=MAX_QUEUE,
        help="requests queued in one version's dynamic batcher, whatever its max_queue_size (0 is unbounded, "
        "as in Triton); more are refused 503 'exceeds maximum queue size'",
    )
    p.add_argument(
        "--feedback-max-items", type=at_least_one, default=1000, help="labels in one feedback call (413 above)"
    )
    p.add_argument(
        "--max-connections",
        type=at_least_one,
        default=MAX_CONNECTIONS,
        help="open connections served (each runs one request at a time: this bounds the requests in flight "
        "too), admitted at their first request; the requests of one whose first finds them all admitted are "
        "refused 503 with Retry-After, on both ways, and it is closed; "
        "health, model readiness and metrics probes are still answered; one not admitted is closed after 5 s idle, "
        "and past twice it not admitted a connection is closed as it is accepted",
    )
    p.add_argument(
        "--max-admin-connections",
        type=at_least_one,
        default=MAX_ADMIN_CONNECTIONS,
        help="as --max-connections, for the --admin-port: each port counts its own connections, so a flood on "
        "the data port leaves the admin API served",
    )
    p.add_argument(
        "--request-timeout",
        type=positive_s,
        default=30.0,
        help="seconds to receive the headers, and then the body; and for a client to read 64 KiB of its answers",
    )
    p.add_argument(
        "--keep-alive-timeout",
        type=keep_alive_s,
        default=75.0,
        help=f"seconds an idle connection is kept open (at most {MAX_KEEP_ALIVE_S:g})",
    )
    p.add_argument(
        "--exit-on-error",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="exit when a model fails to load at start (as Triton does)",
    )
    p.add_argument(
        "--access-log",
        action="store_true",
        help="one JSON log line per inference (primary and shadow) with request and trace ids",
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    if args.max_bodies_mb is not None and args.max_bodies_mb < args.max_body_mb:
        # Every body between the two would be refused 503 "retry shortly", and no retry fit.
        p.error(
            f"--max-bodies-mb {args.max_bodies_mb:g} is below --max-body-mb {args.max_body_mb:g}: "
            "the bodies being received together must hold at least one body of the largest size"
        )
    return args


def pins(specs: list[str]) -> dict[str, int]:
    """``--serve MODEL:VERSION`` values as {model: version}; ValueError naming a bad one."""
    pinned: dict[str, int] = {}
    for spec in specs:
        name, _, version = spec.rpartition(":")
        number = int64_version(version)
        if not NAME_RE.match(name) or not number:
            raise ValueError(f"--serve {spec!r}: give MODEL:VERSION, a model name and a version >= 1")
        if pinned.get(name, number) != number:
            raise ValueError(f"--serve names two versions of model {name!r}: a server serves one")
        pinned[name] = number
    return pinned


def admin_port_problem(admin_port: int) -> str | None:
    """Why ``--admin-port`` is refused at the start (no TCP port one can listen on), or None."""
    return None if 1 <= admin_port <= 65535 else f"--admin-port {admin_port} is not a TCP port (1 to 65535)"


def listeners(host: str, port: int, admin_port: int | None) -> list[socket.socket]:
    """The bound sockets: the data port, and the admin port when given (ValueError or OSError
    naming a bad or busy port). Bound here rather than by uvicorn, which binds one."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} is not a TCP port (0 to 65535)")
    if admin_port is not None and (problem := admin_port_problem(admin_port)):
        raise ValueError(problem)
    if port == admin_port:
        raise ValueError(f"--admin-port {admin_port} is --port: give the admin API a port of its own")
    ports = [port] if admin_port is None else [port, admin_port]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn decides
    bound: list[socket.socket] = []
    try:
        for p in ports:
            try:
                bound.append(socket.create_server((host, p), family=family))
            except OSError as exc:
                raise OSError(f"cannot listen on {host}:{p}: {exc.strerror}") from None
    except OSError:
        for sock in bound:
            sock.close()
        raise
    return bound


def admin_token(args: argparse.Namespace) -> str | None:
    """The admin token, or None (admin calls open); ValueError naming its source, never quoting it."""
    source = "--admin-token-file"
    if args.admin_token_file is not None:
        try:
            token = args.admin_token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"admin token file {args.admin_token_file}: cannot be read: {getattr(exc, 'strerror', None) or exc}"
            ) from None
        if not token:
            raise ValueError(f"admin token file {args.admin_token_file} is empty")
    else:
        source = "--admin-token" if args.admin_token else "MODEL_SERVER_ADMIN_TOKEN"
        token = args.admin_token or os.environ.get("MODEL_SERVER_ADMIN_TOKEN") or ""
    if any(ord(c) < 32 or ord(c) == 127 for c in token):
        raise ValueError(
            f"the admin token ({source}) holds a line break or another control character: no "
            "Authorization header can carry it, and every admin call would be refused"
        )
    if not token.isascii():
        raise ValueError(
            f"the admin token ({source}) holds a character that is not printable ASCII: an Authorization "
            "header carries bytes, and clients send such a token as UTF-8 or Latin-1, so admin calls would "
            "be refused or taken only in one of them; use ASCII letters, digits and punctuation"
        )
    return token or None


def is_loopback(host: str) -> bool:
    """Whether ``--host`` is reachable from this machine only (a name other than localhost: no)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_admin_problem(args: argparse.Namespace) -> str | None:
    """Without an admin token every admin call is answered: refused on a --host others reach,
    unless --allow-open-admin says so; said (a warning) in any case."""
    where = f"--host {args.host}" + ("" if args.admin_port is None else f" port {args.admin_port}")
    if not is_loopback(args.host) and not args.allow_open_admin:
        return (
            f"no admin token, and {where} is not loopback: the admin API (load, unload, traffic, fault "
            "injection) would be open to anyone who reaches it; give --admin-token-file (or --admin-token, "
            "MODEL_SERVER_ADMIN_TOKEN), or --allow-open-admin to start so on purpose"
        )
    log.warning(
        "no admin token: the admin API (load, unload, traffic, fault injection) is open to anyone who reaches %s",
        where,
    )
    return None


def state_dir(args: argparse.Namespace) -> Path | None:
    """The traffic state folder: a named one must be writable; the default may not be."""
    path = args.state_dir or args.repository / ".state"
    try:
        (path / "traffic").mkdir(parents=True, exist_ok=True)
        probe = path / "traffic" / ".write-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        if args.state_dir is not None:
            raise SystemExit(f"model-server: cannot write --state-dir {path}: {exc}") from None
        log.warning("cannot write %s (%s): traffic policies will not survive a restart", path, exc)
        return None
    return path / "traffic"


def feedback_key(args: argparse.Namespace, state: Path | None) -> bytes:
    """The key of feedback tokens: --feedback-key-file (the same for every replica, so that any
    of them takes a label for a prediction another served), else one made in the state folder."""
    if args.feedback_key_file is not None:
        path, create = args.feedback_key_file, False
    elif state is not None:
        path, create = state.parent / "feedback-key", True
    else:
        log.warning(
            "no --feedback-key-file and no state folder: feedback tokens are this process's own, and "
            "labels for another replica's answers, or for answers from before a restart, get 401"
        )
        return secrets.token_bytes(32)
    from model_server.feedback import read_key

    try:
        return read_key(path, create=create)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"model-server: feedback key {path}: {exc}") from None


def masker(args: argparse.Namespace, state: Path | None) -> Masker:
    """The masker of the prediction log and of every log line. Its key file: --mask-keys, or
    one made (mode 0600) beside a folder prediction log, else in the state folder, else in a
    private temporary folder (tokens in the logs then mask without a way back). With a
    prediction log, a key file without a usable default key stops the start."""
    from model_server.masking import KeyRing, Masker, create_key_file

    keys = args.mask_keys
    uri = args.prediction_log or args.shadow_log
    if keys is None:
        if uri is not None and "://" in uri and not uri.startswith("file://"):
            raise SystemExit("model-server: a prediction log on object storage needs --mask-keys FILE")
        if uri is not None:
            folder = Path(uri.removeprefix("file://"))
            keys = folder.with_name(folder.name + ".mask-keys.json")
        elif state is not None:
            keys = state.parent / "mask-keys.json"
        else:
            keys = Path(tempfile.mkdtemp(prefix="model-server-")) / "mask-keys.json"
        if not keys.exists():
            create_key_file(keys)
            log.info("created masking key file %s (mode 0600)", keys)
    ring = KeyRing(keys)
    if uri is not None:  # every record of the log needs the default key: without it, each would be dropped
        try:
            ring.key_for(None)
        except MaskingUnavailable as exc:
            raise SystemExit(f"model-server: the prediction log's masking keys: {exc}") from None
    return Masker(ring, args.mask_header)


def prediction_log(args: argparse.Namespace, masker: Masker) -> PredictionLog | None:
    """The writer, or None without --prediction-log (or its old name --shadow-log)."""
    from model_server.predictionlog import REPLICA_RE, PredictionLog, default_replica

    if args.prediction_log and args.shadow_log:
        raise SystemExit("model-server: give --prediction-log or its old name --shadow-log, not both")
    uri = args.prediction_log or args.shadow_log
    if uri is None:
        return None
    problem = folder_problem(uri)
    if problem:  # (the URI is not repeated: it may hold a secret)
        raise SystemExit(f"model-server: --prediction-log is not a folder: {problem}")
    if args.shadow_log:
        log.warning("--shadow-log is deprecated: use --prediction-log %s", uri)
    replica = default_replica() if args.replica_id is None else args.replica_id
    if not REPLICA_RE.fullmatch(replica):
        raise SystemExit(f"model-server: invalid --replica-id {replica!r}: 1 to 64 of A-Z a-z 0-9 _ . -")
    try:
        return PredictionLog(
            uri,
            masker,
            replica=replica,
            flush_s=args.prediction_log_flush_s,
            sample=args.prediction_log_sample,
            topk=args.prediction_log_topk,
            full_max=args.prediction_log_full_max,
        )
    except (ValueError, OSError) as exc:
        raise SystemExit(f"model-server: --prediction-log {uri}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from model_server.metrics import export_gpu_gauges, visible_gpus

    gpus = visible_gpus()
    if args.device == "cuda" and not gpus:
        print("model-server: --device cuda, but NVML finds no GPU that CUDA_VISIBLE_DEVICES shows", file=sys.stderr)
        return 2
    if not args.repository.is_dir():  # before the default state folder is made inside it
        print(f"model-server: model repository {args.repository} is not a folder", file=sys.stderr)
        return 2
    try:  # before the models load: a bad token file ends the start at once
        token = admin_token(args)
    except ValueError as exc:
        print(f"model-server: {exc}", file=sys.stderr)
        return 2
    problem = None if token is not None else open_admin_problem(args)
    if problem is not None:
        print(f"model-server: {problem}", file=sys.stderr)
        return 2
    try:
        pinned = pins(args.serve)
    except ValueError as exc:
        print(f"model-server: {exc}", file=sys.stderr)
        return 2
    # The arguments are checked: now the inference stack.
    import uvicorn

    from model_server.app import Settings, create_app
    from model_server.httpserver import limited_protocol
    from model_server.masking import LogMasking
    from model_server.model import select_providers
    from model_server.repository import ModelRepository

    if args.access_log:  # after the imports: model_server.trace's sets it off
        logging.getLogger("model_server.access").setLevel(logging.INFO)
    state = state_dir(args)
    try:
        loads = state.parent / "loads" if state is not None else None
        providers = select_providers(args.device, len(gpus))
        repo = ModelRepository(args.repository, providers, loads)
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"model-server: {exc}", file=sys.stderr)
        return 2
    if "CUDAExecutionProvider" in providers:
        export_gpu_gauges(gpus)
    mask = masker(args, state)
    for handler in logging.getLogger().handlers:
        handler.addFilter(LogMasking(mask))
    plog = prediction_log(args, mask)
    repo.pinned = pinned
    repo.max_queue = args.max_queue
    for name, version in repo.pinned.items():
        try:
            repo.load(name, {"version_policy": {"specific": {"versions": [version]}}}, persist=False)
            log.info("serving model %r version %s (--serve)", name, version)
        except ServerError as exc:
            if args.exit_on_error:
                print(f"model-server: --serve {name}:{version}: {exc.message}", file=sys.stderr)
                return 1
            log.error("--serve %s:%s: %s; not ready until it loads", name, version, exc.message)
    for name in [] if repo.pinned else args.load_model or repo.names():
        wanted, override = repo.persisted(name)  # as the last load or unload left it
        if not wanted:
            log.info("model %r stays unloaded, as it was before the restart", name)
            continue
        try:
            versions = repo.load(name, override, persist=False)
            log.info("model %r ready, versions %s", name, versions)
        except ServerError as exc:
            if args.exit_on_error:
                print(f"model-server: {exc.message}", file=sys.stderr)
                return 1
    try:
        sockets = listeners(args.host, args.port, args.admin_port)
    except (OSError, ValueError) as exc:
        print(f"model-server: {exc}", file=sys.stderr)
        return 2
    settings = Settings(
        admin_port=args.admin_port,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_bodies_bytes=int((args.max_bodies_mb or 4 * args.max_body_mb) * 1024 * 1024),
        max_json_bytes=int(args.max_json_mb * 1024 * 1024),
        feedback_max_items=args.feedback_max_items,
        request_timeout_s=args.request_timeout,
        admin_token=token,
        show_prediction_log=args.show_prediction_log,
        state_dir=state,
        traffic_file=args.traffic_file,
        shadow_queue=args.shadow_queue,
        shadow_queue_bytes=int(args.shadow_queue_mb * 1024 * 1024),
        shadow_copy_max_age_s=args.shadow_copy_max_age,
        mesh_mirror=args.mesh_mirror,
        shadow_workers=args.shadow_workers,
        feedback_capacity=args.feedback_capacity,
        feedback_ttl_s=args.feedback_ttl_s,
        feedback_key=feedback_key(args, state),
    )
    app = create_app(repo, settings, plog)
    config = uvicorn.Config(
        app,
        log_level=args.log_level,
        access_log=False,
        log_config=None,  # uvicorn's records reach the root handlers, and their masking
        timeout_keep_alive=args.keep_alive_timeout,
        http=limited_protocol(
            args.request_timeout, app.direct, args.max_connections, args.admin_port, args.max_admin_connections
        ),
    )
    server = uvicorn.Server(config)
    server.run(sockets=sockets)  # one event loop, one app, a listener per port
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
