"""The public surface: what `from ckpt_callback import ...` gives, and what importing costs."""

from __future__ import annotations

import ckpt_callback
from conftest import run_python

SPEC_NAMES = {"CheckpointManager", "CheckpointHook", "CheckpointCallback", "CheckpointInfo", "CheckpointError"}


def test_all_is_honest():
    for name in ckpt_callback.__all__:
        assert getattr(ckpt_callback, name) is not None, name
    assert len(set(ckpt_callback.__all__)) == len(ckpt_callback.__all__)
    assert sorted(ckpt_callback.__all__) == ckpt_callback.__all__


def test_spec_names_are_importable():
    for name in SPEC_NAMES:
        assert hasattr(ckpt_callback, name), name
    from transformers import TrainerCallback

    from ckpt_callback import CheckpointCallback

    assert issubclass(CheckpointCallback, TrainerCallback)


def test_every_error_is_a_checkpoint_error_and_a_builtin():
    errors = [getattr(ckpt_callback, n) for n in ckpt_callback.__all__ if n.endswith("Error")]
    assert len(errors) >= 8
    for error in errors:
        assert issubclass(error, ckpt_callback.CheckpointError)
    assert issubclass(ckpt_callback.CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(ckpt_callback.CorruptCheckpointError, ValueError)
    assert issubclass(ckpt_callback.StorageError, OSError)


def test_import_does_not_import_transformers():
    out = run_python("import sys, ckpt_callback\nfrom ckpt_callback import *\nprint('transformers' in sys.modules)")
    assert out.stdout.strip() == "False"
