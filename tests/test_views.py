"""The hosted APIs' shapes: OpenAI (validated by the official SDK), TensorOne and FlexAI."""

from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from ckpt_callback import CheckpointInfo, CheckpointManager
from ckpt_callback._cli import main
from ckpt_callback._sidecar import Source
from ckpt_callback._views import compact_size, tensorone_metric, unix_time

openai = pytest.importorskip("openai")
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint  # noqa: E402

FLEXAI_FIELDS = [  # every field of FlexAI's `checkpoint inspect` table, where FlexAI puts it
    "kind", "metadata.name", "metadata.id", "metadata.creatorUserID", "metadata.ownerOrgID",
    "spec.fromLocalFiles", "spec.storageProvider", "spec.sourcePath", "status.status",
    "status.storageProviderID", "status.size", "status.files", "status.metadata.name", "status.metadata.node",
    "status.metadata.step", "status.metadata.trainLoss", "status.metadata.evalLoss", "status.metadata.model",
    "status.metadata.version", "status.metadata.inferenceReady", "status.createdAt", "status.updatedAt",
]
TENSORONE_ITEM = ["checkpointId", "name", "epoch", "step", "metrics", "size", "type", "downloadUrl", "deployable",
                  "createdAt"]


def _build(root: str, **options: Any) -> CheckpointManager:
    manager = CheckpointManager(root, keep_last=None, **options)
    for step in (10, 20, 30, 40, 50):
        manager.save({"w": torch.full((4,), float(step))}, step=step, epoch=step / 10, train_loss=1 / step,
                     eval_loss=2 / step if step != 50 else None,
                     metrics={"eval_accuracy": step / 100, "eval_mean_token_accuracy": step / 200})
    manager.save({"w": torch.zeros(4)}, step=50, type="manual", name="pick", description="by hand")
    return manager


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("views") / "run")
    _build(root)
    return root


def _cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def _dig(doc: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        assert part in doc, dotted
        doc = doc[part]
    return doc


# --- OpenAI ------------------------------------------------------------------------------------


def test_openai_items_validate_with_the_sdk_types(demo: str, capsys: pytest.CaptureFixture[str]) -> None:
    page = _cli_json(capsys, "list", demo, "--format", "openai")
    assert set(page) == {"object", "data", "first_id", "last_id", "has_more"} and page["object"] == "list"
    items = [FineTuningJobCheckpoint.model_validate(item, strict=True) for item in page["data"]]

    assert len(items) == 6
    run_ids = {i.fine_tuning_job_id for i in items}
    assert len(run_ids) == 1 and next(iter(run_ids))  # one run, its recorded id
    by_name = {i.fine_tuned_model_checkpoint.rsplit("/", 1)[-1]: i for i in items}
    best = by_name["checkpoint-50"]
    assert best.step_number == 50 and best.metrics.step == 50.0
    assert best.metrics.train_loss == pytest.approx(1 / 50) and best.metrics.valid_loss is None
    c40 = by_name["checkpoint-40"]
    assert c40.metrics.valid_loss == pytest.approx(2 / 40)
    assert c40.metrics.valid_mean_token_accuracy == pytest.approx(0.2)
    assert c40.fine_tuned_model_checkpoint == f"{demo}/checkpoint-40"  # where from_pretrained / serve find it
    assert min((i for i in items if i.metrics.valid_loss is not None), key=lambda i: i.metrics.valid_loss) is c40
    info = CheckpointManager(demo).get("checkpoint-40")
    assert c40.id == info.id and c40.created_at == unix_time(info.created_at)


def test_openai_sdk_pages_through_a_local_server(demo: str) -> None:
    """The SDK's own client and paginator, against a tiny HTTP server serving `page.to_openai()`."""
    manager = CheckpointManager(demo)
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query))
            seen.append(self.path)
            body = json.dumps(manager.list(limit=int(query.get("limit", 20)), after=query.get("after"))
                              .to_openai()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = openai.OpenAI(api_key="unused", base_url=f"http://127.0.0.1:{server.server_port}/v1",
                               max_retries=0)
        run_id = manager.latest().run_id
        checkpoints = list(client.fine_tuning.jobs.checkpoints.list(run_id, limit=4))
    finally:
        server.shutdown()
        server.server_close()
    assert [c.id for c in checkpoints] == [i.id for i in manager.list().data]  # every one, once, newest first
    assert all(isinstance(c, FineTuningJobCheckpoint) for c in checkpoints)
    assert len(seen) == 2 and seen[0].startswith(f"/v1/fine_tuning/jobs/{run_id}/checkpoints")
    assert "after=" in seen[1]


def test_openai_job_id_is_stable_without_a_recorded_run_id() -> None:
    from ckpt_callback._views import openai_checkpoint

    info = CheckpointInfo(name="c", step=1)

    first = openai_checkpoint(info, root="s3://b/run")["fine_tuning_job_id"]
    assert first == openai_checkpoint(CheckpointInfo(name="d", step=2), root="s3://b/run")["fine_tuning_job_id"]
    assert first != openai_checkpoint(info, root="s3://b/other")["fine_tuning_job_id"]


# --- TensorOne ---------------------------------------------------------------------------------


def test_tensorone_list_shape(demo: str, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _cli_json(capsys, "list", demo, "--format", "tensorone", "--limit", "2")
    assert set(doc) == {"checkpoints", "totalCount", "summary"} and doc["totalCount"] == 6
    assert len(doc["checkpoints"]) == 2
    for item in doc["checkpoints"]:
        assert all(key in item for key in TENSORONE_ITEM)
        assert set(item["metrics"]) == {"loss", "accuracy", "validationLoss", "validationAccuracy"}
        assert item["downloadUrl"] is None and item["deployable"] is False  # a local root cannot sign
        assert item["size"] == compact_size(item["sizeBytes"])
    summary = doc["summary"]
    best = CheckpointManager(demo).get("best")
    assert summary["bestCheckpoint"]["checkpointId"] == best.id
    assert summary["bestCheckpoint"]["metrics"]["validationLoss"] == pytest.approx(best.eval_loss)
    assert set(summary["latestCheckpoint"]) == {"checkpointId", "createdAt"}
    assert isinstance(summary["totalSize"], str)

    bare = _cli_json(capsys, "list", demo, "--format", "tensorone", "--no-include-metrics")
    assert all("metrics" not in item for item in bare["checkpoints"])


@pytest.mark.parametrize(("key", "expected"), [
    ("loss", ["checkpoint-50", "checkpoint-40", "checkpoint-30"]),  # trainLoss 1/step
    ("validationLoss", ["checkpoint-40", "checkpoint-30", "checkpoint-20"]),
    ("validationAccuracy", ["checkpoint-10", "checkpoint-20", "checkpoint-30"]),
])
def test_tensorone_sort_keys_are_aliases(demo: str, capsys: pytest.CaptureFixture[str], key: str,
                                         expected: list[str]) -> None:
    doc = _cli_json(capsys, "list", demo, "--format", "tensorone", "--sort-by", key, "--order", "asc",
                    "--limit", "3")
    assert [i["name"] for i in doc["checkpoints"]] == expected


def test_tensorone_metric_mapping_prefers_the_exact_name() -> None:
    info = CheckpointInfo(name="c", step=1, eval_loss=0.7, metrics={"validationLoss": 0.5, "accuracy": 0.8,
                                                                      "eval_accuracy": 0.6})
    assert tensorone_metric(info, "validationLoss") == 0.5
    assert tensorone_metric(info, "accuracy") == 0.8
    assert tensorone_metric(info, "validationAccuracy") == 0.6
    assert tensorone_metric(CheckpointInfo(name="c", step=1), "loss") is None  # unknown stays null


@pytest.mark.s3
def test_tensorone_download_url_is_signed_on_s3(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    import urllib.request
    import uuid

    from safetensors.torch import load

    request.getfixturevalue("s3_server")
    manager = CheckpointManager(f"s3://ckpt-test/views-{uuid.uuid4().hex}")
    manager.save({"w": torch.arange(4.0)}, step=1)
    doc = manager.list().to_tensorone()
    url = doc["checkpoints"][0]["downloadUrl"]
    assert url.startswith("http://127.0.0.1") and "Expires=" in url
    with urllib.request.urlopen(url, timeout=30) as response:
        assert load(response.read())["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


# --- FlexAI ------------------------------------------------------------------------------------


def test_inspect_has_every_flexai_field_where_flexai_puts_it(demo: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["inspect", demo, "checkpoint-40"])
    out, err = capsys.readouterr()
    assert code == 0, err
    doc = yaml.safe_load(out)
    for dotted in FLEXAI_FIELDS:
        _dig(doc, dotted)
    assert doc["kind"] == "Checkpoint" and doc["status"]["status"] == "available"
    assert "createdAt" not in doc["status"]["metadata"]  # at status level, as FlexAI has it
    assert doc["status"]["size"] == f"{doc['status']['sizeBytes']} B"
    assert doc["status"]["files"][0]["path"] == "model.safetensors" and "sha256" in doc["status"]["files"][0]
    assert doc["spec"]["fromLocalFiles"] == [] and doc["spec"]["sourcePath"] == ""
    assert doc["status"]["storageProviderID"] == "00000000-0000-0000-0000-000000000000"
    assert doc["spec"]["type"] == "best" and doc["spec"]["metrics"]["eval_accuracy"] == 0.4  # ours, kept


def test_source_round_trips_through_the_sidecar() -> None:
    info = CheckpointInfo(name="c", step=1, source=Source(("/data/ckpt.pt",), "", ""))
    again = CheckpointInfo.loads(info.dumps())
    assert again.source == info.source and again.created_by == info.created_by
    assert json.loads(info.dumps())["source"] == {"fromLocalFiles": ["/data/ckpt.pt"], "storageProvider": "",
                                                  "sourcePath": ""}
    bad = json.loads(info.dumps())
    bad["source"] = {"fromLocalFiles": "/not/a/list"}
    from ckpt_callback import SidecarError

    with pytest.raises(SidecarError, match="source"):
        CheckpointInfo.from_json(bad)


def test_page_views_from_python(demo: str) -> None:
    page = CheckpointManager(demo).list(limit=2)
    assert page.to_openai()["has_more"] is True
    assert len(page.to_tensorone()["checkpoints"]) == 2
