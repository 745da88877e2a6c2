"""Checkpoints asked for from outside the running job, with the root itself as the channel.

A requester (``ckpt request``, `CheckpointManager.request`) writes one small JSON file under
``ROOT/.ckpt-requests/``; the running job's writer (rank 0) lists that folder now and then, takes
one request (it writes an ``accepted`` outcome, then removes the request: each is taken once),
saves the checkpoint and writes the outcome (``saved`` with the checkpoint's sidecar, or
``failed`` with the error). Everything goes through `Storage`, so the channel works wherever the
checkpoints go, across machines on S3 as on a local folder. The folder is hidden: the catalog
never lists it and cleanup never touches it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ._errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    InvalidArgumentError,
    InvalidNameError,
    RequestTimeoutError,
    SaveError,
    SidecarError,
)
from ._layout import REQUEST_SUFFIX, REQUESTS_DIR, outcome_file, request_file
from ._sidecar import CheckpointInfo, now_iso, validate_name
from ._storage import Storage

__all__ = ["CheckpointRequest", "RequestChannel"]

logger = logging.getLogger("ckpt_callback")

_MAX_REQUEST_BYTES = 64 << 10
_ERRORS: dict[str, type[CheckpointError]] = {
    "CheckpointExistsError": CheckpointExistsError,
    "InvalidNameError": InvalidNameError,
    "InvalidArgumentError": InvalidArgumentError,
}


@dataclass(frozen=True)
class CheckpointRequest:
    """A checkpoint asked of the job writing a root: a manual one, or (``stop``) a final one and a stop.

    Returned by `CheckpointManager.request`; `wait` blocks until the job has saved it.

    Example:
        >>> from ckpt_callback import CheckpointManager
        >>> request = CheckpointManager("memory://doc-request").request(name="before-eval")
        >>> request.name, request.stop
        ('before-eval', False)
    """

    id: str
    name: str | None = None
    description: str | None = None
    stop: bool = False
    created_at: str = ""
    node: str = ""
    channel: RequestChannel | None = field(default=None, compare=False, repr=False)  # to wait on; not in the JSON

    def to_json(self) -> dict[str, Any]:
        return {"object": "checkpoint.request", "id": self.id, "name": self.name, "description": self.description,
                "stop": self.stop, "createdAt": self.created_at, "node": self.node}

    @classmethod
    def from_json(cls, data: Any) -> CheckpointRequest:
        """Parse a request file's JSON; `ValueError` when it is not one."""
        if not isinstance(data, dict) or data.get("object") != "checkpoint.request":
            raise ValueError("not a checkpoint request")
        rid, name, description, stop = data.get("id"), data.get("name"), data.get("description"), data.get("stop")
        if not isinstance(rid, str) or not rid or not isinstance(stop, bool):
            raise ValueError("a request needs a string 'id' and a boolean 'stop'")
        if any(v is not None and not isinstance(v, str) for v in (name, description)):
            raise ValueError("'name' and 'description' must be strings or null")
        return cls(id=rid, name=name, description=description, stop=stop,
                   created_at=str(data.get("createdAt") or ""), node=str(data.get("node") or ""))

    def __getstate__(self) -> dict[str, Any]:  # broadcast to other ranks: without the channel
        return {**self.__dict__, "channel": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def wait(self, timeout: float | None = None, *, poll: float = 0.5) -> CheckpointInfo:
        """Block until the job saved this checkpoint; return its sidecar.

        Args:
            timeout: seconds to wait (None: for ever). When it runs out a request no job has taken
                yet is withdrawn, so it does not surprise a job started later.
            poll: seconds between two looks at the outcome.

        Raises:
            RequestTimeoutError: no outcome in time.
            CheckpointExistsError, InvalidNameError: the name was taken or refused by the job.
            SaveError: the job could not save it.
        """
        if self.channel is None:
            raise InvalidArgumentError("this request was not made through a CheckpointManager; it cannot be waited for")
        return self.channel.wait(self, timeout=timeout, poll=poll)


class RequestChannel:
    """Both ends of the request folder of one root: `submit`/`wait` (requester), `take`/`answer` (job)."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    # --- requester side ---------------------------------------------------------------------------

    def submit(self, *, name: str | None, description: str | None, stop: bool) -> CheckpointRequest:
        if name is not None:
            validate_name(name)
        if description is not None and not isinstance(description, str):
            raise InvalidArgumentError(f"description must be a string, got {description!r}")
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        request = CheckpointRequest(id=f"req-{stamp}-{uuid.uuid4().hex[:8]}", name=name, description=description,
                                    stop=bool(stop), created_at=now_iso(), node=socket.gethostname(), channel=self)
        self.storage.write_bytes_atomic(request_file(request.id), _dumps(request.to_json()))
        logger.info("requested a %s checkpoint from the job writing %s (%s)",
                    "final" if stop else "manual", self.storage.display(), request.id)
        return request

    def outcome(self, request_id: str) -> dict[str, Any] | None:
        """What the job recorded for ``request_id`` (status accepted, saved or failed), or None yet."""
        try:
            raw = self.storage.read_bytes(outcome_file(request_id), limit=_MAX_REQUEST_BYTES)
        except CheckpointNotFoundError:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            return None  # being rewritten by a non-atomic store: look again
        return data if isinstance(data, dict) else None

    def wait(self, request: CheckpointRequest, *, timeout: float | None, poll: float) -> CheckpointInfo:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            outcome = self.outcome(request.id)
            status = outcome.get("status") if outcome else None
            if outcome is not None and status in ("saved", "failed"):
                with contextlib.suppress(CheckpointError):
                    self.storage.remove(outcome_file(request.id))  # read once; nothing is left behind
                return _result(outcome, self.storage.display())
            if deadline is not None and time.monotonic() >= deadline:
                break
            time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))
        self.storage.remove(request_file(request.id))  # withdraw it if no job took it
        outcome = self.outcome(request.id)
        if outcome is not None and outcome.get("status") in ("saved", "failed"):
            with contextlib.suppress(CheckpointError):
                self.storage.remove(outcome_file(request.id))
            return _result(outcome, self.storage.display())
        if outcome is not None:
            raise RequestTimeoutError(
                f"the job writing {self.storage.display()} took request {request.id} at step {outcome.get('step')} "
                f"but did not save it within {timeout:g}s; it still may (see `ckpt list`)")
        raise RequestTimeoutError(
            f"no job writing {self.storage.display()} took request {request.id} within {timeout:g}s; it was "
            "withdrawn (is a job running with a CheckpointHook or CheckpointCallback on this root?)")

    # --- job side ---------------------------------------------------------------------------------

    def take(self) -> CheckpointRequest | None:
        """The oldest request not taken yet, now taken (one listing; reads only when one is there)."""
        names = sorted(n for n, kind in self.storage.list_dir(REQUESTS_DIR)
                       if kind == "file" and n.endswith(REQUEST_SUFFIX))
        for filename in names:
            request_id = filename[: -len(REQUEST_SUFFIX)]
            try:
                raw = self.storage.read_bytes(request_file(request_id), limit=_MAX_REQUEST_BYTES)
            except CheckpointNotFoundError:
                continue  # withdrawn meanwhile
            try:
                if len(raw) > _MAX_REQUEST_BYTES:
                    raise ValueError("too large")
                request = CheckpointRequest.from_json(json.loads(raw))
                if request.id != request_id:
                    raise ValueError(f"its id is {request.id!r}")
            except ValueError as exc:
                logger.warning("ignoring malformed checkpoint request %s: %s",
                               self.storage.display(request_file(request_id)), exc)
                self._answer(request_id, "failed", error=f"malformed request: {exc}", kind="InvalidArgumentError")
                self.storage.remove(request_file(request_id))
                continue
            self._answer(request_id, "accepted")
            self.storage.remove(request_file(request_id))
            return request
        return None

    def accepted(self, request: CheckpointRequest, step: int) -> None:
        """Record the step the job will save ``request`` at (all ranks agreed on it)."""
        self._answer(request.id, "accepted", step=step)

    def answer(self, request: CheckpointRequest, *, info: CheckpointInfo | None = None,
               error: BaseException | None = None, step: int | None = None) -> None:
        """Record the outcome of ``request``: the saved checkpoint's sidecar, or the error."""
        if error is not None:
            self._answer(request.id, "failed", step=step, error=str(error), kind=type(error).__name__)
        else:
            self._answer(request.id, "saved", step=info.step if info else step,
                         checkpoint=info.to_json() if info else None)

    def _answer(self, request_id: str, status: str, *, step: int | None = None, error: str | None = None,
                kind: str | None = None, checkpoint: dict[str, Any] | None = None) -> None:
        outcome = {"id": request_id, "status": status, "step": step, "checkpoint": checkpoint, "error": error,
                   "errorType": kind, "updatedAt": now_iso()}
        self.storage.write_bytes_atomic(outcome_file(request_id), _dumps(outcome))


def _dumps(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def _result(outcome: dict[str, Any], where: str) -> CheckpointInfo:
    """The saved checkpoint of a final outcome, or its error raised as the job's error class."""
    if outcome.get("status") == "saved":
        try:
            return CheckpointInfo.from_json(outcome.get("checkpoint"), where=f"the outcome of a request in {where}")
        except SidecarError as exc:
            raise SaveError(f"the job saved the checkpoint but its outcome is unreadable: {exc}") from exc
    error = _ERRORS.get(str(outcome.get("errorType")), SaveError)
    raise error(f"the job writing {where} could not save the requested checkpoint: {outcome.get('error')}")
