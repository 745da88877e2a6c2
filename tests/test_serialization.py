from __future__ import annotations

import io
import json

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt_callback import CorruptCheckpointError, InvalidArgumentError
from ckpt_callback._serialization import (
    _DTYPES,
    dedupe_tensors,
    flatten_state,
    plan_model_files,
    read_safetensors,
    unflatten_state,
    write_safetensors,
)

ALL_DTYPES = sorted(_DTYPES, key=str)


def round_trip(tensors, metadata=None):
    buf = io.BytesIO()
    size, _ = write_safetensors(buf, tensors, metadata)
    assert size == len(buf.getvalue())
    buf.seek(0)
    return buf.getvalue(), *read_safetensors(buf)


def sample(dtype: torch.dtype, shape=(3, 5)) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if (dtype.is_floating_point and dtype.itemsize == 1) or dtype in (torch.uint16, torch.uint32, torch.uint64):
        return torch.randint(0, 100, shape, dtype=torch.uint8).view(dtype) if dtype.itemsize == 1 else (
            torch.randint(0, 100, shape, dtype=torch.int64).to(dtype))
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    return torch.randint(-100 if dtype.is_signed else 0, 100, shape).to(dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_round_trips_bit_exactly_and_safetensors_reads_it(dtype):
    t = sample(dtype)
    raw, back, _ = round_trip({"t": t, "scalar": t.reshape(-1)[0].clone(), "empty": t[:0]})
    assert back["t"].dtype == dtype and back["t"].shape == t.shape
    assert torch.equal(back["t"].view(torch.uint8), t.view(torch.uint8))
    assert back["scalar"].shape == () and back["empty"].shape == (0, 5)
    theirs = safetensors.torch.load(raw)  # the reference implementation agrees on the bytes
    assert torch.equal(theirs["t"].view(torch.uint8), t.view(torch.uint8))


def test_non_contiguous_tensors_round_trip():
    base = torch.randn(6, 4)
    tensors = {"t": base.t(), "strided": base[::2, 1:3]}
    _, back, _ = round_trip(tensors)
    assert torch.equal(back["t"], base.t()) and torch.equal(back["strided"], base[::2, 1:3])


def test_tied_tensors_are_stored_once_and_overlapping_views_copied():
    w = torch.randn(4, 4)
    kept, aliases = dedupe_tensors({"embed.weight": w, "head.weight": w, "row": w[0]})
    assert set(kept) == {"embed.weight", "row"} and aliases == {"head.weight": "embed.weight"}
    assert kept["row"].untyped_storage().data_ptr() != w.untyped_storage().data_ptr()
    safetensors.torch.save(kept)  # would raise on shared memory


def test_unsupported_values_are_named():
    with pytest.raises(InvalidArgumentError, match=r"'x' has dtype torch\.complex128"):
        dedupe_tensors({"x": torch.zeros(2, dtype=torch.complex128)})
    with pytest.raises(InvalidArgumentError, match=r"'y' is a int"):
        dedupe_tensors({"y": 3})


def test_sharding_follows_hf_names_and_index():
    state = {f"layer{i}.weight": torch.randn(64, 64) for i in range(6)}  # 16 KiB each
    plan = plan_model_files(state, max_shard_size=40_000)
    assert sorted(plan.files) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert plan.index is not None and set(plan.index["weight_map"]) == set(state)
    assert plan.index["metadata"]["total_size"] == 6 * 64 * 64 * 4
    assert list(plan_model_files(state).files) == ["model.safetensors"]


@pytest.mark.parametrize("cut", [0, 4, 8, 20, -1])
def test_truncated_streams_raise_corrupt(cut):
    raw, _, _ = round_trip({"a": torch.randn(100)})
    with pytest.raises(CorruptCheckpointError):
        read_safetensors(io.BytesIO(raw[:cut] if cut >= 0 else raw[:-3]))


def test_garbage_header_raises_corrupt():
    with pytest.raises(CorruptCheckpointError, match="header length"):
        read_safetensors(io.BytesIO(b"\xff" * 64))


def test_optimizer_state_round_trips_without_pickle():
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.99))
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    skeleton, tensors = flatten_state({"optimizer": opt.state_dict()})
    json.dumps(skeleton)  # everything but tensors is JSON
    back = unflatten_state(json.loads(json.dumps(skeleton)), tensors)["optimizer"]
    assert back["param_groups"][0]["betas"] == (0.8, 0.99)
    assert set(back["state"]) == {0, 1}
    assert torch.equal(back["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
    | st.dictionaries(st.text(min_size=1, max_size=4).filter(lambda k: not k.startswith("__")) | st.integers(),
                      inner, max_size=3),
    max_leaves=15,
)


@settings(max_examples=200)
@given(value=json_values)
def test_flatten_round_trip(value):
    skeleton, tensors = flatten_state({"x": value, "t": torch.arange(3)})
    back = unflatten_state(json.loads(json.dumps(skeleton)), tensors)
    assert back["x"] == value and torch.equal(back["t"], torch.arange(3))


def test_unpicklable_objects_are_refused():
    with pytest.raises(InvalidArgumentError, match="without pickle"):
        flatten_state({"f": object()})
