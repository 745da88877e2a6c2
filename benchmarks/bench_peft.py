#!/usr/bin/env python
"""Bytes on storage for 10 checkpoints of a LoRA run (issue 13, items 1 and 5).

    python benchmarks/bench_peft.py [--layers 2] [--embd 64] [--vocab 1000] [--rank 8] [--saves 10]
                                    [--out BENCHMARKS.md]

Trains a GPT-2 built from a config (random init, never downloads) wrapped in a peft LoRA adapter
(``c_attn``, ``c_proj``) with a real HF ``Trainer``, one checkpoint per step, ``--saves`` steps,
nothing deleted, three times:

* ``ours``        -- ``CheckpointCallback(root, keep_last=None)``: peft's adapter layout plus our
  optimizer and training state;
* ``old layout``  -- the same callback as it was before issue 13: the whole peft model's state
  (base included) under the base's ``config.json``; emulated by handing the manager that state;
* ``hf trainer``  -- the Trainer's own checkpoints (``save_strategy="steps"``, peft's
  ``save_pretrained`` + ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``, ...), for reference;

and reports the bytes under each root (every file, as the disk lists it) next to the adapter file
alone (``adapter_model.safetensors`` once, and times the number of saves). Writes the section
"## PEFT / LoRA checkpoints on storage" of BENCHMARKS.md, keeping every other section.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _measure import write_section  # noqa: E402

HEADING = "## PEFT / LoRA checkpoints on storage"


def tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build(args: argparse.Namespace) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, n_embd=args.embd, n_head=2, n_positions=32, vocab_size=args.vocab)
    model = GPT2LMHeadModel(config)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["c_attn", "c_proj"],
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, vocab: int, count: int) -> None:
        g = torch.Generator().manual_seed(1)
        self.items = [torch.randint(0, vocab, (32,), generator=g) for _ in range(count)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.items[i], "labels": self.items[i]}


def train(args: argparse.Namespace, out: Path, callbacks: list[Any], *, trainer_saves: bool) -> Any:
    from transformers import Trainer, TrainingArguments

    options = dict(output_dir=str(out), max_steps=args.saves, per_device_train_batch_size=2, learning_rate=1e-3,
                   save_strategy="steps" if trainer_saves else "no", save_steps=1, logging_steps=1, use_cpu=True,
                   report_to="none", disable_tqdm=True, seed=0, eval_strategy="no")
    model = build(args)
    trainer = Trainer(model=model, args=TrainingArguments(**options), train_dataset=Tokens(args.vocab, 64),
                      callbacks=callbacks)
    trainer.train()
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--embd", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--saves", type=int, default=10)
    parser.add_argument("--out", default=str(HERE.parent / "BENCHMARKS.md"))
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")

    from ckpt_callback import CheckpointCallback
    from ckpt_callback._pretrained import config_files, hf_state

    class OldLayout(CheckpointCallback):
        """The callback before issue 13: the whole peft model under the base's config.json."""

        def _payload(self, *a: Any, **k: Any) -> dict[str, Any]:
            payload = super()._payload(*a, **k)
            model = payload["state"]
            payload["state"] = hf_state(model)
            payload["files"] = {**config_files(model.get_base_model()), **payload["files"]}
            return payload

    with tempfile.TemporaryDirectory(prefix="bench-peft-") as tmp:
        work = Path(tmp)
        ours_cb = CheckpointCallback(str(work / "ours"), keep_last=None, every_n_steps=1)
        model = train(args, work / "out-ours", [ours_cb], trainer_saves=False)
        old_cb = OldLayout(str(work / "old"), keep_last=None, every_n_steps=1)
        train(args, work / "out-old", [old_cb], trainer_saves=False)
        train(args, work / "hf", [], trainer_saves=True)
        ours, old, hf = tree_bytes(work / "ours"), tree_bytes(work / "old"), tree_bytes(work / "hf")
        first = sorted((work / "ours").glob("checkpoint-*"))[0]
        adapter = (first / "adapter_model.safetensors").stat().st_size
        old_weights = (sorted((work / "old").glob("checkpoint-*"))[0] / "model.safetensors").stat().st_size
        per_file = {p.name: p.stat().st_size for p in sorted(first.iterdir()) if p.is_file()}
        saved = len(list((work / "ours").glob("checkpoint-*")))
        params = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    n = args.saves
    rows = [
        ("adapter alone (`adapter_model.safetensors`), once", adapter),
        ("old layout's weights file (`model.safetensors`: base + adapter), once", old_weights),
        (f"adapter alone x {n}", adapter * n),
        (f"ours: {n} checkpoints (adapter + optimizer + training state)", ours),
        (f"old layout: {n} checkpoints (whole base + optimizer + training state)", old),
        (f"HF Trainer's own: {n} checkpoints (peft adapter + optimizer.pt + rng + ...)", hf),
    ]
    lines = [
        HEADING,
        "",
        f"Generated by `python benchmarks/bench_peft.py --layers {args.layers} --embd {args.embd} --vocab "
        f"{args.vocab} --rank {args.rank} --saves {n}`: GPT-2 from config ({args.layers} layers, n_embd "
        f"{args.embd}, vocab {args.vocab}; {params:,} parameters) with a LoRA adapter (r={args.rank} on c_attn "
        f"and c_proj; {trainable:,} trainable parameters), a real HF Trainer, AdamW, one checkpoint per step, "
        f"nothing deleted ({saved} checkpoints under our root). Bytes are file sizes on a local root, "
        "every file counted.",
        "",
        "| what is stored | bytes | vs the adapter x saves | vs ours |",
        "|---|---|---|---|",
    ]
    for label, size in rows:
        lines.append(f"| {label} | {size:,} | {size / (adapter * n):.2f}x | {size / ours:.2f}x |")
    lines += [
        "",
        f"One checkpoint of ours: {', '.join(f'`{k}` {v:,} B' for k, v in per_file.items())}. The optimizer "
        "holds AdamW's two moments of the trainable parameters only, so it is about twice the adapter; "
        "`training_state.json` and `trainer_state.json` carry the scheduler, RNG states and the Trainer's "
        f"log. The old layout stored the base in every checkpoint: its weights file is {old_weights / adapter:.1f}x "
        f"the adapter file and its checkpoints {old / ours:.1f}x ours here; the ratio grows with the base (by the "
        "same arithmetic a 7B base in bf16 with a 20 MB adapter is ~14 GB per save before, ~20 MB of adapter plus "
        "~80 MB of fp32 AdamW moments now).",
        "",
    ]
    write_section(args.out, HEADING, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
