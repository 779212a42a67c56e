"""benchmarks/lm_unseen_eval.py: the teacher's held-out files beyond the students' text, and how it scores runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import kdforge
from kdforge.plugins.lm_data import find_files, read_documents, split_documents

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("tokenizers")


@pytest.fixture
def unseen(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("lm_unseen_eval", None)
    import lm_unseen_eval

    return lm_unseen_eval


def _corpus(root: Path) -> str:
    for i in range(60):
        folder = root / ("tests" if i % 4 == 0 else "src")  # 'tests/*' is only excluded for the stdlib default
        folder.mkdir(parents=True, exist_ok=True)
        words = " ".join(f"w{(i * 7 + j) % 53}" for j in range(150 + 10 * (i % 5)))
        (folder / f"doc_{i:02d}.txt").write_text(words + "\n")
    (root / "src" / "doc_big.txt").write_text("x " * 4000)  # over max_file_bytes: in neither run
    return str(root / "**" / "*.txt")


def _data(files: str, max_bytes: int, **extra) -> dict:
    return {"name": "text", "params": {"files": files, "max_file_bytes": 5000, "max_bytes": max_bytes, "seq_len": 16,
                                       "eval_fraction": 0.25, "vocab_size": 300, **extra}}


def test_unseen_split_is_the_teachers_held_out_files_past_the_students_text(tmp_path, unseen):
    files = _corpus(tmp_path / "data")
    teacher, student = _data(files, 30_000)["params"], _data(files, 10_000)["params"]

    params, names, counts = unseen.unseen_params(teacher, student)

    found = find_files([files], [], 5000)
    teacher_docs = read_documents(found, max_bytes=30_000)
    student_docs = read_documents(found, max_bytes=10_000)
    student_names = {d.name for d in student_docs}
    teacher_train, teacher_eval = split_documents(teacher_docs, 0.25, 0)
    expected = [d.name for d in teacher_eval if d.name not in student_names]
    assert len(student_names) < len(teacher_docs) < 60 and len(expected) >= 3
    assert any(name.startswith("tests/") for name in expected)
    assert names == expected
    assert counts["teacher"] == {"train": len(teacher_train), "eval": len(teacher_eval)}
    assert counts["student"]["train"] + counts["student"]["eval"] == len(student_docs)

    splits = kdforge.create("dataset", "text", **params, cache_dir=str(tmp_path / "cache"))
    assert splits.info["documents"]["eval"] == len(expected)
    assert splits.info["documents"]["train"] + splits.info["documents"]["eval"] == len(teacher_docs) - len(student_docs)


@pytest.mark.parametrize("change, message", [({"files": "elsewhere/*.txt"}, "'files'"),
                                             ({"max_bytes": 40_000}, "smaller than the teacher's"),
                                             ({"max_files": 3}, "max_files")])
def test_unseen_split_refuses_data_it_cannot_rebuild(tmp_path, unseen, change, message):
    files = _corpus(tmp_path / "data")
    student = {**_data(files, 10_000)["params"], **change}
    with pytest.raises(SystemExit, match=message):
        unseen.unseen_params(_data(files, 30_000)["params"], student)


def test_score_is_the_runs_own_metric_and_zero_against_itself(tmp_path, unseen):
    data = _data(_corpus(tmp_path / "data"), 10_000, cache_dir=str(tmp_path / "cache"))
    recipe = {"name": "tiny", "seed": 0, "data": data, "losses": [{"name": "lm_ce"}],
              "student": {"name": "hf_causal_lm", "params": {"config": {
                  "model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 16}}},
              "optimizer": {"name": "adamw", "params": {"lr": 0.01}},
              "trainer": {"epochs": 1, "batch_size": 16, "progress_bar": False}, "output_dir": str(tmp_path / "tiny")}
    summary = kdforge.run(recipe, overwrite=True)
    run = tmp_path / "tiny"
    splits = kdforge.create("dataset", "text", **data["params"])
    teacher = kdforge.load_student(run).eval()

    result = unseen.score(run, splits, teacher, batch_size=3)

    assert result["perplexity"] == pytest.approx(summary["student/perplexity"], rel=1e-5)
    assert result["accuracy"] == pytest.approx(summary["student/accuracy"], rel=1e-6)
    assert all(abs(result[kind]) < 1e-6 for kind in unseen.MATCH)

    counts = {"student": dict(summary["data/documents"])}
    unseen.check_run(run, splits, counts, {"student": data})
    with pytest.raises(SystemExit, match="documents"):
        unseen.check_run(run, splits, {"student": {"train": 1, "eval": 1}}, {"student": data})
    with pytest.raises(SystemExit, match="neither"):
        unseen.check_run(run, splits, counts, {"student": _data("other/*.txt", 10_000)})
