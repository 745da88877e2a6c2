from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt_callback import CheckpointInfo, CorruptCheckpointError, InvalidArgumentError, InvalidNameError, SidecarError
from ckpt_callback._sidecar import (
    MAX_SIDECAR_BYTES,
    SIDECAR_NAME,
    FileEntry,
    Monitor,
    check_relative_path,
    clean_metrics,
    clean_number,
    dumps_strict,
    loads_strict,
    validate_name,
)

SPEC_KEYS = [
    "schemaVersion", "id", "name", "type", "description", "step", "epoch", "trainLoss", "evalLoss", "metrics",
    "model", "version", "inferenceReady", "node", "createdAt", "updatedAt", "files", "size", "logicalSize",
    "sharedSize", "monitor", "runId", "createdBy", "source",
]
SHA = "ab" * 32


def sidecar(**changes) -> dict:
    """A valid sidecar as parsed JSON, with two files, then ``changes`` applied."""
    files = (FileEntry("model.safetensors", 10, SHA), FileEntry("tokenizer/vocab.json", 5, "0" * 64))
    data = CheckpointInfo(name="c", step=1, files=files, size=15, monitor=Monitor("evalLoss", "min"),
                          run_id="run-1").to_json()
    data.update(changes)
    return data


def test_to_json_has_exactly_the_spec_keys_in_order():
    info = CheckpointInfo(name="checkpoint-1", step=1, files=(FileEntry("model.safetensors", 10, SHA),), size=10)
    data = info.to_json()
    assert list(data) == SPEC_KEYS
    assert data["schemaVersion"] == 1
    assert data["files"] == [{"path": "model.safetensors", "size": 10, "sha256": SHA}]
    assert data["createdAt"].endswith("Z") and "T" in data["createdAt"]
    assert data["monitor"] is None and data["runId"] is None


def test_monitor_and_run_id_round_trip_and_old_sidecars_read_as_none():
    info = CheckpointInfo(name="c", step=2, monitor=Monitor("accuracy", "max"), run_id="run-7")
    data = json.loads(info.dumps())
    assert data["monitor"] == {"name": "accuracy", "mode": "max"} and data["runId"] == "run-7"
    back = CheckpointInfo.loads(info.dumps())
    assert back == info and back.runId == "run-7" and back.monitor == Monitor("accuracy", "max")
    old = {k: v for k, v in data.items() if k not in ("monitor", "runId")}
    assert CheckpointInfo.from_json(old).monitor is None and CheckpointInfo.from_json(old).run_id is None


def test_sharding_round_trips_and_only_sharded_checkpoints_have_it():
    from ckpt_callback._sidecar import Sharding

    sharding = Sharding(world_size=2, meshes=((2,), (2, 2)), placements=("Replicate()", "Shard(dim=0)"))
    info = CheckpointInfo(name="c", step=2, sharding=sharding)
    data = json.loads(info.dumps())
    assert data["sharding"] == {"worldSize": 2, "engine": "torch.distributed.checkpoint", "format": "hf-safetensors",
                                "meshes": [[2], [2, 2]], "placements": ["Replicate()", "Shard(dim=0)"],
                                "consolidated": False}
    assert CheckpointInfo.loads(info.dumps()) == info
    assert "sharding" not in CheckpointInfo(name="c", step=2).to_json()


@pytest.mark.parametrize("bad", [
    [], "2", {"worldSize": 0}, {"worldSize": True}, {"worldSize": 2, "meshes": [[0]]}, {"worldSize": 2, "meshes": [2]},
    {"worldSize": 2, "placements": [1]}, {"worldSize": 2, "placements": ["x" * 300]},
    {"worldSize": 2, "consolidated": "yes"}, {"worldSize": 2, "engine": None},
])
def test_a_malformed_sharding_is_a_sidecar_error(bad):
    with pytest.raises(SidecarError, match="sharding"):
        CheckpointInfo.from_json(sidecar(sharding=bad))


def test_unknown_keys_are_ignored():
    info = CheckpointInfo.from_json(sidecar(storedSize=3, provenance={"from": ["x"]}))
    assert info.step == 1 and not hasattr(info, "storedSize")


def test_unknown_losses_are_null_not_zero():
    data = json.loads(CheckpointInfo(name="c", step=3).dumps())
    assert data["trainLoss"] is None and data["evalLoss"] is None and data["epoch"] is None


def test_non_finite_values_are_written_as_null_and_read_back():
    info = CheckpointInfo(name="c", step=3, eval_loss=math.nan, epoch=math.inf, metrics={"a": 1.0, "b": -math.inf})
    text = info.dumps()
    assert "NaN" not in text and "Infinity" not in text
    back = CheckpointInfo.loads(text)
    assert back.eval_loss is None and back.epoch is None and back.metrics == {"a": 1.0}


def test_camel_case_aliases_and_item_access():
    info = CheckpointInfo(name="c", step=3, eval_loss=0.25, inference_ready=True)
    assert info.evalLoss == 0.25 and info["evalLoss"] == 0.25 and info.inferenceReady is True
    with pytest.raises(AttributeError):
        info.nonsense  # noqa: B018


@given(
    step=st.integers(0, 2**63 - 1),
    loss=st.none() | st.floats(allow_nan=False, allow_infinity=False),
    metrics=st.dictionaries(st.text(min_size=1, max_size=10), st.floats(allow_nan=False, allow_infinity=False)),
    kind=st.sampled_from(["automatic", "best", "manual", "final"]),
    description=st.none() | st.text(max_size=50),
    monitor=st.none() | st.builds(Monitor, st.text(min_size=1, max_size=10), st.sampled_from(["min", "max"])),
)
def test_round_trip(step, loss, metrics, kind, description, monitor):
    info = CheckpointInfo(name="c", step=step, train_loss=loss, eval_loss=loss, metrics=metrics, type=kind,
                          description=description, monitor=monitor)
    assert CheckpointInfo.loads(info.dumps()) == info


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


DEEP = nested(100_000)
BAD_VALUES = {
    "null": None, "true": True, "negative": -1, "fraction": 1.5, "string": "x", "list": [], "object": {},
    "huge": 10**400, "deep": DEEP, "surrogate": "\ud800",
}
# For each key, the values above that the spec allows.
ALLOWED = {
    "schemaVersion": set(),
    "id": {"string"},
    "name": {"string"},
    "type": set(),
    "description": {"null", "string"},
    "step": set(),
    "epoch": {"null", "negative", "fraction"},
    "trainLoss": {"null", "negative", "fraction"},
    "evalLoss": {"null", "negative", "fraction"},
    "metrics": {"null", "object"},
    "model": {"null", "string"},
    "version": {"null", "string"},
    "inferenceReady": {"true"},
    "node": {"string"},
    "createdAt": {"string"},
    "updatedAt": {"string"},
    "files": set(),
    "size": set(),
    "logicalSize": set(),
    "sharedSize": set(),
    "monitor": {"null"},
    "runId": {"null", "string"},
    "createdBy": {"null", "string"},
    "source": {"null", "object"},
}
assert set(ALLOWED) == set(SPEC_KEYS)


@pytest.mark.parametrize(
    ("key", "label"),
    [(key, label) for key in SPEC_KEYS for label in BAD_VALUES if label not in ALLOWED[key]],
)
def test_wrong_type_for_every_key_is_a_sidecar_error(key, label):
    data = sidecar(**{key: BAD_VALUES[label]})
    with pytest.raises(SidecarError, match=r"^root/c/checkpoint\.json: ") as err:
        CheckpointInfo.from_json(data, where="root/c/checkpoint.json")
    assert len(str(err.value)) < 600  # a hostile value is not echoed whole


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(schemaVersion=2), "unknown schemaVersion 2"),
        (lambda d: d.update(schemaVersion=True), "unknown schemaVersion True"),
        (lambda d: d.pop("schemaVersion"), "unknown schemaVersion None"),
        (lambda d: d.pop("step"), "missing keys step"),
        (lambda d: d.pop("id"), "missing keys id"),
        (lambda d: d.update(step="ten"), "'step' must be a non-negative integer"),
        (lambda d: d.update(step=-1), "'step' must be a non-negative integer"),
        (lambda d: d.update(step=True), "'step' must be a non-negative integer"),
        (lambda d: d.update(step=2**63), "'step' must be a non-negative integer"),
        (lambda d: d.update(type="weird"), "'type' must be one of"),
        (lambda d: d.update(name="../x"), "'name' is not a valid checkpoint name"),
        (lambda d: d.update(name="x\n"), "'name' is not a valid checkpoint name"),
        (lambda d: d.update(evalLoss="low"), "'evalLoss' must be a finite number or null"),
        (lambda d: d.update(evalLoss=10**400), "'evalLoss' must be a finite number or null"),
        (lambda d: d.update(metrics={"acc": "high"}), "'metrics' must be an object of finite numbers"),
        (lambda d: d.update(metrics={"acc": True}), "'metrics' must be an object of finite numbers"),
        (lambda d: d.update(metrics={"acc": 10**400}), "'metrics' must be an object of finite numbers"),
        (lambda d: d.update(monitor={"name": "evalLoss"}), "'monitor' must be null or"),
        (lambda d: d.update(monitor={"name": "", "mode": "min"}), "'monitor' must be null or"),
        (lambda d: d.update(monitor={"name": "x", "mode": "up"}), "'monitor' must be null or"),
        (lambda d: d.update(files={"model.safetensors": 10}), "'files' must be a list"),
        (lambda d: d.update(files=["model.safetensors"]), r"files\[0\] must be an object"),
        (lambda d: d.update(files=[{"path": "x"}]), r"files\[0\] is missing size, sha256"),
        (lambda d: d["files"][0].update(size=-1), r"files\[0\]: 'size' must be an integer"),
        (lambda d: d["files"][0].update(size=True), r"files\[0\]: 'size' must be an integer"),
        (lambda d: d["files"][0].update(size="10"), r"files\[0\]: 'size' must be an integer"),
        (lambda d: d["files"][0].update(size=2**53), r"files\[0\]: 'size' must be an integer"),
        (lambda d: d["files"][0].update(sha256=SHA.upper()), "'sha256' must be 64 lowercase hex"),
        (lambda d: d["files"][0].update(sha256=SHA[:-1]), "'sha256' must be 64 lowercase hex"),
        (lambda d: d["files"][0].update(sha256="g" * 64), "'sha256' must be 64 lowercase hex"),
        (lambda d: d["files"][0].update(sha256=None), "'sha256' must be 64 lowercase hex"),
        (lambda d: d["files"][0].update(path="../x"), "'..' component"),
        (lambda d: d["files"].append(dict(d["files"][0])), "'model.safetensors' is listed twice"),
        (lambda d: d["files"].append({"path": "tokenizer", "size": 0, "sha256": SHA}),
         "'tokenizer' is listed as a file and as a folder"),
        (lambda d: d.update(size=14), "'size' is 14 but its files add up to 15 bytes"),
        (lambda d: d.update(size=-15), "'size' must be a non-negative integer"),
        (lambda d: d.update(inferenceReady="yes"), "'inferenceReady' must be true or false"),
    ],
)
def test_malformed_sidecars_are_rejected_with_the_reason(mutate, message):
    data = sidecar()
    mutate(data)
    with pytest.raises(SidecarError, match=message) as err:
        CheckpointInfo.from_json(data, where="root/c/checkpoint.json")
    assert "root/c/checkpoint.json" in str(err.value)


@pytest.mark.parametrize(
    "path",
    ["../x", "..", ".", "./model.safetensors", "a/../b", "a/./b", "a//b", "/abs/x", "//server/share",
     "C:/x", "C:x", "c:\\x", "a\\..\\x", "x\\y", "", "a/", "x\x00y", "x\ny", "x\x7f", "\ud800",
     "s3://bucket/x", "model.safetensors:stream", "x" * 1025, "checkpoint.json", "...", "x./y", "x ", 5, None,
     ["x"]],
)
def test_paths_that_leave_the_checkpoint_are_refused(path):
    with pytest.raises(CorruptCheckpointError, match="where-it-was"):
        check_relative_path(path, "where-it-was")
    data = sidecar()
    data["files"][0]["path"] = path
    with pytest.raises(SidecarError):
        CheckpointInfo.from_json(data)


def test_a_path_a_caller_gave_raises_the_error_asked_for():
    with pytest.raises(InvalidArgumentError, match="save"):
        check_relative_path("../x", "save(files=...)", error=InvalidArgumentError)


@pytest.mark.parametrize("path", ["model.safetensors", "tokenizer/vocab.json", "a/b/c.d", "sub/checkpoint.json",
                                  ".hidden", "x..y", "~x", "x" * 1024])
def test_relative_paths_inside_the_checkpoint_are_kept(path):
    assert check_relative_path(path, "here") == path


SPECIAL_TEXT = [
    ("", "not valid JSON"),
    ("{", "not valid JSON"),
    ('{"a": 1} x', "not valid JSON"),
    ('{"schemaVersion": NaN}', "NaN is not JSON"),
    ('{"evalLoss": Infinity}', "Infinity is not JSON"),
    ('{"evalLoss": -Infinity}', "-Infinity is not JSON"),
    ('{"evalLoss": 1e400}', "does not fit a float"),
    ('{"step": ' + "9" * 5000 + "}", "not valid JSON"),
    ('{"a": 1, "a": 2}', "appears twice"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"a":' * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
]


@pytest.mark.parametrize(("text", "message"), SPECIAL_TEXT, ids=[m for _, m in SPECIAL_TEXT])
def test_json_that_python_accepts_but_the_library_never_writes_is_refused(text, message):
    with pytest.raises(SidecarError, match=message):
        CheckpointInfo.loads(text)
    with pytest.raises(SidecarError, match=message):
        CheckpointInfo.loads(text.encode())


@pytest.mark.parametrize(
    "raw",
    [b"\xff\xfe{", b"{\"name\": \"\xe9\"}", '{"a": 1}'.encode("utf-16"), b"\xef\xbb\xbf{}", b"\x00" * 10],
    ids=["garbage", "latin-1", "utf-16", "bom", "nul"],
)
def test_bytes_that_are_not_utf8_json_are_refused(raw):
    with pytest.raises(SidecarError):
        CheckpointInfo.loads(raw)


def test_oversized_sidecars_are_refused_before_parsing():
    big = b" " * MAX_SIDECAR_BYTES + CheckpointInfo(name="c", step=1).dumps().encode()
    with pytest.raises(SidecarError, match="larger than"):
        CheckpointInfo.loads(big)
    with pytest.raises(SidecarError, match="larger than"):
        CheckpointInfo.loads(big.decode())


@pytest.mark.parametrize("text", ["[]", "null", '"x"', "5", "true"])
def test_not_an_object(text):
    with pytest.raises(SidecarError, match="expected a JSON object"):
        CheckpointInfo.loads(text, where=SIDECAR_NAME)


@pytest.mark.parametrize("value", [None, 5, object(), ["x"]], ids=["none", "int", "object", "list"])
def test_loads_of_a_non_text_value_is_a_sidecar_error(value):
    with pytest.raises(SidecarError):
        CheckpointInfo.loads(value)


json_leaves = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
               | st.text(max_size=8) | st.just("\ud800"))
json_values = st.recursive(json_leaves, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from([*SPEC_KEYS, "files.0", "files.0.path", "files.0.size", "files.0.sha256", "monitor.name",
                            "monitor.mode"]),
       value=json_values, drop=st.booleans())
def test_any_mutation_gives_a_checkpoint_info_or_a_sidecar_error(key, value, drop):
    data = sidecar()
    *parents, last = key.split(".")
    target = data
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target[part]
    index = int(last) if isinstance(target, list) else last
    if drop:
        del target[index]
    else:
        target[index] = value
    try:
        info = CheckpointInfo.from_json(data)
    except SidecarError:
        return
    CheckpointInfo.loads(info.dumps())  # what was accepted writes back as strict, readable JSON


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_bytes_give_a_sidecar_error(raw):
    with pytest.raises(SidecarError):
        CheckpointInfo.loads(raw)


@pytest.mark.parametrize("name", ["", " ", "a/b", "a\\b", ".", "..", "../x", "x..y", "latest", "best", "final",
                                  ".hidden", "-flag", "a b", "x\n", "x\r", "x\t", "\nx", "x\x00", "é", None, 5,
                                  "x" * 201])
def test_bad_names(name):
    with pytest.raises(InvalidNameError):
        validate_name(name)


@pytest.mark.parametrize("name", ["checkpoint-500", "before-lr-drop", "run_1.v2", "Best", "final-2", "x@1",
                                  "x" * 200])
def test_good_names(name):
    assert validate_name(name) == name


def test_clean_metrics_keeps_numbers_by_their_own_names():
    assert clean_metrics({"eval_loss": 0.5, "acc": 1, "nan": float("nan"), "s": "x", "flag": True,
                          "t": torch.tensor(0.25), "many": torch.ones(2), "n": np.float32(2.0)}) == {
        "eval_loss": 0.5, "acc": 1, "t": 0.25, "n": 2.0}
    assert clean_metrics({"big": 2**60})["big"] == 2**60  # ints stay exact


@pytest.mark.parametrize("value", [10**400, -(10**400)])
def test_numbers_too_large_for_a_float_are_refused_by_name(value):
    with pytest.raises(InvalidArgumentError, match=r"metric 'n' = .* does not fit a 64-bit float"):
        clean_metrics({"n": value})
    with pytest.raises(InvalidArgumentError, match="evalLoss"):
        clean_number(value, key="evalLoss")


def test_clean_number():
    assert clean_number(None) is None and clean_number(True) is None and clean_number("x") is None
    assert clean_number(float("inf")) is None and clean_number(torch.tensor(float("nan"))) is None
    assert clean_number(np.float64(0.5)) == 0.5 and clean_number(3) == 3.0


def test_dumps_strict_writes_null_for_every_non_finite_number():
    value = {"best": math.inf, "a": [1.0, math.nan, (2, -math.inf)], "n": {"x": np.float32("nan")},
             "t": torch.tensor(float("inf")), "ok": np.float64(0.5), "i": np.int64(3)}
    text = dumps_strict(value, allow_nan=True, sort_keys=True)
    assert json.loads(text) == {"a": [1.0, None, [2, None]], "best": None, "i": 3, "n": {"x": None}, "ok": 0.5,
                                "t": None}
    assert loads_strict(text, "x") == json.loads(text)
    with pytest.raises(TypeError):
        dumps_strict({"f": object()})


@pytest.mark.parametrize(
    ("text", "message"), [("NaN", "NaN is not JSON"), ("[1e999]", "does not fit"), ("[", "not valid JSON"),
                          (b"\xff", "not UTF-8")])
def test_loads_strict_raises_the_error_it_is_given(text, message):
    with pytest.raises(CorruptCheckpointError, match=f"some/file.json: .*{message}") as err:
        loads_strict(text, "some/file.json")
    assert not isinstance(err.value, SidecarError)
