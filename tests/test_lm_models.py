"""``hf_causal_lm`` (config, local path, Hub ids only with download, taps, LoRA export) and ``hf_generate``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import kdforge
from kdforge.build import build_run
from kdforge.recipe import load_recipe
from kdforge.plugins.lm_task import IGNORE_INDEX, LanguageModeling

TINY = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def tiny(**params) -> torch.nn.Module:
    return kdforge.create("student", "hf_causal_lm", **{"config": TINY, "num_classes": 120, **params})


def test_a_fresh_model_from_a_config_takes_the_tokenizer_vocabulary() -> None:
    model = tiny()
    ids = torch.randint(0, 120, (2, 7))
    logits = model(ids)
    assert logits.shape == (2, 7, 120)
    assert model.config.vocab_size == 120 and model.config.eos_token_id is None
    assert kdforge.create("student", "hf_causal_lm", config={**TINY, "vocab_size": 128}, num_classes=120)(ids).shape[-1] == 128
    assert "transformer.h.1" in list(model.tap_names())
    assert model.get_submodule("transformer.h.1") is model.hf.transformer.h[1]
    bf16 = tiny(dtype="bfloat16")
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_bad_params_are_recipe_errors(tmp_path: Path) -> None:
    with pytest.raises(kdforge.RecipeError, match="exactly one of path"):
        kdforge.create("student", "hf_causal_lm")
    with pytest.raises(kdforge.RecipeError, match="model_type"):
        kdforge.create("student", "hf_causal_lm", config={"model_type": "gtp2"}, num_classes=10)
    with pytest.raises(kdforge.RecipeError, match="download: true"):
        kdforge.create("student", "hf_causal_lm", path="some-org/some-model")  # never the network unless asked
    with pytest.raises(kdforge.RecipeError, match="lora"):
        tiny(lora={"rank": 4})


def test_a_local_directory_loads_without_the_network(tmp_path: Path) -> None:
    model = tiny()
    model.hf.save_pretrained(str(tmp_path / "saved"))
    loaded = kdforge.create("teacher", "hf_causal_lm", path=str(tmp_path / "saved"))
    ids = torch.randint(0, 120, (1, 5))
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(ids), model(ids))


def test_hf_generate_keeps_the_prompt_and_labels_only_the_completion() -> None:
    model = tiny()
    model.set_special_tokens(eos_token_id=0, pad_token_id=0)
    task = LanguageModeling(120)
    ids = torch.randint(1, 120, (3, 10))
    batch = task.to_batch({"input_ids": ids, "prompt_length": torch.tensor([2, 4, 10])}).replace(index=torch.arange(3))
    generator = kdforge.create("generator", "hf_generate", max_new_tokens=5, temperature=1.0)
    torch.manual_seed(0)
    new = generator.generate(model, batch)
    assert torch.equal(new.index, batch.index) and new.prompt_length.tolist() == [2, 4, 10]
    for i, p in enumerate([2, 4, 10]):
        n = int(new.attention_mask[i].sum())
        assert p < n <= p + 5
        assert torch.equal(new.inputs[i, :p], ids[i, :p])  # the prompt is kept
        labeled = (new.targets[i] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert labeled == list(range(p - 1, n - 1))  # (shifted) targets cover exactly the completion
        assert torch.equal(new.targets[i, p - 1:n - 1], new.inputs[i, p:n])
        assert new.generated[i].nonzero().flatten().tolist() == labeled  # every target here is a sample
        if 0 in new.inputs[i, p:n].tolist():  # stopped at end-of-text
            assert new.inputs[i, n - 1] == 0
    greedy = kdforge.create("generator", "hf_generate", max_new_tokens=4, temperature=0.0)
    assert torch.equal(greedy.generate(model, batch).inputs, greedy.generate(model, batch).inputs)
    with pytest.raises(ValueError, match="prompt_length"):
        greedy.generate(model, task.to_batch(ids))
    fixed = kdforge.create("generator", "hf_generate", max_new_tokens=3, temperature=0.0, prompt_tokens=6,
                           label_prompt=True)
    cut = fixed.generate(model, task.to_batch(ids))
    assert cut.prompt_length.tolist() == [6, 6, 6]
    assert torch.equal(cut.targets[:, :5], ids[:, 1:6])  # the prompt keeps its labels (ground truth)
    assert not cut.generated[:, :5].any() and cut.generated[:, 5].all()


def write_corpus(directory: Path, n: int = 6) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (directory / f"doc{i}.txt").write_text("".join(f"value_{j} = {i} * {j} + {j % 7}\n" for j in range(60)))
    return directory


def lm_recipe(tmp_path: Path, name: str, student: dict, losses: list, **changes) -> dict:
    recipe = {
        "name": name, "seed": 0,
        "data": {"name": "text", "params": {"files": str(write_corpus(tmp_path / "corpus") / "*.txt"),
                                            "vocab_size": 300, "seq_len": 32, "eval_fraction": 0.2}},
        "student": student, "losses": losses,
        "optimizer": {"name": "adamw", "params": {"lr": 0.01}},
        "trainer": {"epochs": 1, "batch_size": 16, "progress_bar": False, "log_every": 5},
        "output_dir": str(tmp_path / name),
    }
    recipe.update(changes)
    return recipe


def test_a_lora_student_trains_only_adapters_and_exports_for_transformers(tmp_path: Path, monkeypatch) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("KDFORGE_CACHE_DIR", str(tmp_path / "cache"))
    student = {"name": "hf_causal_lm", "params": {"config": TINY, "lora": {"r": 4, "alpha": 8}}}
    recipe = lm_recipe(tmp_path, "lora", student, [{"name": "lm_ce"}])
    summary = kdforge.run(recipe, overwrite=True)
    run = tmp_path / "lora"
    assert summary["student/perplexity"] is not None
    trained = kdforge.load_student(run)
    initial = build_run(load_recipe(recipe)).student  # the student exactly as the run built it, untrained
    changed = {n for n, p in trained.state_dict().items() if not torch.equal(p, initial.state_dict()[n])}
    assert changed and all("lora_" in n for n in changed)  # the base weights never moved
    assert all("lora_" in n for n, p in initial.named_parameters() if p.requires_grad)
    ids = torch.randint(0, summary["data/vocab_size"], (2, 12))
    trained.eval()
    expected = trained(ids)
    merged = AutoModelForCausalLM.from_pretrained(str(run / "hf")).eval()
    torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(str(run / "hf-base"))
    adapted = PeftModel.from_pretrained(base, str(run / "hf-lora")).eval()
    torch.testing.assert_close(adapted(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert AutoTokenizer.from_pretrained(str(run / "hf")).eos_token_id == merged.config.eos_token_id
    assert summary["export/hf"] == str(run / "hf")


def test_a_full_student_exports_with_save_pretrained(tmp_path: Path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("KDFORGE_CACHE_DIR", str(tmp_path / "cache"))
    recipe = lm_recipe(tmp_path, "full", {"name": "hf_causal_lm", "params": {"config": TINY}}, [{"name": "lm_ce"}],
                       trainer={"epochs": 1, "batch_size": 32, "progress_bar": False})
    kdforge.run(recipe, overwrite=True)
    run = tmp_path / "full"
    exported = AutoModelForCausalLM.from_pretrained(str(run / "hf")).eval()
    student = kdforge.load_student(run).eval()
    ids = torch.randint(0, exported.config.vocab_size, (1, 9))
    torch.testing.assert_close(exported(ids).logits, student(ids))
    config = json.loads((run / "hf" / "config.json").read_text())
    tokenizer = json.loads((run / "tokenizer" / "tokenizer_config.json").read_text())
    assert config["eos_token_id"] is not None and tokenizer["eos_token"] == "<|endoftext|>"
    assert not (run / "hf-lora").exists()


@pytest.mark.parametrize("hub_bars", [True, False])
def test_export_prints_no_progress_bar_of_its_own(hub_bars: bool, tmp_path: Path, capfd) -> None:
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    if hub_bars and hub_utils.are_progress_bars_disabled() and os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"):
        pytest.skip("HF_HUB_DISABLE_PROGRESS_BARS is set: the hub's bars cannot be turned on")
    hf_logging.enable_progress_bar()
    (hub_utils.enable_progress_bars if hub_bars else hub_utils.disable_progress_bars)()
    try:
        tiny().export(tmp_path)
        assert (tmp_path / "hf" / "config.json").is_file()
        captured = capfd.readouterr()
        assert "Writing model shards" not in captured.err + captured.out
        # each put back as it was, for the user's own transformers and hub calls
        assert hf_logging.is_progress_bar_enabled()
        assert hub_utils.are_progress_bars_disabled() is not hub_bars
    finally:
        hf_logging.enable_progress_bar()
