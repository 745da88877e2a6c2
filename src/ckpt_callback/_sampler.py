"""`ResumableSampler`: a shuffling sampler for a plain ``DataLoader`` that a checkpoint can resume mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sized
from typing import Any

import torch

from ._errors import CorruptCheckpointError, InvalidArgumentError

__all__ = ["ResumableSampler"]


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Shuffles like ``RandomSampler`` and remembers where it is, for ``stateful=``.

    Each epoch's order comes from ``seed`` and the epoch number alone (no global RNG draw), and
    `state_dict` holds the epoch and how many indices were handed out, so a resumed loader goes
    on with the rest of the interrupted epoch. Exact with ``num_workers=0`` (workers fetch ahead);
    give the ``DataLoader`` a ``generator=`` too, so making its iterator draws nothing from the
    global RNG that dropout uses.

    Args:
        data_source: the dataset (or its length).
        seed: the base seed of every epoch's order.
        shuffle: False hands out 0, 1, 2, ... (still resumable).

    Example:
        >>> sampler = ResumableSampler(range(6), seed=0)
        >>> it = iter(sampler); first = [next(it), next(it)]
        >>> state = sampler.state_dict()
        >>> again = ResumableSampler(range(6), seed=0); again.load_state_dict(state)
        >>> first + list(again) == list(ResumableSampler(range(6), seed=0))
        True
    """

    def __init__(self, data_source: Sized | int, *, seed: int = 0, shuffle: bool = True) -> None:
        self.size = data_source if isinstance(data_source, int) else len(data_source)
        if self.size < 0 or not isinstance(seed, int):
            raise InvalidArgumentError(f"ResumableSampler needs a dataset length >= 0 and an int seed, got "
                                       f"{self.size!r}, {seed!r}")
        self.seed, self.shuffle = seed, bool(shuffle)
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        for index in order[self.position:].tolist():
            self.position += 1
            yield index
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": self.size,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Raises `CorruptCheckpointError` if the state is of another dataset size, seed or shape."""
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
            same = (state["size"], state["seed"], state["shuffle"]) == (self.size, self.seed, self.shuffle)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(f"not a ResumableSampler state: {exc}") from exc
        if not same or not 0 <= position <= self.size or epoch < 0:
            raise CorruptCheckpointError(
                f"the saved sampler state (size {state.get('size')}, seed {state.get('seed')}, position {position}) "
                f"does not fit this sampler (size {self.size}, seed {self.seed}): resume with the same dataset")
        self.epoch, self.position = epoch, position
