from __future__ import annotations

import contextlib
import io
import json
import math
import re
import struct

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt_callback import CorruptCheckpointError, InvalidArgumentError
from ckpt_callback._serialization import (
    _DTYPES,
    ALIASES_KEY,
    add_aliases,
    aliases_from_metadata,
    dedupe_tensors,
    flatten_state,
    parse_index,
    plan_model_files,
    read_safetensors,
    unflatten_state,
    write_safetensors,
)
from ckpt_callback._sidecar import dumps_strict, loads_strict

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


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and values (bit for bit, so NaN payloads and float8 compare too)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point and a.dtype.itemsize > 1 and not torch.equal(a.double(), b.double()):
        return False  # values as numbers, not only bytes: a swapped F16/BF16 code has the same bytes
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_round_trips_bit_exactly(dtype):
    t = sample(dtype)
    _, back, _ = round_trip({"t": t, "scalar": t.reshape(-1)[0].clone(), "empty": t[:0]})
    assert same(back["t"], t)
    assert back["scalar"].shape == () and back["empty"].shape == (0, 5)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_decodes_the_same_with_safetensors_own_reader_and_writer(dtype):
    t = sample(dtype)
    tensors = {"t": t, "scalar": t.reshape(-1)[0].clone(), "empty": t[:0]}
    ours, _, _ = round_trip(tensors)
    theirs = safetensors.torch.load(ours)  # what every other reader (transformers, vLLM) will see
    assert set(theirs) == set(tensors) and all(same(theirs[k], tensors[k]) for k in tensors)
    raw = safetensors.torch.save(tensors)  # and we read what they write
    back, _ = read_safetensors(io.BytesIO(raw), size=len(raw))
    assert all(same(back[k], tensors[k]) for k in tensors)


def test_dtype_codes_are_safetensors_codes():
    assert {code: dtype for dtype, code in _DTYPES.items()} == {
        code: dtype for code, dtype in safetensors.torch._TYPES.items() if dtype in _DTYPES}


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


# --- hostile or damaged safetensors headers ---------------------------------------------------


def encode(header: dict | bytes, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def valid_file() -> tuple[dict, bytes]:
    """A two-tensor file's header (as a dict) and data section."""
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2, dtype=torch.int64)}
    raw, _, _ = round_trip(tensors, {"format": "pt"})
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


FOUR_TIB = 4 << 40
HEADER_CASES = {
    "dtype unknown": (lambda h: h["a"].update(dtype="F4"), "'a' has dtype 'F4'"),
    "dtype not a string": (lambda h: h["a"].update(dtype=5), "'a' has dtype 5"),
    "dtype missing": (lambda h: h["a"].pop("dtype"), "'a' has dtype None"),
    "shape missing": (lambda h: h["a"].pop("shape"), "'a' has shape None"),
    "shape not a list": (lambda h: h["a"].update(shape="2x3"), "'a' has shape '2x3'"),
    "shape negative": (lambda h: h["a"].update(shape=[-2, -3]), "'a' has shape"),
    "shape bool": (lambda h: h["a"].update(shape=[True, 6]), "'a' has shape"),
    "shape float": (lambda h: h["a"].update(shape=[2.0, 3]), "'a' has shape"),
    "shape 2**64": (lambda h: h["a"].update(shape=[2**64]), "'a' has shape"),
    "shape too many dims": (lambda h: h["a"].update(shape=[1] * 65), "'a' has shape"),
    "shape 4 TiB, offsets agree": (lambda h: h["a"].update(shape=[FOUR_TIB // 4], data_offsets=[16, 16 + FOUR_TIB]),
                                   f"describes {16 + FOUR_TIB} bytes of tensor data but the file holds 40"),
    "shape 4 TiB, offsets small": (lambda h: h["a"].update(shape=[FOUR_TIB // 4]), "'a' claims 24 bytes"),
    "shape product mismatch": (lambda h: h["a"].update(shape=[3, 3]), "'a' claims 24 bytes"),
    "offsets missing": (lambda h: h["a"].pop("data_offsets"), "'a' has data_offsets None"),
    "offsets three": (lambda h: h["a"].update(data_offsets=[0, 24, 24]), "'a' has data_offsets"),
    "offsets strings": (lambda h: h["a"].update(data_offsets=["0", "24"]), "'a' has data_offsets"),
    "offsets bool": (lambda h: h["b"].update(data_offsets=[False, 16]), "'b' has data_offsets"),
    "offsets reversed": (lambda h: h["a"].update(data_offsets=[40, 16]), "'a' claims -24 bytes"),
    "offsets negative": (lambda h: h["a"].update(data_offsets=[-24, 0]), "'a' has data_offsets"),
    "offsets gap": (lambda h: h["a"].update(data_offsets=[17, 41]), "'a' starts at byte 17"),
    "offsets overlap": (lambda h: h["a"].update(data_offsets=[8, 32]), "starts at byte 8"),
    "offsets past the end": (lambda h: (h["b"].update(shape=[5], data_offsets=[0, 40]),
                                        h["a"].update(data_offsets=[40, 64])),
                             "describes 64 bytes of tensor data but the file holds 40"),
    "entry a list": (lambda h: h.update(a=[1, 2]), "'a' has no {dtype"),
    "entry null": (lambda h: h.update(a=None), "'a' has no {dtype"),
    "extra tensor": (lambda h: h.update(c={"dtype": "U8", "shape": [1], "data_offsets": [40, 41]}),
                     "describes 41 bytes"),
    "metadata a list": (lambda h: h.update(__metadata__=["x"]), "__metadata__ must map strings to strings"),
    "metadata numbers": (lambda h: h.update(__metadata__={"format": 1}), "__metadata__ must map strings"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_malformed_headers_raise_corrupt_naming_file_and_tensor_before_allocating(case, monkeypatch):
    header, data = valid_file()
    mutate, message = HEADER_CASES[case]
    mutate(header)
    raw = encode(header, data)
    allocations = []
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: allocations.append(a) or real_empty(*a, **k))
    with pytest.raises(CorruptCheckpointError, match=f"ckpt/model.safetensors: .*{re.escape(message)}"):
        read_safetensors(io.BytesIO(raw), where="ckpt/model.safetensors", size=len(raw))
    assert allocations == []  # the whole header is checked before the first tensor exists


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"[1, 2]", "header is not a JSON object"),
        (b"{", "not valid JSON"),
        (b'{"a": NaN}', "NaN is not JSON"),
        (b"\xff\xfe\x00", "not UTF-8"),
        (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
        (b'{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "a": {}}', "appears twice"),
    ],
    ids=["list", "truncated json", "nan", "not utf-8", "deep", "duplicate"],
)
def test_headers_that_are_not_strict_json_raise_corrupt(header, message):
    raw = encode(header, b"")
    with pytest.raises(CorruptCheckpointError, match=message):
        read_safetensors(io.BytesIO(raw), where="f", size=len(raw))
    with pytest.raises(CorruptCheckpointError, match=message):
        read_safetensors(io.BytesIO(raw), where="f")


@pytest.mark.parametrize(
    ("make", "size", "message"),
    [
        (lambda raw: raw, lambda n: n + 1, "describes 40 bytes of tensor data but the file holds 41"),
        (lambda raw: raw, lambda n: n - 1, "describes 40 bytes of tensor data but the file holds 39"),
        (lambda raw: raw, lambda n: 7, "cannot be a safetensors file"),
        (lambda raw: raw, lambda n: True, "cannot be a safetensors file"),
        (lambda raw: raw[:-1], lambda n: n, "truncated inside tensor 'a' (23 of 24 bytes)"),
        (lambda raw: raw[:6], lambda n: n, "truncated"),
        (lambda raw: raw[:20], lambda n: n, "truncated"),
        (lambda raw: struct.pack("<Q", 2**63) + raw[8:], lambda n: n, "header length 9223372036854775808"),
        (lambda raw: struct.pack("<Q", len(raw) - 7) + raw[8:], lambda n: n, "header length"),
        (lambda raw: struct.pack("<Q", 101 << 20) + b" " * 64, lambda n: 200 << 20, "header length"),
    ],
    ids=["trailing byte", "missing byte", "size 7", "size bool", "stream short by one", "cut in length",
         "cut in header", "length 2**63", "length past the end", "length past 100 MiB"],
)
def test_lengths_that_disagree_with_the_real_size_raise_corrupt(make, size, message):
    header, data = valid_file()
    full = encode(header, data)
    with pytest.raises(CorruptCheckpointError, match=re.escape(message)):
        read_safetensors(io.BytesIO(make(full)), where="f", size=size(len(full)))


def test_without_the_size_a_4_tib_claim_is_corrupt_not_an_allocation():
    raw = encode({"a": {"dtype": "F32", "shape": [FOUR_TIB // 4], "data_offsets": [0, FOUR_TIB]}}, b"\0" * 16)
    with pytest.raises(CorruptCheckpointError, match="cannot allocate 4398046511104 bytes for tensor 'a'"):
        read_safetensors(io.BytesIO(raw), where="f")


def test_into_tensors_are_filled_in_place_and_the_size_is_checked():
    header, data = valid_file()
    raw = encode(header, data)
    a = torch.zeros(2, 3)
    back, metadata = read_safetensors(io.BytesIO(raw), where="f", into={"a": a, "b": torch.zeros(3)}, size=len(raw))
    assert back["a"] is not a and back["a"].data_ptr() == a.data_ptr() and a.sum() == 15
    assert back["b"].shape == (2,) and metadata == {"format": "pt"}


header_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**66), 2**66) | st.floats(allow_nan=False) | st.text(max_size=6)
    | st.sampled_from(["F32", "I64", "BF16", "__metadata__"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(
        ["dtype", "shape", "data_offsets", "a", "b", "format"]), inner, max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(tensor=st.sampled_from(["a", "b", "c", "__metadata__"]),
       key=st.sampled_from(["dtype", "shape", "data_offsets", None]), value=header_values,
       cut=st.none() | st.integers(0, 120))
def test_any_header_mutation_gives_tensors_or_corrupt(tensor, key, value, cut):
    header, data = valid_file()
    if key is None or not isinstance(header.get(tensor), dict):
        header[tensor] = value
    else:
        header[tensor][key] = value
    raw = encode(header, data)
    raw = raw if cut is None else raw[:cut]
    for size in (len(raw), None):
        with contextlib.suppress(CorruptCheckpointError):
            read_safetensors(io.BytesIO(raw), where="f", size=size)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=300))
def test_any_bytes_give_tensors_or_corrupt(raw):
    for size in (len(raw), None):
        with contextlib.suppress(CorruptCheckpointError):
            read_safetensors(io.BytesIO(raw), where="f", size=size)


# --- the shard index and the tied-tensor aliases ----------------------------------------------


def index(**changes) -> dict:
    doc = {"metadata": {"total_size": 48, ALIASES_KEY: {"head.weight": "embed.weight"}},
           "weight_map": {"embed.weight": "model-00001-of-00002.safetensors",
                          "hidden.weight": "model-00002-of-00002.safetensors",
                          "hidden.bias": "model-00002-of-00002.safetensors"}}
    doc.update(changes)
    return doc


def test_parse_index_returns_sorted_unique_files_and_aliases():
    files, aliases = parse_index(json.dumps(index()).encode(), "ckpt/model.safetensors.index.json")
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert aliases == {"head.weight": "embed.weight"}
    doc = index(metadata=None)
    assert parse_index(json.dumps(doc).encode(), "i")[1] == {}
    doc = index(metadata={ALIASES_KEY: json.dumps({"head.weight": "embed.weight"})})  # a JSON string works too
    assert parse_index(json.dumps(doc).encode(), "i")[1] == {"head.weight": "embed.weight"}


def test_parse_index_reads_what_the_planner_writes():
    state = {f"layer{i}.weight": torch.randn(64, 64) for i in range(4)}
    state["tied"] = state["layer0.weight"]
    plan = plan_model_files(state, max_shard_size=40_000)
    files, aliases = parse_index(json.dumps(plan.index).encode(), "i")
    assert files == sorted(plan.files) and aliases == {"tied": "layer0.weight"}


def with_path(path):
    return lambda d: d["weight_map"].update({"hidden.bias": path})


INDEX_CASES = {
    "traversal": (with_path("../model-00002-of-00002.safetensors"), "'..' component"),
    "deep traversal": (with_path("a/../../../etc/passwd"), "'..' component"),
    "absolute": (with_path("/etc/passwd"), "not a relative"),
    "drive letter": (with_path("C:/x.safetensors"), "not a relative"),
    "backslash": (with_path("..\\x.safetensors"), "not a relative"),
    "url": (with_path("s3://bucket/x.safetensors"), "':'"),
    "nul": (with_path("x\x00.safetensors"), "control characters"),
    "the sidecar": (with_path("checkpoint.json"), "the sidecar itself"),
    "empty path": (with_path(""), "not a non-empty string"),
    "number path": (with_path(5), "not a non-empty string"),
    "list path": (with_path(["x"]), "not a non-empty string"),
    "weight_map missing": (lambda d: d.pop("weight_map"), "'weight_map' must map"),
    "weight_map empty": (lambda d: d.update(weight_map={}), "'weight_map' must map"),
    "weight_map list": (lambda d: d.update(weight_map=["model.safetensors"]), "'weight_map' must map"),
    "metadata list": (lambda d: d.update(metadata=[]), "metadata must be an object"),
    "aliases a number": (lambda d: d["metadata"].update({ALIASES_KEY: 5}), "must map tensor names"),
    "aliases bad json": (lambda d: d["metadata"].update({ALIASES_KEY: "{"}), "not valid JSON"),
    "aliases json list": (lambda d: d["metadata"].update({ALIASES_KEY: "[1]"}), "must map tensor names"),
    "aliases non-string": (lambda d: d["metadata"].update({ALIASES_KEY: {"x": 1}}), "must map tensor names"),
    "alias to nothing": (lambda d: d["metadata"].update({ALIASES_KEY: {"x": "missing"}}), "does not list"),
    "alias shadows": (lambda d: d["metadata"].update({ALIASES_KEY: {"hidden.bias": "embed.weight"}}),
                      "under both names"),
}


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_malformed_indexes_raise_corrupt_naming_the_file(case):
    doc = index()
    mutate, message = INDEX_CASES[case]
    mutate(doc)
    with pytest.raises(CorruptCheckpointError, match=f"ckpt/model.safetensors.index.json.*{re.escape(message)}"):
        parse_index(json.dumps(doc).encode(), "ckpt/model.safetensors.index.json")


@pytest.mark.parametrize("raw", [b"", b"[]", b"null", b"{", b'{"weight_map": NaN}', b"\xff", b"[" * 100_000],
                         ids=["empty", "list", "null", "truncated", "nan", "not utf-8", "deep"])
def test_indexes_that_are_not_json_objects_raise_corrupt(raw):
    with pytest.raises(CorruptCheckpointError, match="idx"):
        parse_index(raw, "idx")


@pytest.mark.parametrize("metadata", [None, [], "x", {ALIASES_KEY: 3}, {ALIASES_KEY: "[]"}, {ALIASES_KEY: "{"},
                                      {ALIASES_KEY: '{"a": 1}'}, {ALIASES_KEY: "NaN"}])
def test_malformed_aliases_raise_corrupt(metadata):
    with pytest.raises(CorruptCheckpointError, match="meta"):
        aliases_from_metadata(metadata, where="meta")


def test_aliases_point_only_at_stored_tensors():
    state = {"a": torch.ones(1)}
    add_aliases(state, {"b": "a"}, where="w")
    assert state["b"] is state["a"]
    with pytest.raises(CorruptCheckpointError, match="'c' refers to 'missing', which is not stored"):
        add_aliases({"a": torch.ones(1)}, {"c": "missing"}, where="w")
    with pytest.raises(CorruptCheckpointError, match="stored under both names"):
        add_aliases({"a": torch.ones(1), "b": torch.ones(1)}, {"b": "a"}, where="w")
    with pytest.raises(CorruptCheckpointError):  # an alias of an alias is not a stored tensor
        add_aliases({"a": torch.ones(1)}, {"b": "a", "c": "b"}, where="w")


# --- training state: strict JSON, exact resume ------------------------------------------------


def test_non_finite_floats_survive_strict_json_exactly():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min")
    assert plateau.state_dict()["best"] == math.inf
    value = {"plateau": plateau.state_dict(), "x": [math.nan, -math.inf, (math.inf,)], "n": np.float64("nan")}
    skeleton, tensors = flatten_state(value)
    text = dumps_strict(skeleton)
    assert "Infinity" not in text and "NaN" not in text and "null" not in text
    back = unflatten_state(loads_strict(text, "training_state.json"), tensors)
    assert back["plateau"] == plateau.state_dict()
    assert math.isnan(back["x"][0]) and back["x"][1] == -math.inf and back["x"][2] == (math.inf,)
    assert math.isnan(back["n"])
    restored = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min")
    restored.load_state_dict(back["plateau"])
    assert restored.best == math.inf


def test_dict_keys_that_look_like_tags_are_still_exact():
    value = {"__float__": "nan", "__tensor__": "x", "plain": {"__tuple__": [1]}}
    skeleton, tensors = flatten_state(value)
    assert unflatten_state(loads_strict(dumps_strict(skeleton), "x"), tensors) == value


SKELETON_CASES = {
    "unknown tag": ({"__weird__": 1}, "unknown or malformed tag '__weird__'"),
    "tag with company": ({"__tensor__": "t", "x": 1}, "tag keys and others"),
    "tensor not stored": ({"__tensor__": "nope"}, "tensor 'nope', which is not stored"),
    "tensor key a list": ({"__tensor__": ["t"]}, "which is not stored"),
    "ndarray of bfloat16": ({"__ndarray__": "bf"}, "cannot be a numpy array"),
    "tuple of a number": ({"__tuple__": 5}, "malformed tag '__tuple__'"),
    "dict pairs wrong": ({"__dict__": [[1]]}, "malformed tag '__dict__'"),
    "dict pairs not lists": ({"__dict__": "ab"}, "malformed tag '__dict__'"),
    "dict key unhashable": ({"__dict__": [[[1, 2], 3]]}, "cannot be a key"),
    "float unknown": ({"__float__": "NaN"}, "malformed tag '__float__'"),
    "float a number": ({"__float__": 1e308}, "malformed tag '__float__'"),
    "not json": ({"x": object()}, "which is not JSON"),
}


@pytest.mark.parametrize("case", list(SKELETON_CASES))
def test_malformed_training_state_raises_corrupt(case):
    skeleton, message = SKELETON_CASES[case]
    with pytest.raises(CorruptCheckpointError, match=f"ckpt/training_state.json: .*{re.escape(message)}"):
        unflatten_state({"state": [skeleton]}, {"t": torch.ones(1), "bf": torch.ones(1, dtype=torch.bfloat16)},
                        where="ckpt/training_state.json")


def test_deeply_nested_training_state_raises_corrupt():
    deep: dict = {}
    for _ in range(10_000):
        deep = {"x": [deep]}
    with pytest.raises(CorruptCheckpointError, match="nested too deeply"):
        unflatten_state(deep, {})


skeleton_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4)
    | st.sampled_from(["__tensor__", "__ndarray__", "__tuple__", "__dict__", "__float__", "t", "nan", "inf"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(
        ["__tensor__", "__ndarray__", "__tuple__", "__dict__", "__float__", "x"]), inner, max_size=2),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(skeleton=skeleton_values)
def test_any_skeleton_gives_a_value_or_corrupt(skeleton):
    with contextlib.suppress(CorruptCheckpointError):
        unflatten_state(skeleton, {"t": torch.ones(1)})


@pytest.mark.parametrize("sizes", [[0], [1], [4095], [4096, 1], [(16 << 20) - 1, 1], [16 << 20], [5 << 20] * 13 + [123],
                                   [200_000, 70_000, (48 << 20) + 4096]])
def test_local_writes_land_byte_for_byte_at_any_size_and_alignment(tmp_path, sizes):
    """The local writer fills aligned buffers that other threads write at their offsets (O_DIRECT), and
    writes an unaligned tail or a small file plainly: every byte lands where it belongs."""
    from ckpt_callback._storage import Storage

    rng = np.random.default_rng(len(sizes) + sum(sizes))
    chunks = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
    storage = Storage(str(tmp_path))

    def produce(f):
        for i, chunk in enumerate(chunks):  # read-only bytes, writable buffers and tensor memory
            f.write(chunk if i % 3 == 0 else bytearray(chunk) if i % 3 == 1 else
                    torch.frombuffer(bytearray(chunk), dtype=torch.uint8).numpy().data)
        return sum(sizes)

    assert storage.write_stream("f.bin", produce) == sum(sizes)
    assert (tmp_path / "f.bin").read_bytes() == b"".join(chunks)


def test_a_failed_local_write_is_raised_and_leaves_no_write_in_flight(tmp_path, monkeypatch):
    from ckpt_callback import _storage

    calls = []
    real = _storage._pwrite_all

    def failing(fd, view, offset):
        calls.append(offset)
        if offset >= 32 << 20:
            raise OSError(28, "No space left on device")
        return real(fd, view, offset)

    monkeypatch.setattr(_storage, "_pwrite_all", failing)
    storage = _storage.Storage(str(tmp_path))
    with pytest.raises(Exception, match="No space left"):
        storage.write_stream("f.bin", lambda f: [f.write(bytearray(8 << 20)) for _ in range(12)])
    assert max(calls) >= 32 << 20
