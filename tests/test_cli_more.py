"""The CLI next to `hf`: download filters, --force, --json, examples, completion, hints, fast S3 failures."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import click
import pytest
import torch

from ckpt_callback import CheckpointManager
from ckpt_callback._cli import cli, main
from ckpt_callback._storage import S3_CONFIG_DEFAULTS, Storage


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("more") / "run"
    manager = CheckpointManager(str(root), keep_last=None)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    for step in (1, 2, 3):
        manager.save(model, step=step, train_loss=1 / step, eval_loss=2 / step, optimizer=optimizer,
                     files={"config.json": b"{}"})
    return root


@pytest.fixture
def root(template: Path, tmp_path: Path) -> str:
    copy = tmp_path / "run"
    shutil.copytree(template, copy)
    return str(copy)


# --- download --------------------------------------------------------------------------------


def test_download_include_exclude(root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "weights" / "checkpoint-3"
    code, out, err = run(capsys, "download", root, "latest", str(dest), "--include", "*.safetensors",
                         "--exclude", "optimizer*")
    assert code == 0, err
    assert sorted(p.name for p in dest.iterdir()) == ["checkpoint.json", "model.safetensors"]
    assert "1 file" in out
    # the copied sidecar lists what was copied, so DEST verifies as a checkpoint of its own
    result = CheckpointManager(str(dest.parent)).verify("checkpoint-3")[0]
    assert result.ok, result.problems
    full = CheckpointManager(root).get("latest")
    assert {f.path for f in full.files} == {"model.safetensors", "optimizer.safetensors", "training_state.json",
                                           "config.json"}

    code, _, err = run(capsys, "download", root, "latest", str(tmp_path / "none"), "--include", "*.bin")
    assert code == 2 and "no file of checkpoint 'checkpoint-3' matches" in err


def test_download_refuses_a_non_empty_dest_without_force(root: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "download", root, "latest", str(dest))
    assert code == 2 and "is not empty" in err and "--force" in err
    assert sorted(p.name for p in dest.iterdir()) == ["notes.txt"]

    code, out, err = run(capsys, "download", root, "latest", str(dest), "--force", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["name"] == "checkpoint-3" and "model.safetensors" in doc["files"]
    assert (dest / "notes.txt").read_text() == "mine" and (dest / "model.safetensors").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(capsys, "download", root, "latest", str(empty))[0] == 0  # an empty folder is fine


# --- --json, examples, completion --------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["list", "{root}", "--json"],
    ["inspect", "{root}", "best", "--json"],
    ["verify", "{root}", "--json"],
    ["download", "{root}", "best", "{tmp}/d", "--json"],
    ["delete", "{root}", "checkpoint-1", "--yes", "--json"],
    ["prune", "{root}", "--keep-last", "1", "--dry-run", "--json"],
    ["plot", "{root}", "-o", "{tmp}/p.png", "--json"],
])
def test_every_command_prints_json(root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   argv: list[str]) -> None:
    code, out, err = run(capsys, *(a.format(root=root, tmp=tmp_path) for a in argv))
    assert code == 0, err
    json.loads(out)


def test_every_command_has_json_and_examples_in_its_help() -> None:
    for name, command in cli.commands.items():
        options = {opt for param in command.params for opt in getattr(param, "opts", [])}
        assert "--json" in options, name
        with click.Context(command, info_name=name, parent=click.Context(cli, info_name="ckpt")) as ctx:
            text = command.get_help(ctx)
        assert "Examples:" in text and f"$ ckpt {name} " in text, name


def test_shell_completion_script(tmp_path: Path) -> None:
    script = shutil.which("ckpt")
    assert script is not None
    env = {**os.environ, "_CKPT_COMPLETE": "bash_source"}
    proc = subprocess.run([script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "_ckpt_completion" in proc.stdout
    env.update(_CKPT_COMPLETE="bash_complete", COMP_WORDS="ckpt li", COMP_CWORD="1")
    proc = subprocess.run([script], env=env, capture_output=True, text=True, timeout=120)
    assert "list" in proc.stdout


# --- hints -------------------------------------------------------------------------------------


def test_hint_for_a_checkpoint_folder(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "list", f"{root}/checkpoint-2")
    assert code == 0 and "no checkpoints" in out
    assert f"ckpt: hint: {root}/checkpoint-2 is a checkpoint folder itself" in err and f"ckpt list {root}" in err


def test_hint_for_roots_below(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    parent = str(Path(root).parent)
    code, out, err = run(capsys, "list", parent, "--json")
    assert code == 0 and json.loads(out)["totalCount"] == 0
    assert "holds checkpoint roots below it (run)" in err and f"ckpt list {parent}/run" in err


def test_hint_for_a_trainer_output_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for step in (5, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    code, _, err = run(capsys, "list", str(tmp_path))
    assert code == 0 and "looks like an HF Trainer output_dir (checkpoint-5, checkpoint-10)" in err
    assert "ckpt import" in err


def test_no_hint_for_an_empty_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "other").mkdir()
    code, _, err = run(capsys, "list", str(tmp_path))
    assert code == 0 and err == ""


# --- S3: a wrong endpoint fails fast -----------------------------------------------------------


def test_storage_defaults_bound_s3_connects_and_retries() -> None:
    pytest.importorskip("s3fs")
    fs = Storage("s3://bucket/run", {"endpoint_url": "http://127.0.0.1:9"}).fs
    assert fs.config_kwargs["connect_timeout"] == 5 and fs.config_kwargs["retries"]["total_max_attempts"] == 3
    assert fs.config_kwargs["max_pool_connections"] == 64  # the catalog's concurrent sidecar reads
    assert S3_CONFIG_DEFAULTS["retries"] == {"total_max_attempts": 3, "mode": "standard"}  # never rewritten
    mine = Storage("s3://bucket/run", {"config_kwargs": {"connect_timeout": 30}}).fs
    assert mine.config_kwargs["connect_timeout"] == 30  # what the caller gives wins


def test_a_wrong_s3_endpoint_fails_after_few_attempts(capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted in connections, not seconds: each one is a request the user waits for."""
    pytest.importorskip("s3fs")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    count = [0]

    def accept() -> Any:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            count[0] += 1
            conn.close()  # not an S3 server: hang up at once

    threading.Thread(target=accept, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        code, _, err = run(capsys, "list", "s3://bucket/run", "--storage-option", f"endpoint_url={endpoint}")
    finally:
        server.close()
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("ckpt: error: checking failed at s3://bucket/run")
    assert endpoint in err and "does not exist" not in err  # it names the endpoint, not a missing bucket
    # 100 connections (76 s) before: 5 botocore attempts x 4 of ours (x s3fs's own retries of a hang-up);
    # now 24: 3 botocore attempts, none of ours for the first request (120 with ours), s3fs's remain.
    assert count[0] <= 30, err


def test_list_inspect_delete_and_version_start_without_torch(tmp_path: Path) -> None:
    """`ckpt --version`, `list`, `inspect` and `delete` never import torch (it alone takes seconds to import)."""
    import sys

    root = tmp_path / "r"
    manager = CheckpointManager(str(root))
    for step in (1, 2):
        manager.save({"w": torch.ones(2)}, step=step, train_loss=1.0)
    code = ("import sys\nfrom ckpt_callback._cli import main\ncode = main(sys.argv[1:])\n"
            "print('exit', code, 'torch imported', 'torch' in sys.modules)")
    for args in (["--version"], ["list", str(root)], ["list", str(root), "--json"], ["inspect", str(root), "latest"],
                 ["inspect", str(root), "checkpoint-1", "--json"], ["delete", str(root), "checkpoint-1", "--yes"]):
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
        assert out.stdout.splitlines()[-1] == "exit 0 torch imported False", (args, out.stderr[-2000:])
    assert [i.name for i in manager.list()] == ["checkpoint-2"]


@pytest.mark.s3
def test_list_and_inspect_of_an_s3_root_start_without_torch(s3_server: Any) -> None:
    """`ckpt list` and `inspect` of an s3:// root never import torch either (s3fs and its client do not need it)."""
    import sys
    import uuid

    root = f"s3://ckpt-test/run-{uuid.uuid4().hex}"  # the s3_server fixture's bucket, reached through AWS_* variables
    manager = CheckpointManager(root)
    for step in (1, 2, 3):
        manager.save({"w": torch.ones(2)}, step=step, train_loss=1.0)
    code = ("import sys\nfrom ckpt_callback._cli import main\ncode = main(sys.argv[1:])\n"
            "print('exit', code, 'torch imported', 'torch' in sys.modules)")
    for args in (["list", root], ["list", root, "--json", "--limit", "2"], ["inspect", root, "latest"]):
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
        assert out.stdout.splitlines()[-1] == "exit 0 torch imported False", (args, out.stderr[-2000:])
        assert "checkpoint-3" in out.stdout, (args, out.stdout[-2000:])
