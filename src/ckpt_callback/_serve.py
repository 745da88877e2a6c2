"""``ckpt serve``: one checkpoint behind an OpenAI-compatible HTTP API, through an existing server.

We do not write a server: the checkpoint is exported (`export_checkpoint`) to a temporary HF
folder named after it, and ``transformers serve`` (or ``vllm serve`` when vLLM is installed and
a GPU is present) serves that folder. The model id in requests is the checkpoint's name.
The server runs in a child process; SIGINT/SIGTERM reach it, and the folder is removed when it
exits. Needs the ``[serve]`` extra (transformers, fastapi, uvicorn).
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._errors import CheckpointError, InvalidArgumentError
from ._views import deployable

__all__ = ["BACKENDS", "Served", "choose_backend", "serve", "server_command"]

BACKENDS = ("auto", "transformers", "vllm")
SERVE_MISSING = ("ckpt serve needs transformers with its server (fastapi, uvicorn); install them with: "
                 "pip install 'ckpt-callback[serve]'")


@dataclass(frozen=True)
class Served:
    """What `serve` started: the checkpoint, the model id to use in requests, the base URL, the command."""

    name: str
    model: str
    base_url: str
    backend: str
    command: list[str]
    folder: str  # the exported HF folder being served (removed when the server exits)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "baseUrl": self.base_url, "backend": self.backend,
                "command": self.command, "folder": self.folder}


def choose_backend(backend: str = "auto") -> str:
    """``vllm`` when asked, or (auto) when vLLM is installed and a GPU is present; else ``transformers``."""
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    if importlib.util.find_spec("vllm") is not None:
        import torch

        if torch.cuda.is_available():
            return "vllm"
    return "transformers"


def server_command(folder: str, *, backend: str, host: str, port: int, model: str) -> list[str]:
    """The command line that serves ``folder`` (run with the folder's parent as working directory)."""
    if backend == "vllm":
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder,
                "--served-model-name", model, "--host", host, "--port", str(port)]
    # `transformers serve FOLDER`: the model id is the path given, so a relative one is the checkpoint's name.
    return [sys.executable, "-c", "import sys; from transformers.cli.transformers import main; sys.exit(main())",
            "serve", folder, "--host", host, "--port", str(port), "--device", "auto"]


@contextlib.contextmanager
def _exported(root: str, name: str, storage_options: dict[str, Any] | None, dtype: str | None
              ) -> Iterator[tuple[Path, str]]:
    from ._export import export_checkpoint
    from ._manager import CheckpointManager

    info = CheckpointManager(root, storage_options=storage_options, writer=False).get(name)
    if not deployable(info):
        raise InvalidArgumentError(
            f"checkpoint {info.name!r} cannot be served: it is not an inference-ready HF model folder (config.json, "
            "weights and tokenizer files); save it with CheckpointCallback and a tokenizer, or import an HF folder")
    work = Path(tempfile.mkdtemp(prefix="ckpt-serve-"))
    try:
        export_checkpoint(root, info.name, work / info.name, dtype=dtype, storage_options=storage_options)
        yield work, info.name
    finally:
        shutil.rmtree(work, ignore_errors=True)


def serve(
    root: str,
    name: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    backend: str = "auto",
    dtype: str | None = None,
    storage_options: dict[str, Any] | None = None,
    on_start: Callable[[Served], None] | None = None,
) -> int:
    """Serve checkpoint ``name`` until the server exits (Ctrl-C, SIGTERM); return its exit status.

    ``on_start`` is called with the `Served` details once the server process runs.

    Example:
        >>> # serve("runs/gpt2-ft", "best", port=8000)   # then: OpenAI(base_url="http://127.0.0.1:8000/v1")
    """
    chosen = choose_backend(backend)
    if chosen == "transformers" and not all(importlib.util.find_spec(m) for m in ("transformers", "fastapi",
                                                                                   "uvicorn")):
        raise CheckpointError(SERVE_MISSING)
    with _exported(root, name, storage_options, dtype) as (work, model):
        command = server_command(model, backend=chosen, host=host, port=port, model=model)
        # The server's log goes to stderr: stdout carries only what ckpt prints (--json stays parseable).
        # Its own session: a terminal's Ctrl-C reaches it once, through us, not twice (uvicorn's second
        # Ctrl-C skips the graceful shutdown).
        process = subprocess.Popen(command, cwd=work, stdout=sys.stderr.fileno() if _has_fd(sys.stderr) else None,
                                   start_new_session=True)
        served = Served(name=model, model=model, base_url=f"http://{_url_host(host)}:{port}/v1", backend=chosen,
                        command=command, folder=str(work / model))
        previous = {sig: signal.signal(sig, lambda s, _f: process.send_signal(s))
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            if on_start is not None:
                on_start(served)
            return process.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _has_fd(stream: Any) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a test harness
        return False
    return True


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
