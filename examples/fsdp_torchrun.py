"""A sharded (FSDP2) GPT-2 trained under torchrun with CheckpointHook: every rank writes its own shards.

Run:  torchrun --standalone --nproc_per_node=2 examples/fsdp_torchrun.py [--output DIR_OR_URL] [--steps N]

A tiny GPT-2 built from a config (no downloads) is sharded with `fully_shard` on a CPU/Gloo
process group (use "nccl" and GPUs the same way). Checkpoints are saved every 5 steps: each rank
writes its own shards through torch.distributed.checkpoint, rank 0 commits. The final checkpoint
is consolidated into HF-layout weights (`model.safetensors`). Run it again with more --steps to
resume: any world size works (`--nproc_per_node=1` or 3), DCP reshards. At the end rank 0 loads
the final checkpoint into a plain, unsharded GPT-2, as one would for evaluation.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import GPT2Config, GPT2LMHeadModel

from ckpt_callback import CheckpointHook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="checkpoints/fsdp-gpt2")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=128, bos_token_id=0,
                        eos_token_id=0)
    model = GPT2LMHeadModel(config)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    with CheckpointHook(args.output, model, optimizer=optimizer, every_n_steps=5, keep_last=2,
                        monitor="trainLoss") as hook:
        start = hook.resume()  # every rank restores its own shards (resharded if the world size changed)
        for step in range(start + 1, args.steps + 1):
            tokens = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(step * world + rank))
            loss = model(tokens, labels=tokens).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            hook.step(step, loss=loss.item())
            if rank == 0 and step % 5 == 0:
                print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)
    # leaving the block saved the final checkpoint (every rank) and waited for it
    if rank == 0:
        manager = hook.manager
        for info in manager.list(sort_by="step", order="asc"):
            kind = "consolidated" if info.sharding and info.sharding.consolidated else "sharded"
            ranks = info.sharding.world_size if info.sharding else 1
            print(f"{info.name:14s} {info.type:9s} {kind:12s} saved by {ranks} ranks, {len(info.files)} files")
        plain = GPT2LMHeadModel(config)  # unsharded, in this one process
        plain.load_state_dict(manager.load("final"))
        print(f"loaded the final checkpoint into a plain GPT-2 ({sum(p.numel() for p in plain.parameters())} params)")
    dist.destroy_process_group()
    os._exit(0)  # see tests/_rank_report.finish: no interpreter finalization while Gloo threads wind down


if __name__ == "__main__":
    main()
