"""An object in S3 read whole, with its ETag, in one GET, and written only if it is still the one
read (``If-Match: <ETag>``, or ``If-None-Match: *`` for one read absent): what pyarrow's
filesystems do not do (a read there is a HEAD for the size and then GETs, which a PUT landing in
between cuts; its PUTs have no condition).

The client is boto3's (``model_server.files.s3_client``, which the log's paged listings use too),
set up from the folder URI's options as pyarrow's S3 filesystem takes them (``endpoint_override``,
``scheme``, ``tls_ca_file_path``, ``tls_verify_certificates``; the region pyarrow resolved), with
path-style addressing under an endpoint override as pyarrow's, and the credentials from the same
default chain (``AWS_*`` in the environment, the profile, the pod's web identity, the instance's
role): none is in the URI (``folder_problem``) or logged.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from typing import Any

# A PUT's condition that did not hold: 412 (another writer's PUT landed since the read), 404
# (the object read was deleted since), 409 (S3's ConditionalRequestConflict: a write of it
# racing this one).
CONFLICTS = ("PreconditionFailed", "NoSuchKey", "ConditionalRequestConflict")
PROBE_PREFIX = ".conditional-put-probe-"  # the probe's object under the folder (a killed prober's: pruned)
PROBE_AGE_S = 3600  # a probe object older than this was left by a prober killed mid-probe
NO_ETAG = '"00000000000000000000000000000000"'  # (an ETag no object the probe puts has)
PROBED_MAX = 256  # stores (endpoint, bucket, prefix) a process remembers honouring conditions
_probed: dict[tuple[str, str, str], None] = {}
_probed_lock = threading.Lock()


class ConditionsIgnored(OSError):
    """The store wrote a PUT whose ``If-Match`` or ``If-None-Match`` did not hold: it does not
    honour S3's conditional writes (an older MinIO or Ceph RGW, some gateways), so two writers
    of one file would both win."""


def get(s3: Any, path: str, limit: int | None = None) -> tuple[bytes, str]:
    """The object at ``path`` (``bucket/key``), whole or its first ``limit`` bytes and one more,
    and its ETag. FileNotFoundError when it is absent, OSError when it cannot be read or comes
    without its ETag (a conditional write of it could not name what it read)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = path.split("/", 1)
    try:
        got = s3.get_object(Bucket=bucket, Key=key)
        with contextlib.closing(got["Body"]) as body:
            if not got.get("ETag"):
                raise OSError(f"reading {path!r}: the store at {s3.meta.endpoint_url} answered without an ETag")
            return body.read() if limit is None else body.read(limit + 1), got["ETag"]
    except ClientError as exc:
        if _code(exc) in ("NoSuchKey", "404"):
            raise FileNotFoundError(f"no object {path!r}") from None
        raise OSError(f"reading {path!r}: {exc}") from None
    except BotoCoreError as exc:
        raise OSError(f"reading {path!r}: {exc}") from None


def put_if(s3: Any, path: str, data: bytes, etag: str | None) -> bool:
    """``data`` put at ``path`` provided the object there is still the one whose ETag is ``etag``
    (None: provided there is none); False, nothing written, when it is not. OSError when it
    cannot be written."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = path.split("/", 1)
    condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=data, **condition)
    except ClientError as exc:
        if _code(exc) in CONFLICTS or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
            return False
        raise OSError(f"writing {path!r}: {exc}") from None
    except BotoCoreError as exc:
        raise OSError(f"writing {path!r}: {exc}") from None
    return True


def require_conditions(s3: Any, prefix: str) -> None:
    """Nothing when the store behind ``s3`` refuses conditional PUTs whose condition does not
    hold, under ``prefix`` (``bucket/key prefix``); ConditionsIgnored, naming the store and
    what it lacks, when it writes them (answering 200, as a store ignoring the headers does);
    OSError when it cannot be probed. Probed by an object of its own under ``prefix`` (put,
    then put again with a wrong ``If-Match`` and with ``If-None-Match: *``, then deleted: one a
    killed prober left is pruned after ``PROBE_AGE_S``, ``settings.prune_runs``), once
    per process and store: a verdict that it honours them is kept (``PROBED_MAX`` stores, the
    oldest forgotten first), a refusal probed again at the next use."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, root = prefix.partition("/")
    seen = (str(s3.meta.endpoint_url), bucket, root)
    if seen in _probed:
        return
    where = f"the object store at {s3.meta.endpoint_url} (bucket {bucket[:80]!r})"
    key = "/".join(p for p in (root.strip("/"), f"{PROBE_PREFIX}{uuid.uuid4().hex}") if p)
    lacks: list[str] = []
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=b"probe")
        for header, condition in (
            ("If-Match", {"IfMatch": NO_ETAG}),
            ("If-None-Match: *", {"IfNoneMatch": "*"}),
        ):
            try:
                s3.put_object(Bucket=bucket, Key=key, Body=b"probe written", **condition)
                lacks.append(header)
            except ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status not in (409, 412):
                    raise OSError(
                        f"{where} answered a PUT whose {header} did not hold with {status} {_code(exc)}, not "
                        "S3's 412: its conditional writes, which the stage records rely on, are not known to hold"
                    ) from None
    except (BotoCoreError, ClientError) as exc:
        raise OSError(f"probing {where} for conditional writes: {exc}") from None
    finally:
        with contextlib.suppress(BotoCoreError, ClientError):
            s3.delete_object(Bucket=bucket, Key=key)
    if lacks:
        raise ConditionsIgnored(
            f"{where} wrote a PUT whose {' and one whose '.join(lacks)} did not hold: it ignores S3's "
            "conditional writes, so two writers of a stage's record would both win. Use a store that "
            "honours them (AWS S3, a current MinIO or Ceph RGW), or a run_dir on a disk every worker mounts"
        )
    with _probed_lock:
        _probed[seen] = None
        while len(_probed) > PROBED_MAX:
            del _probed[next(iter(_probed))]


def _code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
