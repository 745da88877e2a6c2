"""S3 under faults, against a real SeaweedFS server that the tests kill and restart."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import time
import uuid
from collections.abc import Iterator

import fsspec
import pytest
import torch
from torch import nn

from _s3server import SeaweedS3, find_weed
from ckpt_callback import CheckpointError, CheckpointHook, CheckpointManager
from conftest import kill_mid_upload

pytestmark = [pytest.mark.s3, pytest.mark.slow,
              pytest.mark.skipif(find_weed() is None, reason="SeaweedFS 'weed' binary not found")]

BUCKET = "faults"


@pytest.fixture
def server() -> Iterator[SeaweedS3]:
    with SeaweedS3() as s3:
        s3.make_bucket(BUCKET)
        yield s3


def options(server: SeaweedS3, **extra) -> dict:
    # Fail fast when the server is gone: botocore would otherwise retry connects for a long time.
    opts = dict(server.storage_options)
    opts["config_kwargs"] = {**opts.get("config_kwargs", {}), "connect_timeout": 1, "read_timeout": 5,
                             "retries": {"max_attempts": 1}}
    return {**opts, **extra}


def big_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)])  # ~34 MB of float32


def test_server_killed_mid_upload(server, caplog):
    caplog.set_level(logging.INFO, logger="ckpt_callback")
    url = f"s3://{BUCKET}/run-{uuid.uuid4().hex[:8]}"
    model = big_model()
    hook = CheckpointHook(url, model, every_n_steps=1, keep_last=3, storage_options=options(server))
    hook.manager._storage.backoff = 0.1
    assert hook.step(1, loss=1.0) is not None

    kill_mid_upload(hook.manager._storage, server.kill, "checkpoint-2")
    started = time.monotonic()
    assert hook.step(2, loss=0.9) is None  # the save failed ...
    assert not server.is_running()  # it died during the save
    failed_after = time.monotonic() - started
    # ... was logged with the checkpoint's name and the reason, and training went on
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("step 2" in m and "checkpoint-2" in m for m in errors), errors
    assert failed_after < 60

    server.restart()
    manager = CheckpointManager(url, storage_options=options(server))
    assert [i.name for i in manager.list()] == ["checkpoint-1"]  # nothing partial is listed
    assert manager.verify()[0].ok

    assert hook.step(3, loss=0.8) is not None  # the next save lands
    assert sorted(i.name for i in manager.list()) == ["checkpoint-1", "checkpoint-3"]
    assert torch.equal(manager.load("checkpoint-3")["0.weight"], model[0].weight)
    fs, path = fsspec.core.url_to_fs(url, **server.storage_options)
    fs.invalidate_cache()
    assert not fs.exists(f"{path}/checkpoint-2/checkpoint.json")

    server.kill()
    with pytest.raises(CheckpointError):
        hook.end()  # a failed final checkpoint raises
    server.restart()
    assert "final" not in {i.type for i in manager.list()}


def test_transient_outage_is_retried_with_backoff(server, caplog):
    url = f"s3://{BUCKET}/run-{uuid.uuid4().hex[:8]}"
    manager = CheckpointManager(url, storage_options=options(server))
    manager._storage.backoff = 1.0  # retries at +1 s, +2 s, +4 s
    manager.save({"w": torch.ones(1000)}, step=1)
    server.kill()
    # The save runs in a worker; the server must be restarted from this thread, which owns it.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        saving = pool.submit(manager.save, {"w": torch.full((1000,), 2.0)}, step=2)
        time.sleep(0.5)
        server.restart()  # back within the retry window
        info = saving.result(timeout=60)
    assert info.name == "checkpoint-2" and "retrying in" in caplog.text
    assert torch.equal(manager.load("latest")["w"], torch.full((1000,), 2.0))


def test_credentials_never_appear_in_errors_logs_or_sidecars(server, caplog):
    caplog.set_level(logging.DEBUG, logger="ckpt_callback")
    url = f"s3://{BUCKET}/run-{uuid.uuid4().hex[:8]}"
    good = CheckpointManager(url, storage_options=options(server))
    good.save({"w": torch.ones(10)}, step=1)
    fs, path = fsspec.core.url_to_fs(url, **server.storage_options)
    sidecar = fs.cat_file(f"{path}/checkpoint-1/checkpoint.json").decode()
    assert server.secret_key not in sidecar and server.access_key not in sidecar
    assert set(json.loads(sidecar)) >= {"node", "files"}

    wrong_secret = "WRONG-secret-" + uuid.uuid4().hex
    bad = CheckpointManager(url, storage_options=options(server, secret=wrong_secret))
    with pytest.raises(CheckpointError) as err:
        bad.save({"w": torch.ones(10)}, step=2)
    assert wrong_secret not in str(err.value) and wrong_secret not in caplog.text
