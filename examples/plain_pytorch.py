"""A plain PyTorch loop with CheckpointHook: automatic, best, manual and final checkpoints, then resume.

Run:  python examples/plain_pytorch.py [--output DIR_OR_URL] [--steps N]

Trains a tiny MLP with dropout, AdamW and a learning-rate schedule on synthetic data (no
downloads), saving every 20 steps into ./checkpoints/plain-pytorch by default, keeping the 2
newest automatic checkpoints plus the best by eval loss, a manual one and the final one.
It then resumes from the latest checkpoint into a fresh model to show that it round-trips.
"""

from __future__ import annotations

import argparse
import logging

import torch
from torch import nn

from ckpt_callback import CheckpointHook, CheckpointManager


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 1))


def batch(generator: torch.Generator, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(size, 16, generator=generator)
    return x, x[:, :4].sum(dim=1, keepdim=True)


def train(output: str, steps: int) -> None:
    torch.manual_seed(0)
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.1, 1 - s / steps))
    data, held_out = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    val_x, val_y = batch(held_out, 256)

    with CheckpointHook(output, model, optimizer=optimizer, scheduler=scheduler, every_n_steps=20,
                        keep_last=2, monitor="evalLoss", mode="min") as hook:
        start = hook.resume()
        print(f"starting at step {start + 1}")
        for step in range(start + 1, steps + 1):
            model.train()
            x, y = batch(data)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            hook.step(step, loss=loss.item(), epoch=step / 50)
            if step % 20 == 0:
                model.eval()
                with torch.no_grad():
                    val = nn.functional.mse_loss(model(val_x), val_y).item()
                hook.evaluate(step, eval_loss=val, metrics={"mae": (model(val_x) - val_y).abs().mean().item()})
                print(f"step {step:4d}  train loss {loss.item():.4f}  eval loss {val:.4f}")
            if step == steps // 2:
                hook.save(name="halfway", description="before the learning rate gets small")
    # leaving the `with` block saves the final checkpoint and waits for it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="checkpoints/plain-pytorch", help="folder or fsspec URL")
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    train(args.output, args.steps)

    manager = CheckpointManager(args.output)
    print(f"\ncheckpoints in {args.output}:")
    for info in manager.list(sort_by="step", order="asc"):
        eval_loss = "-" if info.eval_loss is None else f"{info.eval_loss:.4f}"
        print(f"  {info.name:<16} {info.type:<9} step {info.step:4d}  evalLoss {eval_loss}  {info.size} bytes")
    problems = [r for r in manager.verify() if not r.ok]
    print(f"verified: {problems or 'all good'}")

    restored = make_model()
    info = manager.restore("latest", model=restored, rng=False)
    state = manager.load("best")
    print(f"restored {info.name} (step {info.step}); best is {manager.best().name} with {len(state)} tensors")


if __name__ == "__main__":
    main()
