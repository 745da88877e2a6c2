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


def test_every_public_name_is_in_all():
    # The other direction of test_all_is_honest: nothing public is left out of __all__.
    import inspect

    public = {name for name, value in vars(ckpt_callback).items()
              if not name.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value))
              and getattr(value, "__module__", "").startswith("ckpt_callback")}
    assert public - {"CheckpointCallback"} <= set(ckpt_callback.__all__), public - set(ckpt_callback.__all__)
    for module in ("_errors", "_manager", "_hook"):
        mod = __import__(f"ckpt_callback.{module}", fromlist=["__all__"])
        exported = {n for n in mod.__all__ if n[0].isupper() and not n.isupper()}
        missing = {n for n in exported if not hasattr(ckpt_callback, n)}
        assert not missing, (module, missing)
