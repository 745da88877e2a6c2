"""One Lightning run for test_lightning: train to ``total`` steps, crash after the save at ``stop``."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import warnings

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning")  # collected for doctests too: skip, not fail, without the extra

from ckpt_callback.lightning import LightningCheckpoint  # noqa: E402

warnings.filterwarnings("ignore")
STEPS_PER_EPOCH = 10


class Crash(RuntimeError):
    pass


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.2), nn.Linear(16, 1))
        self.seen = 0  # the module's own state, through on_save_checkpoint

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen += len(x)
        loss = (self.net(x) - y).pow(2).mean()
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", (self.net(x) - y).pow(2).mean())

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        checkpoint["seen"] = {"count": self.seen, "marker": torch.tensor([self.seen])}

    def on_load_checkpoint(self, checkpoint):
        self.seen = checkpoint["seen"]["count"]


class SigtermAt(L.Callback):
    """A real SIGTERM to the main process (rank 0, as a scheduler sends it; under DDP Lightning's launcher passes
    it on to the other ranks) when the batch after ``step`` starts: Lightning stops after that batch."""

    def __init__(self, step: int | None) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and trainer.global_rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)


class CrashAt(L.Callback):
    def __init__(self, step: int | None) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Crash(f"killed at step {self.step}")


def data(seed: int, stateful: bool | str):
    g = torch.Generator().manual_seed(1)
    ds = torch.utils.data.TensorDataset(torch.randn(40, 6, generator=g), torch.randn(40, 1, generator=g))
    if not stateful:  # a plain shuffled DataLoader: exact at epoch boundaries
        return torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True), torch.utils.data.DataLoader(ds, 8)
    from torchdata.stateful_dataloader import StatefulDataLoader
    from torchdata.stateful_dataloader.sampler import RandomSampler

    if stateful == "torch-sampler":  # under DDP Lightning puts a DistributedSampler(shuffle=True) in
        return StatefulDataLoader(ds, batch_size=4, sampler=torch.utils.data.RandomSampler(ds)), \
            torch.utils.data.DataLoader(ds, 8)
    if stateful == "shuffle":  # under DDP Lightning puts a DistributedSampler in (shuffled by seed and epoch)
        return StatefulDataLoader(ds, batch_size=4, shuffle=True), torch.utils.data.DataLoader(ds, 8)
    sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(seed))
    train = StatefulDataLoader(ds, batch_size=4, sampler=sampler, generator=torch.Generator().manual_seed(seed))
    return train, torch.utils.data.DataLoader(ds, 8)


def run(root: str, *, seed: int, total: int, stop: int | None, stateful: bool | str, devices: int = 1,
        strategy: str = "auto", schedule: dict | None = None, sigterm_at: int | None = None, **options) -> Net:
    """``options``: more `LightningCheckpoint` options (async_save, storage_options, ...)."""
    L.seed_everything(seed, verbose=False)
    model = Net()
    cb = LightningCheckpoint(root, **(schedule or {"every_n_steps": stop or total}), monitor="val_loss", keep_last=2,
                             **options)
    trainer = L.Trainer(max_steps=total, callbacks=[cb, CrashAt(stop), SigtermAt(sigterm_at)],
                        enable_checkpointing=False, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=devices,
                        strategy=strategy, deterministic=True, val_check_interval=5, limit_val_batches=2,
                        num_sanity_val_steps=0)
    train, val = data(seed, stateful)
    with contextlib.suppress(Crash):
        trainer.fit(model, train, val, ckpt_path=cb.resume_from())
    return model


if __name__ == "__main__":  # the DDP test: python _lightning_run.py ROOT SEED TOTAL STOP OUT STATEFUL [SIGTERM_AT]
    root, seed, total, stop, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    loader = {"0": False, "1": True}.get(sys.argv[6], sys.argv[6])
    sigterm_at = int(sys.argv[7]) if len(sys.argv) > 7 else None
    model = run(root, seed=seed, total=total, stop=stop or None, stateful=loader, devices=2, strategy="ddp",
                sigterm_at=sigterm_at)
    if model.trainer.is_global_zero:
        torch.save({"state": model.state_dict(), "seen": model.seen}, out)
