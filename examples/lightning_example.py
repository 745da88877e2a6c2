"""A Lightning Trainer with LightningCheckpoint: stopped mid-epoch, resumed exactly.

Run:  python examples/lightning_example.py [--output DIR_OR_URL]

Needs the `[lightning]` and `[torchdata]` extras. Trains a tiny regression model with dropout on
synthetic data (no downloads) for 3 epochs of 10 steps, validating every 5 steps and saving every 4
steps into ./checkpoints/lightning by default (the 2 newest automatic checkpoints plus the best by
``val_loss``). The first run is stopped at step 14, in the middle of the second epoch; the second
resumes from the latest checkpoint with ``trainer.fit(ckpt_path=cb.resume_from())`` and finishes.
A third run that never stopped shows that the resumed one ends with the very same parameters.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import warnings

import lightning as L
import torch
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler

from ckpt_callback import CheckpointManager
from ckpt_callback.lightning import LightningCheckpoint

warnings.filterwarnings("ignore", ".*does not have many workers.*")


class Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=3e-3)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)}


class StopAt(L.Callback):
    """Stands in for a preemption: the job dies when step ``step`` is about to begin."""

    def __init__(self, step: int | None) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise SystemExit(f"stopped at step {self.step}")


def fit(root: str, stop: int | None = None) -> Regressor:
    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(160, 8, generator=g)
    data = torch.utils.data.TensorDataset(x, x[:, :3].sum(1, keepdim=True))
    # A loader that remembers its position in the epoch, and draws nothing from the global RNG:
    sampler = RandomSampler(data, generator=torch.Generator().manual_seed(2))
    train = StatefulDataLoader(data, batch_size=16, sampler=sampler, generator=torch.Generator().manual_seed(3))
    val = torch.utils.data.DataLoader(data, batch_size=80)

    model = Regressor()
    cb = LightningCheckpoint(root, every_n_steps=4, keep_last=2, monitor="val_loss", mode="min")
    trainer = L.Trainer(max_epochs=3, callbacks=[cb, StopAt(stop)], enable_checkpointing=False, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        deterministic=True, val_check_interval=5, num_sanity_val_steps=0)
    try:
        trainer.fit(model, train, val, ckpt_path=cb.resume_from())
    except SystemExit as exc:
        print(exc)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="checkpoints/lightning")
    args = parser.parse_args()

    fit(args.output, stop=14)
    resumed = fit(args.output)
    manager = CheckpointManager(args.output)
    for info in manager.list(sort_by="step", order="asc"):
        print(f"{info.name:16} {info.type:9} step {info.step:3} epoch {info.epoch:4.1f} "
              f"val_loss {info.metric('val_loss'):.4f}")

    scratch = tempfile.mkdtemp(prefix="ckpt-lightning-straight-")
    try:
        straight = fit(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    same = all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(),
                                                 strict=True))
    print("resumed run == run that never stopped:", same)


if __name__ == "__main__":
    main()
