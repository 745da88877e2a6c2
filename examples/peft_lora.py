"""LoRA (peft) with the HF Trainer and CheckpointCallback: adapter-only checkpoints, exact resume, a merged final.

Run:  python examples/peft_lora.py [--output DIR] [--steps N]

Builds everything locally (no downloads): the tokenizer and the 2-layer GPT-2 of
examples/hf_trainer.py, saved once with save_pretrained as the "base model" folder next to the
checkpoints, then wrapped in a LoRA adapter. Each checkpoint holds peft's layout
(adapter_model.safetensors, adapter_config.json, tokenizer) plus optimizer and training state,
never the base; the final one also holds the merged full model under merged/ (save_merged="final").
Running it again resumes from the latest checkpoint. Finally it loads the best checkpoint with
peft's AutoPeftModelForCausalLM and the merged final with transformers' AutoModelForCausalLM.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_trainer import BLOCK, Windows, make_tokenizer

from ckpt_callback import CheckpointCallback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="lora-checkpoints", help="a local folder (the base model is saved in it)")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    tokenizer = make_tokenizer()
    base = os.path.abspath(os.path.join(args.output, "..", os.path.basename(args.output) + "-base"))
    if not os.path.isdir(base):  # the named base model: what adapter_config.json's base_model_name_or_path points at
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=BLOCK, vocab_size=len(tokenizer),
                                   bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)
                        ).save_pretrained(base)
        tokenizer.save_pretrained(base)
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"], task_type="CAUSAL_LM"))
    callback = CheckpointCallback(args.output, keep_last=2, monitor="evalLoss", save_merged="final")
    trainer = Trainer(
        model=model, processing_class=tokenizer, callbacks=[callback],
        args=TrainingArguments(output_dir=tempfile.mkdtemp(prefix="lora-out-"), max_steps=args.steps,
                               per_device_train_batch_size=8, learning_rate=1e-2, eval_strategy="steps",
                               eval_steps=10, save_steps=10, logging_steps=10, use_cpu=True, report_to="none",
                               disable_tqdm=True, seed=0),
        train_dataset=Windows(tokenizer, stride=2), eval_dataset=Windows(tokenizer, stride=7, start=3))
    start = callback.resume_from()
    print(f"resuming from {start}" if start else "starting from scratch")
    trainer.train(resume_from_checkpoint=start)

    manager = callback.manager
    for info in manager.list(sort_by="step", order="asc"):
        print(f"  {info.name:<16} {info.type:<9} {info.adapter.type if info.adapter else 'full':<5} "
              f"inferenceReady {info.inference_ready}  {info.size:>8} bytes: "
              f"{', '.join(sorted(f.path for f in info.files))}")
    best = manager.best()
    assert best is not None
    adapter = AutoPeftModelForCausalLM.from_pretrained(os.path.join(args.output, best.name))  # base from adapter config
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(args.output, manager.get("final").name, "merged"))
    prompt = tokenizer("the early bird", return_tensors="pt")
    for label, m in ((f"{best.name} (adapter)", adapter), ("final (merged)", merged)):
        out = m.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        print(f"{label} continues 'the early bird' with: {tokenizer.decode(out[0][prompt['input_ids'].shape[1]:])!r}")


if __name__ == "__main__":
    main()
