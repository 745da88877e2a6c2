"""A throw-away Azurite (Azure Blob emulator, npm package ``azurite``) for tests.

Usage::

    with Azurite(containers=["ckpt"]) as az:
        fs, path = fsspec.url_to_fs("az://ckpt/run", **az.storage_options)

Azurite's blob service runs with ``--disableTelemetry`` (by default it reports to an outside
service), ``--loose --skipApiVersionCheck`` (newer SDK API versions), bound to 127.0.0.1 on a free
port, data in a temporary folder. Accounts: Azurite's well-known development account.

``azurite-blob`` is looked up in: ``$AZURITE_BIN`` (the executable), ``$AZURITE_PREFIX`` (an
``npm install --prefix`` folder: ``<prefix>/node_modules/.bin``), ``./node_modules/.bin`` of the
project, then PATH. `find_azurite` returns None when none has it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from _emulator import HOST, LoopbackServer, http_status

__all__ = ["ACCOUNT_KEY", "ACCOUNT_NAME", "Azurite", "find_azurite"]

ACCOUNT_NAME = "devstoreaccount1"  # Azurite's documented development account and key
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
_PROJECT = Path(__file__).resolve().parent.parent


def find_azurite() -> str | None:
    """The ``azurite-blob`` executable, or None (see the module docstring for where it is looked up)."""
    if os.environ.get("AZURITE_BIN"):
        return os.environ["AZURITE_BIN"] if os.access(os.environ["AZURITE_BIN"], os.X_OK) else None
    folders = [Path(os.environ["AZURITE_PREFIX"])] if os.environ.get("AZURITE_PREFIX") else []
    for folder in [*folders, _PROJECT]:
        candidate = folder / "node_modules" / ".bin" / "azurite-blob"
        if candidate.exists() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("azurite-blob")


class Azurite(LoopbackServer):
    name = "azurite"

    def __init__(self, containers: tuple[str, ...] | list[str] = ()) -> None:
        super().__init__()
        self.containers = list(containers)
        self.executable = find_azurite()

    def command(self) -> list[str]:
        if self.executable is None:
            raise FileNotFoundError("azurite-blob not found (npm install azurite; see README, Development)")
        return [self.executable, "--blobHost", HOST, "--blobPort", str(self.port), "--location", str(self.data_dir),
                "--disableTelemetry", "--loose", "--skipApiVersionCheck", "--silent"]

    def ready(self) -> bool:
        assert self.port is not None
        # any HTTP answer (403: unsigned request) means the blob service is listening
        return http_status(self.port, "GET", f"/{ACCOUNT_NAME}?comp=list", timeout=2) in (200, 403)

    def start(self) -> Azurite:
        super().start()
        if self.containers:
            from azure.core.exceptions import ResourceExistsError
            from azure.storage.blob import BlobServiceClient

            client = BlobServiceClient.from_connection_string(self.connection_string)
            for name in self.containers:
                with contextlib.suppress(ResourceExistsError):
                    client.create_container(name)
        return self

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}/{ACCOUNT_NAME}"

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT_NAME};AccountKey={ACCOUNT_KEY};"
                f"BlobEndpoint={self.endpoint_url};")

    @property
    def storage_options(self) -> dict[str, object]:
        """adlfs options for this server (no instance cache: it goes stale across restarts)."""
        return {"connection_string": self.connection_string, "skip_instance_cache": True}
