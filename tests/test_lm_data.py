"""Language-model data: packing, the document split, tokenizers (trained, cached, deterministic, from a
directory), prompt/completion labels, the task's batches, and the plugins' optional dependencies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdforge
from kdforge.plugins.lm_data import LMSplits, PadCollate, split_documents, Document
from kdforge.plugins.lm_task import IGNORE_INDEX, LanguageModeling

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("KDFORGE_CACHE_DIR", str(cache))
    return cache


def write_corpus(directory: Path, n: int = 8) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        lines = [f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(30)]
        (directory / f"doc{i}.txt").write_text("".join(lines))
    return directory


def build_text(directory: Path, **params) -> LMSplits:
    return kdforge.create("dataset", "text", files=str(directory / "*.txt"), vocab_size=300, seq_len=32, **params)


def test_text_packs_blocks_and_splits_by_document(tmp_path: Path) -> None:
    splits = build_text(write_corpus(tmp_path / "corpus"), eval_fraction=0.25)
    assert splits.task == "language_modeling" and splits.input_shape == (32,)
    assert splits.num_classes == splits.tokenizer.vocab_size <= 300
    item = splits.train[0]
    assert set(item) == {"input_ids"} and item["input_ids"].shape == (32,) and item["input_ids"].dtype == torch.long
    docs = splits.info["documents"]
    assert docs["train"] + docs["eval"] == 8 and docs["eval"] >= 1 and splits.eval is not None
    # the blocks are the documents' tokens joined with end-of-text, in order
    eos = splits.tokenizer.eos_token_id
    ids = torch.cat([splits.train[i]["input_ids"] for i in range(len(splits.train))])
    assert (ids == eos).sum() >= docs["train"] - 1


def test_the_split_is_deterministic_and_stable_when_documents_are_added() -> None:
    docs = [Document(f"d{i}", "x") for i in range(200)]
    train, held = split_documents(docs, 0.1, seed=3)
    assert 5 <= len(held) <= 40 and not {d.name for d in train} & {d.name for d in held}
    assert split_documents(docs, 0.1, seed=3) == (train, held)
    more = docs + [Document(f"new{i}", "y") for i in range(50)]
    _, held_more = split_documents(more, 0.1, seed=3)
    assert {d.name for d in held} <= {d.name for d in held_more}
    assert split_documents(docs, 0.1, seed=4)[1] != held


def test_the_trained_tokenizer_is_deterministic_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    first = build_text(corpus)
    monkeypatch.setenv("KDFORGE_CACHE_DIR", str(tmp_path / "other-cache"))
    second = build_text(corpus)
    assert first.tokenizer.directory != second.tokenizer.directory
    assert (first.tokenizer.directory / "tokenizer.json").read_bytes() == (second.tokenizer.directory / "tokenizer.json").read_bytes()
    again = build_text(corpus)
    assert again.tokenizer.directory == second.tokenizer.directory  # reused, not retrained
    info = first.info["tokenizer"]
    assert info["source"] == "trained" and info["vocab_size"] == 300 and len(info["tokenizer_json_sha256"]) == 64
    assert torch.equal(first.train[3]["input_ids"], second.train[3]["input_ids"])


def test_a_tokenizer_from_a_directory(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    trained = build_text(corpus)
    loaded = build_text(corpus, tokenizer=str(trained.tokenizer.directory))
    assert loaded.info["tokenizer"]["source"] == "directory"
    assert loaded.num_classes == trained.num_classes
    assert torch.equal(loaded.train[0]["input_ids"], trained.train[0]["input_ids"])
    with pytest.raises(kdforge.RecipeError, match="no tokenizer directory"):
        build_text(corpus, tokenizer=str(tmp_path / "nothing"))


def test_the_saved_tokenizer_loads_in_transformers(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    splits = build_text(write_corpus(tmp_path / "corpus"))
    run = kdforge.RunContext(tmp_path / "run", torch.nn.Linear(1, 1), None, _Main(), 1, 1, 1)
    (tmp_path / "run").mkdir()
    splits.on_fit_start(run)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "run" / "tokenizer"))
    text = "def f(x):\n    return x * 3\n"
    assert tok(text)["input_ids"] == splits.tokenizer.encode([text])[0]
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token_id == splits.tokenizer.eos_token_id
    source = json.loads((tmp_path / "run" / "tokenizer" / "kdforge_source.json").read_text())
    assert source["source"] == "trained" and source["corpus_sha256"]
    assert splits.on_fit_end(run)["data/tokenizer_sha256"] == source["tokenizer_json_sha256"]


class _Main:
    is_main_process = True


def test_jsonl_documents_and_a_single_document(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"line {i} " * 40}) for i in range(10)))
    splits = kdforge.create("dataset", "text", files=str(path), text_key="body", vocab_size=300, seq_len=16)
    assert splits.info["documents"]["train"] + splits.info["documents"]["eval"] == 10
    one = tmp_path / "one.txt"
    one.write_text("word " * 2000)
    single = kdforge.create("dataset", "text", files=str(one), vocab_size=300, seq_len=16, eval_fraction=0.2)
    assert single.eval is not None and len(single.eval) >= 1  # the last blocks are held out
    with pytest.raises(kdforge.RecipeError, match="text_key|body"):
        kdforge.create("dataset", "text", files=str(path), vocab_size=300, seq_len=16)


def test_the_default_corpus_is_the_standard_library() -> None:
    splits = kdforge.create("dataset", "text", max_files=6, max_file_bytes=6000, vocab_size=300, seq_len=32)
    assert splits.info["origin"] == "stdlib" and len(splits.train) > 10


def write_pairs(path: Path, n: int = 40) -> Path:
    rows = [{"prompt": f"{a} plus {a + 3} is", "completion": f" {2 * a + 3}."} for a in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_prompt_completion_labels_only_the_completion(tmp_path: Path) -> None:
    splits = kdforge.create("dataset", "prompt_completion", files=str(write_pairs(tmp_path / "pairs.jsonl")),
                            vocab_size=300, seq_len=24)
    item = splits.train[0]
    p = int(item["prompt_length"])
    assert (item["labels"][:p] == IGNORE_INDEX).all()
    assert torch.equal(item["labels"][p:], item["input_ids"][p:])
    assert int(item["input_ids"][-1]) == splits.tokenizer.eos_token_id
    batch = LanguageModeling(splits.num_classes).to_batch(splits.collate_fn([splits.train[i] for i in range(4)]))
    assert batch.attention_mask.shape == batch.inputs.shape and batch.prompt_length.shape == (4,)
    # targets are the labels shifted left: logits[t] predicts input_ids[t + 1] of the completion
    row = batch.targets[0]
    first = int(batch.prompt_length[0])
    assert (row[: first - 1] == IGNORE_INDEX).all() and row[first - 1] == batch.inputs[0, first]
    padding = batch.attention_mask == 0
    assert (batch.targets[padding] == IGNORE_INDEX).all()


def test_pad_collate_pads_and_masks() -> None:
    collate = PadCollate(pad_token_id=0)
    items = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]), "prompt_length": torch.tensor(1)},
             {"input_ids": torch.tensor([8]), "labels": torch.tensor([8]), "prompt_length": torch.tensor(1)}]
    batch = collate(items)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_the_task_shifts_once_and_weighs_target_tokens() -> None:
    task = LanguageModeling(num_classes=10)
    batch = task.to_batch({"input_ids": torch.tensor([[1, 2, 3, 4]]), "labels": torch.tensor([[-100, 2, 3, -100]])})
    assert batch.targets.tolist() == [[2, 3, -100, -100]]
    assert int(task.batch_weight(batch)) == 2 and isinstance(task.batch_weight(batch), torch.Tensor)
    plain = task.to_batch(torch.tensor([[1, 2, 3]]))
    assert plain.targets.tolist() == [[2, 3, -100]]
    logits = torch.full((1, 4, 10), -10.0)
    logits[0, 0, 2] = 10.0  # right
    logits[0, 1, 5] = 10.0  # wrong
    sums = task.eval_batch(logits, batch)
    result = task.eval_result({k: float(v) for k, v in sums.items()})
    assert result["accuracy"] == 0.5 and result["perplexity"] == pytest.approx(torch.exp(torch.tensor(result["token_nll"])).item())
    with pytest.raises(ValueError, match="input_ids"):
        task.to_batch({"text": "x"})


def test_the_task_refuses_logits_smaller_than_the_tokenizer() -> None:
    task = LanguageModeling()
    splits = kdforge.DataSplits([0], None, 12, (4,))
    batch = task.to_batch(torch.tensor([[1, 2, 3, 4]]))
    task.check_outputs(torch.zeros(1, 4, 16), batch, splits)  # padding rows are fine
    with pytest.raises(ValueError, match="vocabulary of 10 tokens, but the tokenizer has 12"):
        task.check_outputs(torch.zeros(1, 4, 10), batch, splits)
    with pytest.raises(ValueError, match=r"\(batch, seq, vocab\)"):
        task.check_outputs(torch.zeros(1, 12), batch, splits)


PROBE = """
import json, sys
import kdforge
from kdforge.registry import reload
kdforge.list_plugins()
imported = sorted(m for m in ("transformers", "tokenizers", "peft") if m in sys.modules)
for name in ("transformers", "tokenizers", "peft"):
    sys.modules[name] = None  # as if the lm extra were not installed
reload()
rows = [r.to_dict() for r in kdforge.list_plugins()]
try:
    kdforge.create("dataset", "text")
    error = None
except kdforge.RecipeError as exc:
    error = str(exc)
print(json.dumps({"imported": imported, "rows": rows, "error": error}))
"""


def test_without_the_lm_extra_the_plugins_are_unavailable_and_kdforge_never_imports_it() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["imported"] == []  # importing kdforge and loading every plugin imports none of them
    status = {(r["kind"], r["name"]): r for r in data["rows"]}
    for key in [("student", "hf_causal_lm"), ("teacher", "hf_causal_lm"), ("dataset", "text"),
                ("dataset", "prompt_completion"), ("dataset", "teacher_completions"), ("generator", "hf_generate")]:
        assert status[key]["status"] == "unavailable", key
        assert "pip install 'kdforge[lm]'" in status[key]["error"]
    for key in [("task", "language_modeling"), ("loss", "token_kd"), ("loss", "lm_ce"), ("loss", "hidden_mse")]:
        assert status[key]["status"] == "ok", key  # torch only
    assert not any(r["status"] == "failed" for r in data["rows"])
    assert "pip install 'kdforge[lm]'" in data["error"]
