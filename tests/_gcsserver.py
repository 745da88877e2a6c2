"""A throw-away Google Cloud Storage emulator (`gcp-storage-emulator`, PyPI) for tests.

Usage::

    with GcsEmulator(buckets=["ckpt"]) as gcs:
        fs, path = fsspec.url_to_fs("gs://ckpt/run", **gcs.storage_options)

It stores objects on disk in a temporary folder (so ``kill()``/``restart()`` keep them) and listens
on a free 127.0.0.1 port. gcsfs reaches it through ``endpoint_url`` (storage_options) or the
``STORAGE_EMULATOR_HOST`` variable, with anonymous credentials.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from _emulator import HOST, LoopbackServer, http_status

__all__ = ["GcsEmulator", "find_gcs_emulator"]


def find_gcs_emulator() -> str | None:
    """The ``gcp-storage-emulator`` script (next to this interpreter, or on PATH), or None."""
    here = Path(sys.executable).parent / "gcp-storage-emulator"
    if here.is_file():
        return str(here)
    return shutil.which("gcp-storage-emulator")


class GcsEmulator(LoopbackServer):
    name = "gcs-emulator"

    def __init__(self, buckets: tuple[str, ...] | list[str] = ()) -> None:
        super().__init__()
        self.buckets = list(buckets)
        self.executable = find_gcs_emulator()

    def command(self) -> list[str]:
        if self.executable is None:
            raise FileNotFoundError("gcp-storage-emulator not found (pip install gcp-storage-emulator)")
        return [self.executable, "-d", str(self.data_dir), "start", "--host", HOST, "--port", str(self.port), "-q"]

    def ready(self) -> bool:
        assert self.port is not None
        return http_status(self.port, "GET", "/", timeout=2) == 200

    def start(self) -> GcsEmulator:
        super().start()
        for bucket in self.buckets:
            self.make_bucket(bucket)
        return self

    def make_bucket(self, name: str) -> None:
        import json

        assert self.port is not None
        body = json.dumps({"name": name}).encode()
        status = http_status(self.port, "POST", "/storage/v1/b?project=test", {"Content-Type": "application/json"},
                             body)
        if status not in (200, 409):
            raise RuntimeError(f"creating GCS bucket {name!r} failed: HTTP {status}")

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def storage_options(self) -> dict[str, object]:
        """gcsfs options for this server (anonymous; no instance cache: it goes stale across restarts)."""
        return {"endpoint_url": self.endpoint_url, "token": "anon", "project": "test", "skip_instance_cache": True}
