"""`ckpt export` (an inference-only HF folder) and `ckpt serve` (OpenAI-compatible, through transformers serve)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from _sources import make_sources
from ckpt_callback import CheckpointManager, export_checkpoint, import_checkpoints
from ckpt_callback._cli import main


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A root holding a Trainer checkpoint (with optimizer) and a nanoGPT one (not an HF folder)."""
    folder = tmp_path_factory.mktemp("export")
    sources = make_sources(folder / "sources")
    root = str(folder / "run")
    import_checkpoints(root, [sources["trainer"] / "checkpoint-6"])
    import_checkpoints(root, [sources["nanogpt"]], name="nanogpt")
    return root


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_export_loads_with_from_pretrained(root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = tmp_path / "gpt2-bf16"
    code, out, err = run(capsys, "export", root, "checkpoint-6", str(dest), "--dtype", "bfloat16", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert sorted(doc["files"]) == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                                    "tokenizer_config.json"]  # no optimizer, training state or sidecar
    model = AutoModelForCausalLM.from_pretrained(dest)
    tokenizer = AutoTokenizer.from_pretrained(dest)
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied again
    stored = CheckpointManager(root).load("checkpoint-6")
    live = model.state_dict()
    assert all(torch.equal(stored[k].to(torch.bfloat16), live[k]) for k in stored)
    assert tokenizer("hello world")["input_ids"]


def test_export_shards_and_refuses(root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM

    dest = tmp_path / "sharded"
    assert run(capsys, "export", root, "checkpoint-6", str(dest), "--max-shard-size", "100KB")[0] == 0
    assert (dest / "model.safetensors.index.json").exists() and not (dest / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(dest)
    stored = CheckpointManager(root).load("checkpoint-6")
    assert all(torch.equal(stored[k], model.state_dict()[k]) for k in stored)

    code, _, err = run(capsys, "export", root, "checkpoint-6", str(dest))
    assert code == 2 and "is not empty" in err
    code, _, err = run(capsys, "export", root, "nanogpt", str(tmp_path / "x"))
    assert code == 2 and "no config.json" in err
    assert export_checkpoint(root, "checkpoint-6", dest, force=True) == dest


def test_serve_refuses_what_it_cannot_serve(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "serve", root, "nanogpt", "--port", "1")
    assert code == 2 and "cannot be served" in err and "inference-ready" in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None
                    or importlib.util.find_spec("transformers.cli.transformers") is None,
                    reason="needs the [serve] extra (transformers serve, fastapi, uvicorn)")
def test_serve_answers_the_openai_client(root: str, tmp_path: Path) -> None:
    openai = pytest.importorskip("openai")
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    argv = ["serve", root, "checkpoint-6", "--port", str(port), "--json"]
    proc = subprocess.Popen([sys.executable, "-m", "ckpt_callback._cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                out, err = proc.communicate()
                raise AssertionError(f"ckpt serve did not come up (exit {proc.returncode}):\n{out}\n{err[-4000:]}")
            time.sleep(0.5)
        client = openai.OpenAI(api_key="unused", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
        assert [m.id for m in client.models.list()] == ["checkpoint-6"]
        completion = client.completions.create(model="checkpoint-6", prompt="hello world", max_tokens=5)
        assert completion.usage is not None and completion.usage.completion_tokens == 5
        assert isinstance(completion.choices[0].text, str) and completion.choices[0].text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert out.strip(), err[-3000:]
    started = json.loads(out)
    assert started["model"] == "checkpoint-6" and started["backend"] == "transformers"
    assert started["baseUrl"] == f"http://127.0.0.1:{port}/v1"
    assert proc.returncode == 0, err[-3000:]
    assert not Path(started["folder"]).exists()  # the exported folder goes with the server
