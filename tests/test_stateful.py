"""`stateful=`: objects with state_dict()/load_state_dict() saved with the training state, restored by resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ckpt_callback import (
    CheckpointHook,
    CheckpointManager,
    CorruptCheckpointError,
    InvalidArgumentError,
    ResumableSampler,
)

StatefulDataLoader = pytest.importorskip("torchdata.stateful_dataloader").StatefulDataLoader
RandomSampler = pytest.importorskip("torchdata.stateful_dataloader.sampler").RandomSampler

DATA = torch.utils.data.TensorDataset(torch.randn(40, 6, generator=torch.Generator().manual_seed(1)),
                                      torch.randn(40, 1, generator=torch.Generator().manual_seed(2)))
STEPS_PER_EPOCH = 10  # 40 samples, batch 4


def _shuffled_loader(seed: int) -> StatefulDataLoader:
    """The README's recipe: a shuffling sampler with a generator of its own (saved in the loader's state), and a
    loader generator, so creating the resumed iterator draws nothing from the global RNG (dropout's)."""
    sampler = RandomSampler(DATA, generator=torch.Generator().manual_seed(seed))
    return StatefulDataLoader(DATA, batch_size=4, sampler=sampler, generator=torch.Generator().manual_seed(seed))


def _train(root: str, *, seed: int, total: int, stop: int | None = None, stateful: bool = True,
           plain: bool = False, resumable: bool = False) -> nn.Module:
    """Train to ``total`` optimizer steps with a shuffled loader (resuming from ``root`` if it holds a
    checkpoint); with ``stop``, save there and leave as a killed job would (no final checkpoint)."""
    torch.manual_seed(seed)  # a resumed run starts from other weights, loader order and RNG: all must be restored
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.2), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = torch.utils.data.DataLoader(DATA, batch_size=4, shuffle=True) if plain else _shuffled_loader(seed)
    if resumable:  # a plain DataLoader over our sampler: the sampler is the stateful part
        sampler = ResumableSampler(DATA, seed=5)
        loader = torch.utils.data.DataLoader(DATA, batch_size=4, sampler=sampler,
                                             generator=torch.Generator().manual_seed(seed))
    hook = CheckpointHook(root, model, optimizer=opt, every_n_steps=stop or total,
                          stateful=({"sampler": loader.sampler} if resumable else {"loader": loader}) if stateful
                          else None, save_on_signals=())
    step = hook.resume()
    while step < total:
        for x, y in loader:
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            step += 1
            hook.step(step, loss=loss.item(), epoch=step / STEPS_PER_EPOCH)
            if step in (stop, total):
                break
        if step == stop:
            hook.manager.close()
            return model
    hook.end()
    return model


@pytest.mark.parametrize("stop", [13, 20], ids=["mid-epoch", "epoch-boundary"])
def test_shuffled_stateful_dataloader_resumes_bit_exactly(tmp_path: Path, stop: int):
    straight = _train(str(tmp_path / "a"), seed=0, total=27)
    _train(str(tmp_path / "b"), seed=0, total=27, stop=stop)
    resumed = _train(str(tmp_path / "b"), seed=123, total=27)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("stop", [13, 20, 3])
def test_a_plain_dataloader_with_resumable_sampler_resumes_bit_exactly(tmp_path: Path, stop: int):
    straight = _train(str(tmp_path / "a"), seed=0, total=27, resumable=True)
    _train(str(tmp_path / "b"), seed=0, total=27, stop=stop, resumable=True)
    resumed = _train(str(tmp_path / "b"), seed=123, total=27, resumable=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_resumable_sampler_refuses_the_state_of_another_dataset():
    state = ResumableSampler(range(10), seed=1).state_dict()
    with pytest.raises(CorruptCheckpointError, match="resume with the same dataset"):
        ResumableSampler(range(12), seed=1).load_state_dict(state)
    with pytest.raises(CorruptCheckpointError, match="not a ResumableSampler state"):
        ResumableSampler(range(10)).load_state_dict({"epoch": 1})


def test_a_plain_shuffled_dataloader_resumes_exactly_at_an_epoch_boundary(tmp_path: Path):
    """No loader state: the next epoch's shuffle comes from the restored RNG."""
    straight = _train(str(tmp_path / "a"), seed=0, total=27, stateful=False, plain=True)
    _train(str(tmp_path / "b"), seed=0, total=27, stop=20, stateful=False, plain=True)
    resumed = _train(str(tmp_path / "b"), seed=123, total=27, stateful=False, plain=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_without_the_loader_state_a_mid_epoch_resume_differs(tmp_path: Path):
    """The guard of the test above: the loader's position is what makes the difference."""
    straight = _train(str(tmp_path / "a"), seed=0, total=27)
    _train(str(tmp_path / "b"), seed=0, total=27, stop=13, stateful=False)
    resumed = _train(str(tmp_path / "b"), seed=123, total=27, stateful=False)
    pairs = zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True)
    assert not all(torch.equal(a, b) for a, b in pairs)


class _Ema:
    """A stateful object that is not a loader: a running mean with a tensor and a count."""

    def __init__(self) -> None:
        self.value, self.count = torch.zeros(3), 0

    def state_dict(self) -> dict:
        return {"value": self.value.clone(), "count": self.count, "decay": (0.9, "per-step")}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.count = state["value"], state["count"]
        assert state["decay"] == (0.9, "per-step")  # a tuple comes back a tuple


def test_stateful_round_trip_on_every_backend(root: str, tiny_net: nn.Module):
    ema = _Ema()
    ema.value, ema.count = torch.tensor([1.0, 2.0, 3.0]), 7
    manager = CheckpointManager(root)
    manager.save(tiny_net, step=3, stateful={"ema": ema})
    fresh = _Ema()
    manager.restore("latest", stateful={"ema": fresh})
    assert torch.equal(fresh.value, torch.tensor([1.0, 2.0, 3.0])) and fresh.count == 7
    assert manager.load_training_state()["stateful"]["ema"]["count"] == 7


def test_a_stateful_object_missing_from_the_checkpoint_starts_afresh_with_a_warning(tmp_path, tiny_net, caplog):
    manager = CheckpointManager(str(tmp_path / "r"))
    manager.save(tiny_net, step=1, stateful={"ema": _Ema()})
    other = _Ema()
    manager.restore("latest", stateful={"other": other})
    assert other.count == 0 and "no state for stateful['other']" in caplog.text


def test_what_cannot_be_stored_without_pickle_is_refused_by_name(tmp_path, tiny_net):
    class Bad:
        def state_dict(self) -> dict:
            return {"fn": lambda: 0}

        def load_state_dict(self, state: dict) -> None: ...

    manager = CheckpointManager(str(tmp_path / "r"))
    with pytest.raises(InvalidArgumentError, match=r"function.*stateful\['bad'\]"):
        manager.save(tiny_net, step=1, stateful={"bad": Bad()})
    assert manager.latest() is None
    with pytest.raises(InvalidArgumentError, match=r"stateful\['x'\] is a int.*state_dict"):
        CheckpointHook(str(tmp_path / "r"), tiny_net, stateful={"x": 3}, save_on_signals=())


def test_on_commit_callables_get_each_commit_and_a_failing_one_is_only_logged(root, tiny_net, caplog):
    seen: list[tuple[str, str]] = []

    def broken(info):
        raise RuntimeError("tracker down")

    manager = CheckpointManager(root, on_commit=[broken, lambda info: seen.append((info.name, info.type))],
                                monitor="evalLoss", async_save=True)
    manager.save(tiny_net, step=1, eval_loss=0.5)
    manager.save(tiny_net, step=2, eval_loss=0.7, type="final")
    manager.close()
    assert seen == [("checkpoint-1", "best"), ("checkpoint-2", "final")]
    assert caplog.text.count("tracker down") == 2
    with pytest.raises(InvalidArgumentError, match="on_commit"):
        CheckpointManager(root, on_commit=[3])
