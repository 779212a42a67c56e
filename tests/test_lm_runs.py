"""Language-model runs through the engine: a tiny teacher, distilled students (token_kd dense, top-k, chunked,
on-policy, hidden_mse), vocabulary errors from the CLI, gradient accumulation by tokens, sequence-level KD,
and two CPU processes."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

import kdforge
from conftest import run_cli
from kdforge.weights import load_state_dict

TINY = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
SMALLER = {**TINY, "n_layer": 1, "n_embd": 16}


def write_corpus(directory: Path, n: int = 6) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (directory / f"doc{i}.txt").write_text("".join(f"value_{j} = {i} * {j} + {j % 7}\n" for j in range(60)))
    return directory


def text_data(root: Path) -> dict[str, Any]:
    return {"name": "text", "params": {"files": str(write_corpus(root / "corpus") / "*.txt"), "vocab_size": 300,
                                       "seq_len": 32, "eval_fraction": 0.2, "cache_dir": str(root / "cache")}}


def recipe(root: Path, name: str, student: dict, losses: list, teacher: dict | None = None, **changes: Any) -> dict:
    r = {"name": name, "seed": 0, "data": text_data(root), "student": student, "losses": losses,
         "optimizer": {"name": "adamw", "params": {"lr": 0.01}},
         "trainer": {"epochs": 1, "batch_size": 16, "progress_bar": False, "log_every": 5},
         "output_dir": str(root / name)}
    if teacher is not None:
        r["teacher"] = teacher
    r.update(copy.deepcopy(changes))
    return r


def hf(config: dict, **params: Any) -> dict:
    return {"name": "hf_causal_lm", "params": {"config": config, **params}}


@pytest.fixture(scope="session")
def lm_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lm")


@pytest.fixture(scope="session")
def lm_teacher(lm_root: Path) -> Path:
    """A tiny GPT-2 trained on the generated corpus (two epochs)."""
    r = recipe(lm_root, "teacher", hf(TINY), [{"name": "lm_ce"}], trainer={"epochs": 2, "batch_size": 16, "progress_bar": False})
    kdforge.run(r, overwrite=True)
    return lm_root / "teacher"


def checkpoint(path: Path) -> dict:
    return {"name": "checkpoint", "params": {"path": str(path)}}


def test_the_teacher_run_records_its_tokenizer_and_metrics(lm_teacher: Path) -> None:
    summary = json.loads((lm_teacher / "summary.json").read_text())
    assert summary["task"] == "language_modeling" and summary["headline"] == {"metric": "perplexity", "higher_is_better": False}
    assert 1.0 < summary["student/perplexity"] < summary["data/vocab_size"]
    assert summary["student/token_nll"] == pytest.approx(torch.log(torch.tensor(summary["student/perplexity"])).item(), rel=1e-6)
    assert 0.0 < summary["student/accuracy"] <= 1.0
    assert (lm_teacher / "tokenizer" / "tokenizer.json").is_file() and (lm_teacher / "hf" / "config.json").is_file()
    recorded = yaml.safe_load((lm_teacher / "recipe.yaml").read_text())
    assert recorded["student"]["params"]["num_classes"] == summary["data/vocab_size"]  # enough to rebuild it


@pytest.mark.parametrize("params", [
    {"divergence": "forward_kl"},
    {"divergence": "jsd", "beta": 0.5, "chunk_size": 40, "top_k": 16, "temperature": 2.0},
    {"divergence": "skew_reverse_kl", "alpha": 0.1, "lmbda": 1.0,
     "generator": {"name": "hf_generate", "params": {"max_new_tokens": 8, "prompt_tokens": 12}}},
], ids=["forward_kl", "jsd-topk-chunked", "on-policy"])
def test_token_kd_students_train_from_a_checkpoint_teacher(lm_root: Path, lm_teacher: Path, params: dict) -> None:
    name = f"kd-{params['divergence']}"
    r = recipe(lm_root, name, hf(SMALLER), [{"name": "lm_ce", "weight": 0.5}, {"name": "token_kd", "weight": 0.5, "params": params}],
               teacher=checkpoint(lm_teacher))
    summary = kdforge.run(r, overwrite=True)
    teacher = json.loads((lm_teacher / "summary.json").read_text())
    assert summary["teacher/perplexity"] == pytest.approx(teacher["student/perplexity"], rel=1e-6)
    assert summary["student/perplexity"] is not None and summary["student/perplexity"] < summary["data/vocab_size"]
    # the same tokenizer as the teacher's run, byte for byte
    assert summary["data/tokenizer_sha256"] == teacher["data/tokenizer_sha256"]
    assert (lm_root / name / "tokenizer" / "tokenizer.json").read_bytes() == (lm_teacher / "tokenizer" / "tokenizer.json").read_bytes()
    metrics = [json.loads(line) for line in (lm_root / name / "metrics.jsonl").read_text().splitlines()]
    kd_values = [m["train/loss/token_kd"] for m in metrics if "train/loss/token_kd" in m]
    assert kd_values and all(v >= 0.0 for v in kd_values)


def test_hidden_state_distillation_on_transformer_blocks(lm_root: Path, lm_teacher: Path) -> None:
    losses = [{"name": "lm_ce"}, {"name": "hidden_mse", "weight": 0.5,
                                  "params": {"student_taps": ["transformer.h.0"], "teacher_taps": ["transformer.h.1"]}}]
    summary = kdforge.run(recipe(lm_root, "hidden", hf(SMALLER), losses, teacher=checkpoint(lm_teacher)), overwrite=True)
    assert summary["student/perplexity"] is not None


def test_a_teacher_with_a_smaller_vocabulary_is_a_clean_cli_error(lm_root: Path, lm_teacher: Path, tmp_path: Path) -> None:
    vocab = json.loads((lm_teacher / "summary.json").read_text())["data/vocab_size"]
    small = hf({**SMALLER, "vocab_size": vocab - 20})
    r = recipe(lm_root, "bad-teacher", hf(SMALLER), [{"name": "token_kd"}], teacher=small, output_dir=str(tmp_path / "never"))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(r))
    result = run_cli("validate", "--dry-run", str(path))
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"vocabulary of {vocab - 20} tokens, but the tokenizer has {vocab}" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "never").exists()


def test_different_vocabularies_without_a_tokenizer_size_are_a_cli_error_naming_both(lm_root: Path, lm_teacher: Path,
                                                                                   tmp_path: Path) -> None:
    vocab = json.loads((lm_teacher / "summary.json").read_text())["data/vocab_size"]
    r = recipe(lm_root, "bad-loss", hf({**SMALLER, "vocab_size": vocab + 8}),
               [{"name": "token_kd", "params": {"num_classes": None}}], teacher=checkpoint(lm_teacher),
               output_dir=str(tmp_path / "never"))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(r))
    result = run_cli("run", str(path))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "losses[0]" in result.stderr and "token_kd" in result.stderr
    assert f"student vocabulary {vocab + 8} and teacher vocabulary {vocab} differ" in result.stderr
    assert not (tmp_path / "never").exists()


def test_padding_rows_beyond_the_tokenizer_are_trimmed_in_a_run(lm_root: Path, lm_teacher: Path) -> None:
    vocab = json.loads((lm_teacher / "summary.json").read_text())["data/vocab_size"]
    padded = hf({**SMALLER, "vocab_size": vocab + 8})  # as Qwen's 151,936 vs 152,064 rows
    summary = kdforge.run(recipe(lm_root, "padded", padded, [{"name": "token_kd"}], teacher=checkpoint(lm_teacher)),
                          overwrite=True)
    assert summary["student/perplexity"] is not None


def pairs_data(root: Path) -> dict:
    path = root / "pairs.jsonl"
    rows = [{"prompt": f"{a} plus {a % 9} is" + " so" * (a % 5), "completion": f" {a + a % 9}" + " ok" * (a % 7)}
            for a in range(48)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"name": "prompt_completion", "params": {"files": str(path), "vocab_size": 280, "seq_len": 40,
                                                    "eval_fraction": 0.1, "cache_dir": str(root / "cache")}}


def test_gradient_accumulation_weighs_micro_batches_by_tokens(tmp_path: Path) -> None:
    """k micro-batches of b == one batch of k * b, with different token counts per micro-batch (TRL #4719)."""
    data = pairs_data(tmp_path)
    common = {"data": data, "optimizer": {"name": "sgd", "params": {"lr": 0.5}}}
    whole = recipe(tmp_path, "whole", hf(SMALLER), [{"name": "lm_ce"}, {"name": "token_kd", "params": {"chunk_size": 50}}],
                   teacher=hf(TINY), trainer={"epochs": 1, "batch_size": 8, "progress_bar": False}, **common)
    split = recipe(tmp_path, "split", hf(SMALLER), whole["losses"], teacher=hf(TINY),
                   trainer={"epochs": 1, "batch_size": 2, "gradient_accumulation_steps": 4, "progress_bar": False}, **common)
    a, b = kdforge.run(whole, overwrite=True), kdforge.run(split, overwrite=True)
    assert a["train/steps"] == b["train/steps"] >= 4
    wa, wb = load_state_dict(tmp_path / "whole" / "student.safetensors"), load_state_dict(tmp_path / "split" / "student.safetensors")
    moved = 0.0
    initial = kdforge.create("student", "hf_causal_lm", config=SMALLER, num_classes=a["data/vocab_size"]).state_dict()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5)
        moved = max(moved, float((wa[name] - initial[name].to(wa[name].dtype)).abs().max()))
    assert moved > 1e-3  # training did move the weights
    # and the micro-batches really held different numbers of target tokens
    splits = kdforge.create("dataset", "prompt_completion", **data["params"])
    counts = {int((splits.train[i]["labels"] != -100).sum()) for i in range(len(splits.train))}
    assert len(counts) > 3


def test_teacher_completions_are_generated_once_and_cached(lm_root: Path, lm_teacher: Path) -> None:
    params = {"data": text_data(lm_root), "teacher": checkpoint(lm_teacher), "max_new_tokens": 6, "prompt_tokens": 10,
              "batch_size": 32, "cache_dir": str(lm_root / "cache")}
    first = kdforge.create("dataset", "teacher_completions", **params)
    path = Path(first.info["teacher_completions"]["cache"])
    assert path.is_file()
    item = first.train[0]
    p = int(item["prompt_length"])
    assert p == 10 and 10 < len(item["input_ids"]) <= 16 and (item["labels"][:p] == -100).all()
    blocks = kdforge.create("dataset", "text", **text_data(lm_root)["params"])
    assert torch.equal(item["input_ids"][:p], blocks.train[0]["input_ids"][:p])
    stamp = path.stat().st_mtime_ns
    again = kdforge.create("dataset", "teacher_completions", **params)
    assert path.stat().st_mtime_ns == stamp and torch.equal(again.train[5]["input_ids"], first.train[5]["input_ids"])
    r = recipe(lm_root, "seqkd", hf(SMALLER), [{"name": "lm_ce"}])
    r["data"] = {"name": "teacher_completions", "params": params}
    assert kdforge.run(r, overwrite=True)["student/perplexity"] is not None


@pytest.mark.slow
def test_two_cpu_processes_distill_a_language_model(lm_root: Path, lm_teacher: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_distributed import launch

    r = recipe(lm_root, "ddp", hf(SMALLER), [{"name": "lm_ce", "weight": 0.5},
                                            {"name": "token_kd", "weight": 0.5, "params": {"chunk_size": 64}}],
               teacher=checkpoint(lm_teacher), trainer={"epochs": 1, "batch_size": 8, "progress_bar": False,
                                                        "gradient_accumulation_steps": 2},
               output_dir=str(tmp_path / "ddp"))
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(r))
    result = launch(path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["student/perplexity"] is not None
    assert len(summary["train/samples_seen_per_process"]) == 2


def test_validate_dry_run_prints_the_memory_estimate(lm_root: Path, lm_teacher: Path, tmp_path: Path) -> None:
    student = hf(SMALLER)
    r = recipe(lm_root, "estimate", student, [{"name": "lm_ce"}, {"name": "token_kd", "params": {"chunk_size": 48}}],
               teacher=checkpoint(lm_teacher), output_dir=str(tmp_path / "never"))
    path = tmp_path / "estimate.yaml"
    path.write_text(yaml.safe_dump(r))
    result = run_cli("validate", "--dry-run", str(path))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert "memory estimate for a training batch of 16 per process" in result.stdout

    def size_of(prefix: str) -> str:
        found = [line for line in lines if line.strip().startswith(prefix)]
        assert len(found) == 1, (prefix, result.stdout)
        return found[0].split()[-2] + " " + found[0].split()[-1]

    from kdforge.profiling import human_bytes

    vocab = json.loads((lm_teacher / "summary.json").read_text())["data/vocab_size"]
    built = kdforge.load_student(lm_teacher)  # the teacher's architecture, rebuilt from its run
    teacher_params = sum(p.numel() for p in built.parameters())
    assert f"teacher parameters ({teacher_params:,})" in result.stdout
    assert size_of("teacher parameters") == human_bytes(4 * teacher_params)
    # AdamW keeps two float32 moments per trainable element (plus a step counter per tensor)
    student_line = next(line for line in lines if line.strip().startswith("student parameters"))
    n_student = int(student_line.split("(")[1].split(")")[0].replace(",", ""))
    assert size_of("gradients of the trainable parameters") == human_bytes(4 * n_student)
    value, unit = size_of("optimizer state (adamw)").split()
    assert float(value) * {"KiB": 2**10, "MiB": 2**20}[unit] == pytest.approx(8 * n_student, rel=0.02)
    # 16 samples x 32 positions of logits (float32), twice for the student (their gradient)
    assert f"student logits and their gradient (16 x 32 x {vocab}, torch.float32)" in result.stdout
    assert size_of("student logits") == human_bytes(2 * 16 * 32 * vocab * 4)
    assert f"48 tokens x {vocab:,} float32, forward_kl" in result.stdout  # token_kd reports one chunk
    assert lines[-1].strip().startswith("total")
    assert not (tmp_path / "never").exists()


def test_a_tied_weight_lm_resumes_to_the_same_weights(lm_root: Path, tmp_path: Path) -> None:
    # GPT-2 ties lm_head to the token embedding: the checkpoint stores the shared tensor once
    def lm(out: Path, epochs: int) -> dict:
        return recipe(lm_root, "resume", hf(SMALLER), [{"name": "lm_ce"}], output_dir=str(out),
                      trainer={"epochs": epochs, "batch_size": 16, "progress_bar": False})

    kdforge.run(lm(tmp_path / "full", 2))
    kdforge.run(lm(tmp_path / "cut", 1))
    kdforge.run(lm(tmp_path / "cut", 2), resume=True)
    full, resumed = load_state_dict(tmp_path / "full" / "student.safetensors"), load_state_dict(tmp_path / "cut" / "student.safetensors")
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    model = kdforge.load_student(tmp_path / "cut")
    assert model.hf.lm_head.weight.data_ptr() == model.hf.transformer.wte.weight.data_ptr()  # still tied


def test_the_documented_generation_script_matches_teacher_completions(lm_root: Path, lm_teacher: Path) -> None:
    # docs/lm.md, "Sequence-level KD": generate_completions by hand gives the dataset's completions
    from kdforge.plugins.lm_data import generate_completions
    from kdforge.plugins.lm_models import HFGenerate

    data = text_data(lm_root)["params"]
    params = {"data": text_data(lm_root), "teacher": checkpoint(lm_teacher), "max_new_tokens": 5, "prompt_tokens": 8,
              "batch_size": 16, "cache_dir": str(lm_root / "cache")}
    dataset = kdforge.create("dataset", "teacher_completions", **params)
    splits = kdforge.create("dataset", "text", **{**data, "tokenizer": str(lm_teacher / "tokenizer")})
    teacher = kdforge.load_student(lm_teacher).eval()
    rows = generate_completions(teacher, splits.train, splits.collate_fn, HFGenerate(max_new_tokens=5, temperature=0.0, prompt_tokens=8))
    assert len(rows) == len(dataset.train)
    for i in (0, len(rows) // 2, len(rows) - 1):
        ids, labels, prompt = rows[i]
        assert prompt == 8 and labels[:8] == [-100] * 8
        assert ids == dataset.train[i]["input_ids"].tolist()


def test_token_kd_trains_from_the_teacher_cache(lm_root: Path, lm_teacher: Path, tmp_path: Path) -> None:
    """Off-policy token_kd reads a teacher cache: dense float32 gives the online weights bit for bit, and a
    top-k cache (k values, k int32 indices and a float32 tail per token) trains like token_kd's own top_k."""
    def run(name: str, losses: list, cache: dict | None = None) -> dict:
        teacher = {**checkpoint(lm_teacher), **({"cache": {"dir": str(tmp_path / "cache"), **cache}} if cache else {})}
        return kdforge.run(recipe(lm_root, name, hf(SMALLER), losses, teacher, output_dir=str(tmp_path / name)),
                           overwrite=True)

    def weights(name: str) -> dict[str, torch.Tensor]:
        return load_state_dict(tmp_path / name / "student.safetensors")

    dense = [{"name": "token_kd", "params": {"divergence": "forward_kl", "chunk_size": 100}}]
    run("online", dense)
    built, reused = run("built", dense, {"dtype": "float32"}), run("reused", dense, {"dtype": "float32"})
    assert (built["teacher/cache"]["status"], reused["teacher/cache"]["status"]) == ("built", "reused")
    online = weights("online")
    assert all(torch.equal(online[k], weights(n)[k]) for n in ("built", "reused") for k in online)

    sparse = [{"name": "token_kd", "params": {"divergence": "jsd", "beta": 0.5, "top_k": 8}}]
    run("online-top8", sparse)
    cached = run("cached-top8", sparse, {"dtype": "float32", "top_k": 8})
    files = Path(cached["teacher/cache"]["path"])
    stored = {name: np.load(files / f"{name}.npy", mmap_mode="r") for name in ("values", "indices", "tail")}
    blocks = json.loads((files / "meta.json").read_text())["samples"]  # keyed by sample index: one row per block
    assert stored["values"].shape == stored["indices"].shape == (blocks, 1, 1, 32, 8)  # (views, members, seq, k)
    assert stored["tail"].shape == (blocks, 1, 1, 32) and stored["indices"].dtype == np.int32
    per_token = sum(a.nbytes for a in stored.values()) / (blocks * 32)
    assert per_token == 8 * 4 + 8 * 4 + 4  # float32 values here; float16 at k = 64 is 388 bytes a token
    a, b = weights("online-top8"), weights("cached-top8")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert not all(torch.equal(a[k], online[k]) for k in a)  # top-8 is not the dense run


def test_on_policy_token_kd_with_a_teacher_cache_is_a_recipe_error(lm_root: Path, lm_teacher: Path,
                                                                    tmp_path: Path) -> None:
    teacher = {**checkpoint(lm_teacher), "cache": {"dir": str(tmp_path / "cache")}}
    on_policy = [{"name": "token_kd", "params": {"lmbda": 0.5, "generator": {"name": "hf_generate", "params": {
        "max_new_tokens": 4, "prompt_tokens": 16}}}}]
    with pytest.raises(kdforge.RecipeError, match="rewrites batches") as caught:
        kdforge.run(recipe(lm_root, "on-policy-cached", hf(SMALLER), on_policy, teacher,
                           output_dir=str(tmp_path / "run")), overwrite=True)
    assert caught.value.key == "teacher.cache"
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
