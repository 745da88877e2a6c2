from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckpt_callback import CheckpointInfo, InvalidNameError, SidecarError
from ckpt_callback._sidecar import SIDECAR_NAME, FileEntry, clean_metrics, validate_name

SPEC_KEYS = [
    "schemaVersion", "id", "name", "type", "description", "step", "epoch", "trainLoss", "evalLoss", "metrics",
    "model", "version", "inferenceReady", "node", "createdAt", "updatedAt", "files", "size",
]


def test_to_json_has_exactly_the_spec_keys_in_order():
    info = CheckpointInfo(name="checkpoint-1", step=1, files=(FileEntry("model.safetensors", 10, "ab" * 32),), size=10)
    data = info.to_json()
    assert list(data) == SPEC_KEYS
    assert data["schemaVersion"] == 1
    assert data["files"] == [{"path": "model.safetensors", "size": 10, "sha256": "ab" * 32}]
    assert data["createdAt"].endswith("Z") and "T" in data["createdAt"]


def test_unknown_losses_are_null_not_zero():
    data = json.loads(CheckpointInfo(name="c", step=3).dumps())
    assert data["trainLoss"] is None and data["evalLoss"] is None and data["epoch"] is None


def test_camel_case_aliases_and_item_access():
    info = CheckpointInfo(name="c", step=3, eval_loss=0.25, inference_ready=True)
    assert info.evalLoss == 0.25 and info["evalLoss"] == 0.25 and info.inferenceReady is True
    with pytest.raises(AttributeError):
        info.nonsense  # noqa: B018


@given(
    step=st.integers(0, 10**9),
    loss=st.none() | st.floats(allow_nan=False, allow_infinity=False),
    metrics=st.dictionaries(st.text(min_size=1, max_size=10), st.floats(allow_nan=False, allow_infinity=False)),
    kind=st.sampled_from(["automatic", "best", "manual", "final"]),
    description=st.none() | st.text(max_size=50),
)
def test_round_trip(step, loss, metrics, kind, description):
    info = CheckpointInfo(name="c", step=step, train_loss=loss, eval_loss=loss, metrics=metrics, type=kind,
                          description=description)
    assert CheckpointInfo.loads(info.dumps()) == info


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(schemaVersion=2), "unknown schemaVersion 2"),
        (lambda d: d.pop("schemaVersion"), "unknown schemaVersion None"),
        (lambda d: d.pop("step"), "missing keys step"),
        (lambda d: d.update(step="ten"), "'step' must be a non-negative integer"),
        (lambda d: d.update(step=-1), "'step' must be a non-negative integer"),
        (lambda d: d.update(type="weird"), "'type' must be one of"),
        (lambda d: d.update(evalLoss="low"), "'evalLoss' must be a number or null"),
        (lambda d: d.update(metrics={"acc": "high"}), "'metrics' must be an object of numbers"),
        (lambda d: d.update(files=[{"path": "x"}]), "malformed 'files'"),
    ],
)
def test_malformed_sidecars_are_rejected_with_the_reason(mutate, message):
    data = CheckpointInfo(name="c", step=1).to_json()
    mutate(data)
    with pytest.raises(SidecarError, match=message) as err:
        CheckpointInfo.from_json(data, where="root/c/checkpoint.json")
    assert "root/c/checkpoint.json" in str(err.value)


@pytest.mark.parametrize("text", ["", "{", "[]", "null", '"x"'])
def test_not_an_object(text):
    with pytest.raises(SidecarError):
        CheckpointInfo.loads(text, where=SIDECAR_NAME)


@pytest.mark.parametrize("name", ["", " ", "a/b", "a\\b", "..", "../x", "x..y", "latest", "best", "final",
                                  ".hidden", "-flag", "a b", None, 5])
def test_bad_names(name):
    with pytest.raises(InvalidNameError):
        validate_name(name)


@pytest.mark.parametrize("name", ["checkpoint-500", "before-lr-drop", "run_1.v2", "Best", "final-2", "x@1"])
def test_good_names(name):
    assert validate_name(name) == name


def test_clean_metrics_keeps_numbers_by_their_own_names():
    assert clean_metrics({"eval_loss": 0.5, "acc": 1, "nan": float("nan"), "s": "x", "flag": True}) == {
        "eval_loss": 0.5, "acc": 1}
