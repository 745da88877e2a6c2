"""Checkpoints made elsewhere, for the import/export/serve tests: a tiny GPT-2 and tokenizer, a real Trainer run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def tiny_gpt2() -> tuple[Any, Any]:
    """A 2-layer GPT-2 from a config and a byte-level BPE tokenizer trained here (nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(fast), n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config), fast


class Custom:
    """Not loadable with torch.load(weights_only=True)."""


def make_sources(folder: Path) -> dict[str, Path]:
    """Every kind of source `ckpt import` takes, written by the libraries that make them."""
    from safetensors.torch import save_file
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    model, tok = tiny_gpt2()
    out = {"hf": folder / "hf-model", "pt": folder / "state.pt", "safetensors": folder / "weights.safetensors",
           "nanogpt": folder / "ckpt.pt", "evil": folder / "evil.pt", "trainer": folder / "trainer-out"}
    model.save_pretrained(out["hf"])
    tok.save_pretrained(out["hf"])
    torch.save(model.state_dict(), out["pt"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              str(out["safetensors"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()
    torch.save({"model": {"_orig_mod." + k: v for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "model_args": {"n_layer": 2, "n_embd": 32},
                "iter_num": 5000, "best_val_loss": torch.tensor(1.25),
                "config": {"batch_size": 12, "dataset": "shakespeare"}}, out["nanogpt"])
    torch.save({"model": model.state_dict(), "extra": Custom()}, out["evil"])

    class Texts(Dataset):
        def __len__(self) -> int:
            return 16

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = tok("hello world the quick brown fox")["input_ids"][:8]
            return {"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)}

    args = TrainingArguments(str(out["trainer"]), max_steps=6, save_steps=2, eval_strategy="steps", eval_steps=2,
                             logging_steps=1, per_device_train_batch_size=4, report_to=[], use_cpu=True)
    import inspect

    keyword = next(k for k in ("processing_class", "tokenizer") if k in inspect.signature(Trainer).parameters)
    Trainer(model=model, args=args, train_dataset=Texts(), eval_dataset=Texts(), **{keyword: tok}).train()
    return out
