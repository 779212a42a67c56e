"""benchmarks/lm_unseen_eval.py builds exactly the teacher's held-out files that lie beyond the students' text."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

import kdforge
from kdforge.plugins.lm_data import find_files, read_documents, split_documents

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("tokenizers")


def _recipe(path: Path, files: str, max_bytes: int) -> Path:
    data = {"name": "text", "params": {"files": files, "max_file_bytes": 5000, "max_bytes": max_bytes, "seq_len": 16,
                                       "eval_fraction": 0.25, "vocab_size": 300}}
    path.write_text(yaml.safe_dump({"name": path.stem, "data": data}))
    return path


def test_unseen_split_is_the_teachers_held_out_files_past_the_students_text(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("lm_unseen_eval", None)
    import lm_unseen_eval

    data = tmp_path / "data"
    data.mkdir()
    for i in range(60):
        words = " ".join(f"w{(i * 7 + j) % 53}" for j in range(150 + 10 * (i % 5)))
        (data / f"doc_{i:02d}.txt").write_text(words + "\n")
    (data / "doc_big.txt").write_text("x " * 4000)  # over max_file_bytes: in neither run
    files = str(data / "*.txt")
    teacher = _recipe(tmp_path / "teacher.yaml", files, 30_000)
    student = _recipe(tmp_path / "student.yaml", files, 10_000)

    params, names = lm_unseen_eval.unseen_params(teacher, student)

    found = find_files([files], [], 5000)
    teacher_docs = read_documents(found, max_bytes=30_000)
    student_names = {d.name for d in read_documents(found, max_bytes=10_000)}
    teacher_train, teacher_eval = split_documents(teacher_docs, 0.25, 0)
    expected = [d.name for d in teacher_eval if d.name not in student_names]
    assert len(student_names) < len(teacher_docs) < 60 and len(expected) >= 3
    assert names == expected
    assert not set(names) & {d.name for d in teacher_train}

    splits = kdforge.create("dataset", "text", **params, cache_dir=str(tmp_path / "cache"))
    assert splits.info["documents"]["eval"] == len(expected)
    teacher_only = len(teacher_docs) - len(student_names)
    assert splits.info["documents"]["train"] + splits.info["documents"]["eval"] == teacher_only


def test_unseen_split_refuses_recipes_whose_data_differs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("lm_unseen_eval", None)
    import lm_unseen_eval

    teacher = _recipe(tmp_path / "teacher.yaml", str(tmp_path / "a" / "*.txt"), 30_000)
    student = _recipe(tmp_path / "student.yaml", str(tmp_path / "b" / "*.txt"), 10_000)
    with pytest.raises(SystemExit, match="'files'"):
        lm_unseen_eval.unseen_params(teacher, student)
