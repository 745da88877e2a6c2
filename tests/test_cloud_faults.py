"""GCS and Azure Blob under faults: the emulator dies mid-upload (as test_s3_faults does for S3).

Each test starts its own emulator (the session ones stay up for the other tests) and leaves the
library's driver settings alone: how fast a dead server fails is what `_storage` sets by default.
"""

from __future__ import annotations

import gc
import logging
import os
import time
import uuid
from collections.abc import Iterator

import fsspec
import pytest
import torch
from torch import nn

from _azurite import Azurite, find_azurite
from _emulator import LoopbackServer
from _gcsserver import GcsEmulator, find_gcs_emulator
from ckpt_callback import CheckpointError, CheckpointHook, CheckpointManager, StorageError
from ckpt_callback._storage import AZURE_RETRY, GCS_REQUEST_ATTEMPTS, Storage
from conftest import CLOUD_BACKENDS, kill_mid_upload, make_root

BUCKET = "faults"
BACKENDS = [pytest.param("gcs", marks=pytest.mark.gcs), pytest.param("azure", marks=pytest.mark.azure)]


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[tuple[LoopbackServer, str, dict]]:
    """A fresh emulator of ``request.param``, its root URL and the storage_options that reach it."""
    kind = request.param
    if kind == "gcs":
        pytest.importorskip("gcsfs", reason="gcsfs not installed (the [gcs] extra)")
        if find_gcs_emulator() is None:
            pytest.skip("GCS emulator not found: pip install gcp-storage-emulator (the [test] extra)")
        with GcsEmulator(buckets=[BUCKET]) as gcs:
            yield gcs, f"gs://{BUCKET}/run-{uuid.uuid4().hex[:8]}", {"endpoint_url": gcs.endpoint_url}
    else:
        pytest.importorskip("adlfs", reason="adlfs not installed (the [azure] extra)")
        if find_azurite() is None:
            pytest.skip("Azurite not found: npm install azurite (README, Development; or set AZURITE_PREFIX)")
        with Azurite(containers=[BUCKET]) as az:
            yield az, f"az://{BUCKET}/run-{uuid.uuid4().hex[:8]}", {"connection_string": az.connection_string}


def big_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)])  # ~34 MB of float32: seconds to upload


@pytest.mark.slow
@pytest.mark.parametrize("server", BACKENDS, indirect=True)
def test_server_killed_mid_upload(server, caplog):
    emulator, url, options = server
    caplog.set_level(logging.INFO, logger="ckpt_callback")
    model = big_model()
    hook = CheckpointHook(url, model, every_n_steps=1, keep_last=3, storage_options=options)
    hook.manager._storage.backoff = 0.1
    hook.manager._storage.retries = 1  # the suite's time: each failing call is tried twice, not 4 times
    assert hook.step(1, loss=1.0) is not None
    if emulator.name == "azurite":
        # Azurite keeps its blob index in memory and writes it to disk every 5 s (LokiJS autosave): a
        # SIGKILL sooner loses what it acknowledged. Real Azure does not; give it the 5 s.
        time.sleep(6)

    kill_mid_upload(hook.manager._storage, emulator.kill, "checkpoint-2")
    started = time.monotonic()
    assert hook.step(2, loss=0.9) is None  # the save failed ...
    assert not emulator.alive()  # it died during the save
    failed_after = time.monotonic() - started
    # ... was logged with the checkpoint's name and the reason, and training went on
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("step 2" in m and "checkpoint-2" in m for m in errors), errors
    assert failed_after < 60, f"a dead server took {failed_after:.0f} s to fail"

    emulator.restart()
    manager = CheckpointManager(url, storage_options=options)
    assert [i.name for i in manager.list()] == ["checkpoint-1"]  # nothing partial is listed
    assert manager.verify()[0].ok

    assert hook.step(3, loss=0.8) is not None  # the next save lands
    assert sorted(i.name for i in manager.list()) == ["checkpoint-1", "checkpoint-3"]
    assert torch.equal(manager.load("checkpoint-3")["0.weight"], model[0].weight)
    fs, path = fsspec.core.url_to_fs(url, **options, skip_instance_cache=True)
    fs.invalidate_cache()
    assert not fs.exists(f"{path}/checkpoint-2/checkpoint.json")

    emulator.kill()
    with pytest.raises(CheckpointError):
        hook.end()  # a failed final checkpoint raises
    emulator.restart()
    assert "final" not in {i.type for i in manager.list()}


@pytest.mark.gcs
def test_gcs_emulator_roots_skip_the_bucket_type_probe_and_retry_less() -> None:
    pytest.importorskip("gcsfs")
    import gcsfs.core

    fs = Storage("gs://bucket/run", {"endpoint_url": "http://127.0.0.1:9"}).fs
    assert type(fs).__mro__[1] is gcsfs.core.GCSFileSystem  # the plain driver: no gRPC probe of the bucket
    assert fs.credentials.token == "anon"  # an emulator root never asks a metadata server for a token
    assert fs.session_kwargs["timeout"].sock_connect == 5
    storage = Storage("gs://bucket/run", {"endpoint_url": "http://127.0.0.1:9"}, retries=0)
    started = time.monotonic()
    with pytest.raises(CheckpointError, match="reading failed at gs://bucket/run/x"):
        storage.read_bytes("x")
    # gcsfs's own 6 attempts slept 1+2+4+8+16 s (~35 s per call); GCS_REQUEST_ATTEMPTS keeps 3 (~4 s).
    assert GCS_REQUEST_ATTEMPTS == 3 and time.monotonic() - started < 15


@pytest.mark.azure
def test_azure_retries_are_bounded() -> None:
    pytest.importorskip("adlfs")
    from _azurite import ACCOUNT_KEY, ACCOUNT_NAME

    conn = (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT_NAME};AccountKey={ACCOUNT_KEY};"
            "BlobEndpoint=http://127.0.0.1:9/devstoreaccount1;")
    fs = Storage("az://container/run", {"connection_string": conn, "skip_instance_cache": True}).fs
    policy = fs.service_client._config.retry_policy
    assert {k: getattr(policy, k) for k in AZURE_RETRY} == AZURE_RETRY
    assert fs._timeout_kwargs == {"connection_timeout": 5, "read_timeout": 120}


@pytest.mark.parametrize("backend", CLOUD_BACKENDS)
def test_a_failed_upload_never_lands_later(backend: str, tmp_path, request: pytest.FixtureRequest) -> None:
    """An fsspec file collected unclosed commits itself (gcsfs, adlfs): an abandoned upload must not."""
    storage = Storage(make_root(backend, tmp_path, request))

    def produce(f) -> None:
        f.write(b"x" * (20 << 20))  # several parts already sent
        raise RuntimeError("the serializer failed half-way")

    with pytest.raises(StorageError, match="the serializer failed half-way"):
        storage.write_stream("a/model.safetensors", produce)
    gc.collect()
    time.sleep(1.0)  # gcsfs closes collected files on a background thread
    assert storage.list_files("a") == {}


@pytest.mark.gcs
@pytest.mark.parametrize("imported_first", [False, True], ids=["fresh", "gcsfs-imported-first"])
def test_gcs_emulator_root_never_uses_the_probing_driver(imported_first: bool) -> None:
    """In a process without the test suite's GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false, as a user runs it."""
    pytest.importorskip("gcsfs")
    import subprocess
    import sys

    code = "\n".join([
        "import os, sys",
        "import gcsfs" if imported_first else "",
        "from ckpt_callback._storage import Storage",
        "fs = Storage('gs://bucket/run', {'endpoint_url': 'http://127.0.0.1:9'}).fs",
        "import gcsfs.core",
        "print(type(fs).__mro__[1] is gcsfs.core.GCSFileSystem, os.environ.get('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT'))",
    ])
    unset = ("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "STORAGE_EMULATOR_HOST")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    # imported first: gcsfs already chose its probing class, the library still uses the plain one
    assert out.stdout.split() == ["True", "None" if imported_first else "false"]


@pytest.mark.gcs
def test_gcs_signs_with_a_service_account_key(gcs_server, tmp_path, request: pytest.FixtureRequest) -> None:
    """A generated key (never sent anywhere: signing is local) signs a V2 URL; the emulator serves it."""
    pytest.importorskip("cryptography")
    import hashlib
    import urllib.request

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    root = make_root("gcs", tmp_path, request)
    info = CheckpointManager(root).save({"w": torch.arange(100.0)}, step=1)
    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    key = {"type": "service_account", "project_id": "test", "private_key_id": "1", "private_key": pem,
           "client_email": "ckpt@test.iam.gserviceaccount.com", "client_id": "1",
           "token_uri": "http://127.0.0.1:9/token"}  # never asked: signing needs no token
    signer = Storage(root, {"endpoint_url": gcs_server.endpoint_url, "token": key, "skip_instance_cache": True})
    url = signer.sign("checkpoint-1/model.safetensors", 300)
    assert url.startswith(gcs_server.endpoint_url) and "Signature=" in url
    assert pem.splitlines()[1] not in url
    with urllib.request.urlopen(url, timeout=30) as response:
        assert hashlib.sha256(response.read()).hexdigest() == info.files[0].sha256
