"""The byte-grouped zstd codec: round trips, what it gains, and hostile compressed files."""

from __future__ import annotations

import io
import struct

import pytest
import torch

zstandard = pytest.importorskip("zstandard")

from ckpt_callback import CorruptCheckpointError, InvalidArgumentError  # noqa: E402
from ckpt_callback import _codec as codec  # noqa: E402
from ckpt_callback._serialization import safetensors_chunks, safetensors_pieces  # noqa: E402


def encode(tensors: dict[str, torch.Tensor], **kw) -> tuple[bytes, bytes]:
    raw = b"".join(bytes(c) for c in safetensors_chunks(tensors))
    packed = b"".join(bytes(c) for c in codec.encode(safetensors_pieces(tensors), level=1, **kw))
    return raw, packed


def decode(packed: bytes, raw_size: int) -> bytes:
    reader = codec.DecodingReader(io.BytesIO(packed), raw_size, "x.ckptz")
    out = reader.read()
    reader.finish()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8,
                                   torch.bool])
def test_round_trip_is_exact(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    tensors = {"a": (torch.randn(1000, 37) * 3).to(dtype), "b": torch.randn(3).to(dtype), "c": torch.zeros(0).to(dtype),
               "i": torch.arange(77, dtype=torch.int64)}
    raw, packed = encode(tensors)
    assert decode(packed, len(raw)) == raw


def test_frames_over_several_megabytes_and_a_thread_pool_keep_the_order() -> None:
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(1)
    tensors = {f"w{i}": torch.randn(1_500_000).to(torch.bfloat16) for i in range(4)}
    with ThreadPoolExecutor(3) as pool:
        raw, packed = encode(tensors, pool=pool, in_flight=3)
    assert len(raw) > 2 * codec.FRAME_BYTES
    assert decode(packed, len(raw)) == raw
    # bf16 weights: the sign/exponent bytes compress, the mantissa bytes hardly; together well below 0.8
    assert len(packed) < 0.8 * len(raw)
    assert len(zstandard.ZstdCompressor(level=1).compress(raw)) > len(packed)  # grouping beats plain zstd


def test_a_compressed_file_is_not_safetensors() -> None:
    from safetensors.torch import load

    _, packed = encode({"a": torch.ones(4)})
    with pytest.raises(Exception):  # noqa: B017 - whatever safetensors raises: it is not its format
        load(packed)


def frame(raw_len: int, width: int, flags: int, streams: list[bytes]) -> bytes:
    return struct.pack("<IBB", raw_len, width, flags) + b"".join(struct.pack("<I", len(s)) for s in streams) + \
        b"".join(streams)


END = struct.pack("<IBB", 0, 0, 0)
BOMB = zstandard.ZstdCompressor(level=1).compress(bytes(200 << 20))  # 200 MB of zeros in a few kB


@pytest.mark.parametrize(("packed", "raw_size", "message"), [
    (b"NOTCKPTZ" + END, 0, "signature"),
    (codec.MAGIC, 0, "truncated"),
    (codec.MAGIC + frame(8, 1, 0, [zstandard.ZstdCompressor().compress(b"12345678")]), 8, "truncated"),
    (codec.MAGIC + frame(8, 1, 1, [b"12345678"]) + END, 9, "decodes to 8 bytes, not the 9"),
    (codec.MAGIC + frame(8, 1, 1, [b"12345678"]) + END, 4, "past the 4 bytes"),
    (codec.MAGIC + frame(100 << 20, 1, 1, []) + END, 200 << 20, "larger than a frame can be"),
    (codec.MAGIC + frame(8192, 1, 0, [BOMB]) + END, 8192, "zstd frame of 209715200 bytes where 8192 belong"),
    (codec.MAGIC + frame(9, 2, 0, [b"", b""]) + END, 9, "not valid"),
    (codec.MAGIC + frame(8, 9, 0, []) + END, 8, "not valid"),
    (codec.MAGIC + frame(8, 1, 2, [b"12345678"]) + END, 8, "not valid"),
    (codec.MAGIC + frame(8, 1, 1, [b"1234"]) + END, 8, "raw stream of 4 bytes"),
    (codec.MAGIC + frame(8, 1, 0, [b"garbage!"]) + END, 8, "malformed zstd frame"),
    (codec.MAGIC + struct.pack("<IBB", 0, 1, 0), 0, "malformed end marker"),
])
def test_hostile_compressed_files_are_refused(packed: bytes, raw_size: int, message: str) -> None:
    with pytest.raises(CorruptCheckpointError, match=message):
        decode(packed, raw_size)


def test_options_are_checked() -> None:
    assert codec.check_compression(None, None) == (None, 1)
    assert codec.check_compression("zstd", 5) == ("zstd", 5)
    for bad in ("gzip", "ZSTD", True):
        with pytest.raises(InvalidArgumentError, match="compression must be None or 'zstd'"):
            codec.check_compression(bad, None)
    for level in (23, -8, 1.5, True):
        with pytest.raises(InvalidArgumentError, match="compression_level"):
            codec.check_compression("zstd", level)
