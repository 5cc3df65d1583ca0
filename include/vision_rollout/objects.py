"""An object in S3 read whole, with its ETag, in one GET, and written only if it is still the one
read (``If-Match: <ETag>``, or ``If-None-Match: *`` for one read absent): what pyarrow's
filesystems do not do (a read there is a HEAD for the size and then GETs, which a PUT landing in
between cuts; its PUTs have no condition).

The client is boto3's, set up from the folder URI's options as pyarrow's S3 filesystem takes
them (``endpoint_override``, ``scheme``, ``tls_ca_file_path``, ``tls_verify_certificates``; the
region pyarrow resolved), with path-style addressing under an endpoint override as pyarrow's,
and the credentials from the same default chain (``AWS_*`` in the environment, the profile, the
pod's web identity, the instance's role): none is in the URI (``folder_problem``) or logged.
"""

from __future__ import annotations

import functools
import os
from typing import Any
from urllib.parse import parse_qsl, urlsplit

# A PUT's condition that did not hold: 412 (another writer's PUT landed since the read), 404
# (the object read was deleted since), 409 (S3's ConditionalRequestConflict: a write of it
# racing this one).
CONFLICTS = ("PreconditionFailed", "NoSuchKey", "ConditionalRequestConflict")


@functools.cache
def _client(pid: int, endpoint: str | None, region: str, verify: bool | str) -> Any:
    """One client per process (a forked worker does not share its parent's connections)."""
    import boto3
    from botocore.config import Config

    config = Config(s3={"addressing_style": "path"} if endpoint else {})
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=region or None, verify=verify, config=config
    )


def client(uri: str, region: str) -> Any:
    """The S3 client for the folder ``uri`` (its options as pyarrow's), in ``region``."""
    options = dict(parse_qsl(urlsplit(uri).query))
    endpoint = options.get("endpoint_override") or None
    if endpoint and "://" not in endpoint:
        endpoint = f"{options.get('scheme', 'https')}://{endpoint}"
    verify: bool | str = options.get("tls_ca_file_path") or options.get(
        "tls_verify_certificates", "true"
    ).lower() not in ("false", "0", "no")
    return _client(os.getpid(), endpoint, region, verify)


def get(s3: Any, path: str) -> tuple[bytes, str]:
    """The object at ``path`` (``bucket/key``), whole, and its ETag. FileNotFoundError when it
    is absent, OSError when it cannot be read."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = path.split("/", 1)
    try:
        got = s3.get_object(Bucket=bucket, Key=key)
        return got["Body"].read(), got["ETag"]
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


def _code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
