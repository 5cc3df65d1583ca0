"""An S3 API on loopback (moto's server mode), for the prediction log on object storage."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from devstack.processes import S3_BUCKET as BUCKET
from devstack.processes import S3_CREDENTIALS as CREDENTIALS
from devstack.processes import S3Process, start_s3

__all__ = ["BUCKET", "CREDENTIALS", "S3Server"]


class S3Server(S3Process):
    def uri(self, prefix: str | None = None) -> str:
        """A fresh prefix in the bucket unless one is given."""
        return super().uri(prefix or uuid.uuid4().hex[:12])


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """``python -m moto.server`` on a free 127.0.0.1 port with one bucket; stopped by its pid."""
    started = start_s3(tmp_path_factory.mktemp("moto"))
    server = S3Server(started.proc, started.port, started.log)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The S3 server, with its credentials in the environment (the model servers inherit them)."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    return s3_server
