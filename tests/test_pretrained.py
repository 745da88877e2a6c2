"""HF and peft models on storage: the adapter layout, exact resume, and ``inferenceReady`` proven by a real load.

Every ``inferenceReady`` here is checked against ``from_pretrained`` itself (transformers or
peft), never against our own reading of the folder.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("peft")
from peft import (
    AutoPeftModelForCausalLM,
    IA3Config,
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ckpt_callback import CheckpointCallback, CheckpointHook, CheckpointManager
from ckpt_callback._pretrained import config_files
from test_hf import PROBE, Preempt, live_logits, tiny_model, tiny_tokenizer, tiny_trainer


def named_base(folder: Path, seed: int = 0) -> Path:
    """A tiny GPT-2 saved with save_pretrained: a named base that from_pretrained (and peft) can load."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def lora(base: Path, kind: str = "lora") -> Any:
    """A peft model over the named base, its adapter moved off its (zero) init so it changes the logits."""
    model = AutoModelForCausalLM.from_pretrained(base)
    config = (LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], task_type="CAUSAL_LM")
              if kind == "lora" else IA3Config(target_modules=["c_attn", "mlp.c_proj"],
                                               feedforward_modules=["mlp.c_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(1)  # peft draws its initial adapter weights: the same ones on every call
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    return peft_model


def loads_exactly(folder: Path, live: torch.Tensor) -> bool:
    """What inferenceReady promises, asked of transformers: no missing/unexpected/mismatched keys, same logits."""
    try:
        model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    except Exception:
        return False
    problems = info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]
    return not problems and torch.equal(live_logits(model), live)


def peft_loads_exactly(base: Path, folder: Path, live: torch.Tensor) -> bool:
    """The same, asked of peft: PeftModel.from_pretrained(base, folder) gives the live logits."""
    try:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)
    except Exception:
        return False
    return torch.equal(live_logits(model), live)


# --- inferenceReady is proven ----------------------------------------------------------------------


def _kinds(tmp_path: Path) -> dict[str, tuple[Any, dict[str, Any], Any, bool]]:
    """Saves of every kind: (what is saved, save() options, the live model it is of, whether it must be ready)."""
    tokenizer = tiny_tokenizer()
    hf = tiny_model(tokenizer, seed=2)
    compiled, wrapped = tiny_model(tokenizer, seed=4), tiny_model(tokenizer, seed=5)
    base = named_base(tmp_path / "base")
    peft_model = lora(base)
    wrong = tiny_model(tokenizer, seed=3)
    small = copy.deepcopy(wrong.config)
    small.n_embd, small.n_head = 16, 2  # a config whose architecture wants other shapes
    small.architectures = ["GPT2LMHeadModel"]
    wrong_files = config_files(wrong)
    wrong_files["config.json"] = small.to_json_string().encode()

    class PlainLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(len(tokenizer), 8)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.emb(ids)

    bare = hf.config.to_json_string().encode()  # names no architectures: AutoModelForCausalLM picks the class
    assert hf.config.architectures is None
    full_lora = peft_model.state_dict()  # the old layout: the whole peft model under the base's config.json
    return {
        "hf": (hf, {}, hf, True),
        "compiled-hf": (torch.compile(compiled), {}, compiled, True),
        "wrapped-hf": (torch.nn.DataParallel(wrapped), {}, wrapped, True),
        "peft": (peft_model, {}, peft_model, True),
        "plain": (PlainLM(), {}, None, False),
        "plain-with-a-config": (PlainLM(), {"files": config_files(hf)}, hf, False),
        "weights-not-of-the-config": (wrong.state_dict(), {"files": wrong_files}, wrong, False),
        "lora-as-a-full-state-dict": (full_lora, {"files": config_files(peft_model.get_base_model())}, peft_model,
                                      False),
        "state-dict-with-the-tied-copy": ({k: v.clone() for k, v in hf.state_dict().items()},
                                          {"files": config_files(hf)}, hf, True),  # lm_head written too
        "state-dict-with-a-bare-config": (hf.state_dict(), {"files": {"config.json": bare}}, hf, True),
        "lm-head-instead-of-the-embedding": ({k: v.clone() for k, v in hf.state_dict().items()
                                              if k != "transformer.wte.weight"}, {"files": config_files(hf)}, hf,
                                             True),  # from_pretrained ties the embedding to the head
        "missing-a-weight": ({k: v for k, v in hf.state_dict().items() if "h.1.mlp" not in k},
                             {"files": config_files(hf)}, hf, False),
    }


def test_inference_ready_is_true_exactly_when_from_pretrained_loads_the_live_model(tmp_path: Path):
    manager = CheckpointManager(str(tmp_path / "ckpts"), keep_last=None)
    for step, (kind, (state, options, live, ready)) in enumerate(_kinds(tmp_path).items(), 1):
        info = manager.save(state, step=step, name=kind, **options)
        folder = tmp_path / "ckpts" / kind
        logits = live_logits(live) if live is not None else torch.empty(0)
        if kind == "peft":
            loads = peft_loads_exactly(tmp_path / "base", folder, logits)
            assert not (folder / "model.safetensors").exists() and not (folder / "config.json").exists()
        else:
            loads = loads_exactly(folder, logits)
        assert (info.inference_ready, loads) == (ready, ready), kind
        if kind == "hf":  # the file holds what save_pretrained writes; load() gives the tied name back too
            assert "lm_head.weight" not in load_file(folder / "model.safetensors")
            state = manager.load(kind)
            assert state["lm_head.weight"] is state["transformer.wte.weight"]
        assert manager.get(kind).inference_ready is ready


def test_imported_folders_are_proven_the_same_way(tmp_path: Path):
    from ckpt_callback import import_checkpoints

    tokenizer = tiny_tokenizer()
    good = tiny_model(tokenizer)
    good.save_pretrained(tmp_path / "good")
    bad = tiny_model(tokenizer)
    bad.save_pretrained(tmp_path / "bad")
    config = json.loads((tmp_path / "bad" / "config.json").read_text())
    config["n_layer"] = 3  # the weights are of a 2-layer model
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    infos = import_checkpoints(str(tmp_path / "ckpts"), [tmp_path / "good", tmp_path / "bad"])
    ready = {i.name: i.inference_ready for i in infos}
    assert ready == {"good": True, "bad": False}
    assert loads_exactly(tmp_path / "ckpts" / "good", live_logits(good))
    assert not loads_exactly(tmp_path / "ckpts" / "bad", live_logits(bad))


# --- peft through the manager, the hook and the Trainer --------------------------------------------


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_a_peft_checkpoint_holds_the_adapter_alone_and_peft_loads_it(tmp_path: Path, kind: str, root: str):
    base = named_base(tmp_path / "base")
    model = lora(base, kind)
    manager = CheckpointManager(root)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(PROBE, labels=PROBE).loss.backward()
    optimizer.step()
    info = manager.save(model, step=1, optimizer=optimizer)
    assert {f.path for f in info.files} == {"adapter_model.safetensors", "adapter_config.json",
                                            "optimizer.safetensors", "training_state.json"}
    assert info.inference_ready and info.adapter.type == kind.upper() and info.adapter.base_model == str(base)
    assert info.model == str(base)
    expected = get_peft_model_state_dict(model)
    loaded = manager.load("latest")  # the adapter's state dict, named as peft names it
    assert set(loaded) == set(expected) and all(torch.equal(loaded[k], v) for k, v in expected.items())
    folder = manager.download("latest", tmp_path / "dl")
    assert set(load_file(folder / "adapter_model.safetensors")) == set(expected)  # read by safetensors itself
    live = live_logits(model)
    assert peft_loads_exactly(base, folder, live)
    assert torch.equal(live_logits(AutoPeftModelForCausalLM.from_pretrained(folder)), live)
    # the base's weights are on storage nowhere: the adapter file holds the adapter's bytes and a header
    adapter_bytes = sum(v.numel() * v.element_size() for v in expected.values())
    stored = next(f.size for f in info.files if f.path == "adapter_model.safetensors")
    assert adapter_bytes < stored < adapter_bytes + 8192 < (base / "model.safetensors").stat().st_size


def test_the_hook_resumes_a_lora_run_exactly(tmp_path: Path):
    base = named_base(tmp_path / "base")
    batches = [torch.randint(0, 20, (2, 8), generator=torch.Generator().manual_seed(s)) for s in range(8)]

    def run(root: str, stop: int | None) -> dict[str, torch.Tensor]:
        model = lora(base)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        with CheckpointHook(root, model, optimizer=optimizer, scheduler=scheduler, every_n_steps=2,
                            async_save=True, save_merged="final") as hook:
            for step in range(hook.resume() + 1, 9):
                model.train()
                noise = torch.rand(1).item()  # RNG drawn every step: resume must restore it
                loss = model(batches[step - 1], labels=batches[step - 1]).loss * (1 + noise * 0.01)
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                hook.step(step, loss=loss.item())
                if step == stop:
                    hook.manager.close()
                    return {}
        return {k: v.detach().clone() for k, v in model.named_parameters()}

    torch.manual_seed(7)
    straight = run(str(tmp_path / "straight"), None)
    root = str(tmp_path / "resumed")
    torch.manual_seed(7)
    run(root, stop=5)  # dies after step 5; checkpoint-4 is the latest
    torch.manual_seed(123)  # a fresh process would start from another RNG state
    resumed = run(root, None)
    assert set(resumed) == set(straight)
    assert all(torch.equal(resumed[k], v) for k, v in straight.items())
    info = CheckpointManager(root).get("final")
    assert info.adapter is not None and "adapter_model.safetensors" in {f.path for f in info.files}
    # step 8 was saved on schedule first; the final of the same step is saved again, with the merged model
    assert info.name == "checkpoint-8" and info.adapter.merged == "merged"
    assert "merged/model.safetensors" in {f.path for f in info.files}


def test_the_trainer_resumes_a_lora_run_exactly_and_merges_the_final_model(tmp_path: Path):
    base = named_base(tmp_path / "base")

    def trainer(root: str, callbacks: list[Any], **options: Any) -> Any:
        options = {"save_merged": "final", **options}
        return tiny_trainer(str(tmp_path / "out"), [CheckpointCallback(root, **options),
                                                    *callbacks], model=lora(base), save_steps=6)

    # saved every 4 steps, with the evaluations; "best" = the highest eval loss, so not the last checkpoint
    straight = trainer(str(tmp_path / "straight"), [], load_best_at_end=True, keep_last=None, save_merged="never",
                       every_n_steps=4, monitor="evalLoss", mode="max")
    straight.train()
    done = CheckpointManager(str(tmp_path / "straight"))
    expected = done.load("final")  # the adapter after 12 uninterrupted steps
    best = done.best()
    assert best is not None and best.adapter is not None and best.name != "checkpoint-12"
    loaded = get_peft_model_state_dict(straight.model)  # the best adapter was loaded into the model at the end
    assert all(torch.equal(v, done.load(best.name)[k]) for k, v in loaded.items())

    root = str(tmp_path / "resumed")
    first = trainer(root, [Preempt(after=6)])
    with pytest.raises(KeyboardInterrupt):
        first.train()
    checkpoint = CheckpointManager(root).get("checkpoint-6")
    assert checkpoint.adapter.merged is None and not any(f.path.startswith("merged/") for f in checkpoint.files)
    second = trainer(root, [])
    callback = next(c for c in second.callback_handler.callbacks if isinstance(c, CheckpointCallback))
    second.train(resume_from_checkpoint=callback.resume_from())
    resumed = get_peft_model_state_dict(second.model)
    assert set(resumed) == set(expected) and all(torch.equal(resumed[k], v) for k, v in expected.items())

    final = CheckpointManager(root).get("final")
    folder = tmp_path / "resumed" / final.name
    live = live_logits(second.model)
    assert final.inference_ready and peft_loads_exactly(base, folder, live)
    assert final.adapter.merged == "merged"
    merged, loading = AutoModelForCausalLM.from_pretrained(folder / "merged", output_loading_info=True)
    assert not (loading["missing_keys"] or loading["unexpected_keys"] or loading["mismatched_keys"])
    torch.testing.assert_close(live_logits(merged), live)  # merging rounds: close, not bit-equal
    assert (folder / "merged" / "tokenizer.json").exists()


def test_export_list_and_inspect_of_adapter_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    import yaml

    from ckpt_callback._cli import main

    base = named_base(tmp_path / "base")
    model = lora(base)
    root = str(tmp_path / "ckpts")
    manager = CheckpointManager(root, save_merged="final")
    manager.save(model, step=1, files={"tokenizer.json": (base / "tokenizer.json").read_bytes()})
    manager.save(model, step=2, type="final")
    live = live_logits(model)

    assert main(["export", root, "checkpoint-1", str(tmp_path / "adapter")]) == 0  # no merged model: the adapter
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"adapter_model.safetensors", "adapter_config.json",
                                                                 "tokenizer.json"}
    assert peft_loads_exactly(base, tmp_path / "adapter", live)
    assert main(["export", root, "final", str(tmp_path / "merged"), "--dtype", "bfloat16"]) == 0  # the merged model
    merged, loading = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not (loading["missing_keys"] or loading["unexpected_keys"]) and merged.dtype == torch.bfloat16
    assert not (tmp_path / "merged" / "adapter_config.json").exists()

    capsys.readouterr()
    assert main(["list", root]) == 0
    assert "final (LORA)" in capsys.readouterr().out
    assert main(["inspect", root, "final"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert doc["spec"]["adapter"] == {"type": "LORA", "baseModel": str(base), "merged": "merged"}
    assert doc["status"]["metadata"]["inferenceReady"] is True


def test_the_adapter_key_of_the_sidecar_round_trips_and_rejects_hostile_values():
    from ckpt_callback import CheckpointInfo, SidecarError
    from ckpt_callback._sidecar import Adapter

    info = CheckpointInfo(name="c", step=1, adapter=Adapter("LORA", "gpt2", "merged"))
    doc = info.to_json()
    assert doc["adapter"] == {"type": "LORA", "baseModel": "gpt2", "merged": "merged"}
    assert CheckpointInfo.from_json(doc) == info
    assert "adapter" not in CheckpointInfo(name="c", step=1).to_json()  # full models have no such key
    for bad in ("LORA", {"type": 3}, {"type": "LORA", "merged": "../outside"}, {"type": "LORA", "baseModel": 1}):
        with pytest.raises(SidecarError, match="adapter"):
            CheckpointInfo.from_json({**doc, "adapter": bad})


def test_export_of_a_compressed_adapter_checkpoint_is_a_plain_adapter_folder(tmp_path: Path) -> None:
    """Compressed adapter files are decoded on export: peft reads the folder as it saves it."""
    pytest.importorskip("peft")
    import os

    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from ckpt_callback import export_checkpoint

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
    model = get_peft_model(GPT2LMHeadModel(config), LoraConfig(r=4, target_modules=["c_attn"]))
    info = CheckpointManager(str(tmp_path / "r"), compression="zstd").save(model, step=1)
    assert any(f.codec for f in info.files)
    out = export_checkpoint(str(tmp_path / "r"), "latest", tmp_path / "out")
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    PeftModel.from_pretrained(GPT2LMHeadModel(config), str(out))
