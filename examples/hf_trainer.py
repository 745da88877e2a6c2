"""A HuggingFace Trainer with CheckpointCallback: inference-ready checkpoints, best / final tags, resume.

Run:  python examples/hf_trainer.py [--output DIR_OR_URL] [--steps N]

Builds everything locally (no downloads): a word-level tokenizer trained with the `tokenizers`
package on a few built-in sentences, and a 2-layer GPT-2 made from a config. Trains for --steps
steps (default 60), evaluating and saving every 10 steps into ./checkpoints by default
(or any fsspec URL: s3://bucket/run, memory://demo, ...), keeping the 2 newest automatic
checkpoints plus the best by eval loss and the final one, and loads the best weights back into
the model at the end. Running it again resumes from the latest checkpoint instead of starting
over. Finally it loads the best checkpoint with AutoModelForCausalLM / AutoTokenizer and
generates a few tokens from it.
"""

from __future__ import annotations

import argparse
import logging
import tempfile

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from ckpt_callback import CheckpointCallback

TEXT = [
    "the quick brown fox jumps over the lazy dog", "a stitch in time saves nine", "all that glitters is not gold",
    "the early bird catches the worm", "actions speak louder than words", "practice makes perfect",
    "the pen is mightier than the sword", "when in rome do as the romans do", "time heals all wounds",
    "every cloud has a silver lining", "fortune favours the bold", "knowledge is power",
]
BLOCK = 16


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXT, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


class Windows(torch.utils.data.Dataset):
    """Overlapping windows of BLOCK tokens over the text, for causal LM training (labels = inputs)."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, stride: int, start: int = 0) -> None:
        ids = [i for line in TEXT for i in [*tokenizer(line)["input_ids"], tokenizer.eos_token_id]]
        self.items = [torch.tensor(ids[s : s + BLOCK]) for s in range(start, len(ids) - BLOCK, stride)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.items[index], "labels": self.items[index]}


def train(output: str, steps: int) -> CheckpointCallback:
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(
        n_layer=2, n_embd=64, n_head=2, n_positions=BLOCK, vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hf-trainer-out-"),  # stays empty: the callback does the saving
        max_steps=steps, per_device_train_batch_size=8, learning_rate=3e-3, warmup_steps=5,
        eval_strategy="steps", eval_steps=10, save_steps=10, logging_steps=5,
        use_cpu=True, report_to="none", disable_tqdm=True, seed=0,
    )
    callback = CheckpointCallback(output, keep_last=2, monitor="evalLoss", load_best_at_end=True)
    trainer = Trainer(model=model, args=args, processing_class=tokenizer, callbacks=[callback],
                      train_dataset=Windows(tokenizer, stride=2), eval_dataset=Windows(tokenizer, stride=7, start=3))
    start = callback.resume_from()  # None on the first run: train from scratch
    print(f"resuming from {start}" if start else "starting from scratch")
    trainer.train(resume_from_checkpoint=start)
    return callback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="checkpoints", help="folder or fsspec URL")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ckpt_callback").setLevel(logging.INFO)

    manager = train(args.output, args.steps).manager

    print(f"\ncheckpoints in {args.output}:")
    for info in manager.list(sort_by="step", order="asc"):
        eval_loss = "-" if info.eval_loss is None else f"{info.eval_loss:.4f}"
        print(f"  {info.name:<16} {info.type:<9} step {info.step:4d}  evalLoss {eval_loss}  "
              f"inferenceReady {info.inference_ready}  {info.size} bytes")
    problems = [r for r in manager.verify() if not r.ok]
    print(f"verified: {problems or 'all good'}")

    best = manager.best()
    assert best is not None
    with tempfile.TemporaryDirectory() as tmp:
        folder = manager.download(best.name, f"{tmp}/{best.name}")  # a no-op copy for local roots, needed for s3://
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer("the early bird", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    print(f"{best.name} (best, evalLoss {best.eval_loss:.4f}) continues 'the early bird' with: "
          f"{tokenizer.decode(out[0][prompt['input_ids'].shape[1]:])!r}")


if __name__ == "__main__":
    main()
