"""Score the LM demo's runs on held-out files that no run trained on and no recipe was tuned on.

After ``make demo-lm``:

    .venv/bin/python benchmarks/lm_unseen_eval.py    # runs/lm-teacher, lm-student, lm-kd-* by default

The students' learning rates were picked on their own held-out split (10 files), so that
split is no longer an unbiased test. The teacher reads the first 1 MB of the same sorted
files and holds out a quarter of them by the same name hash; the held-out files beyond the
students' first 250 kB were never trained on by any run and never used to choose anything.
This script builds exactly those files with the ``text`` dataset (the students' files
excluded, the byte budget reduced by theirs), packs them with the students' tokenizer (the
teacher's), and refuses a run whose data or tokenizer differs from what it rebuilt (another
recipe, or another Python's standard library, which has other files). It reports each run's
perplexity and next-token accuracy there (the task's own metrics), and how close each run
came to the teacher: the mean per-token forward KL, JSD and reverse KL.
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

import kdforge
from kdforge import ModelOutputs, StepOutputs
from kdforge.plugins.lm_data import _resolve_files, find_files, read_documents, split_documents
from kdforge.plugins.lm_data import text as text_dataset
from kdforge.plugins.lm_task import LanguageModeling
from kdforge.recipe import load_yaml_file

MATCH = ("forward_kl", "jsd", "reverse_kl")
DEFAULT_RUNS = ["runs/lm-teacher", "runs/lm-student", "runs/lm-kd-forward_kl", "runs/lm-kd-jsd", "runs/lm-kd-onpolicy"]
SHARED = ("files", "exclude", "text_key", "max_file_bytes", "eval_fraction", "split_seed", "seq_len")
TEXT_DEFAULTS = {name: p.default for name, p in inspect.signature(text_dataset).parameters.items()}


def _documents(params: dict[str, Any]) -> list[Any]:
    """The documents ``text`` reads with ``params``, in its order (its own file and exclude defaults)."""
    p = {**TEXT_DEFAULTS, **params}
    patterns, excluded, _ = _resolve_files(p["files"], p["exclude"])
    found = find_files(patterns, excluded, p["max_file_bytes"], p["max_files"])
    return read_documents(found, p["text_key"], p["max_bytes"])


def _file_name(document: str) -> str:
    """The file a document came from: a .jsonl line's document is named 'file.jsonl:N'."""
    head, _, line = document.rpartition(":")
    return head if line.isdigit() and head.endswith((".jsonl", ".json")) else document


def _split(params: dict[str, Any], docs: list[Any]) -> tuple[list[Any], list[Any]]:
    p = {**TEXT_DEFAULTS, **params}
    return split_documents(docs, p["eval_fraction"], p["split_seed"])


def unseen_params(teacher: dict[str, Any],
                  student: dict[str, Any]) -> tuple[dict[str, Any], list[str], dict[str, dict]]:
    """``text`` params whose eval split is the teacher's held-out files beyond the students' text.

    ``teacher`` and ``student`` are the two recipes' ``data.params``. Also returns those
    files' names and, for the teacher's and the students' own data, the document counts per
    split that their runs must have recorded (``data/documents``).
    """
    for key in SHARED:
        if teacher.get(key) != student.get(key):
            raise SystemExit(f"the teacher's and students' data differ in {key!r}; the unseen split needs them equal")
    if teacher.get("max_files") is not None or student.get("max_files") is not None:
        raise SystemExit("max_files is not supported: it counts files after the students' files are excluded")
    if not student.get("max_bytes") or not teacher.get("max_bytes") or student["max_bytes"] >= teacher["max_bytes"]:
        raise SystemExit("the students must read a max_bytes prefix smaller than the teacher's")
    seen, teacher_docs = _documents(student), _documents(teacher)
    if [d.name for d in teacher_docs[:len(seen)]] != [d.name for d in seen]:
        raise SystemExit("the students' documents are not the first of the teacher's")
    budget = teacher["max_bytes"] - sum(len(d.text.encode()) for d in seen)
    if budget <= 0 or len(teacher_docs) == len(seen):
        raise SystemExit("the teacher reads no file beyond the students' text")
    _, excluded, _ = _resolve_files(student.get("files"), student.get("exclude"))
    params = dict(student, exclude=list(excluded) + sorted({_file_name(d.name) for d in seen}), max_bytes=budget)
    teacher_train, teacher_eval = _split(teacher, teacher_docs)
    _, unseen = _split(params, _documents(params))
    names = [d.name for d in unseen]
    seen_names = {d.name for d in seen}
    expected = [d.name for d in teacher_eval if d.name not in seen_names]
    if names != expected or set(names) & {d.name for d in teacher_train}:
        raise SystemExit("the rebuilt files are not the teacher's held-out files beyond the students' text")
    if not names:
        raise SystemExit("none of the teacher's held-out files lies beyond the students' text")
    student_train, student_eval = _split(student, seen)
    counts = {"student": {"train": len(student_train), "eval": len(student_eval)},
              "teacher": {"train": len(teacher_train), "eval": len(teacher_eval)}}
    return params, names, counts


def check_run(run: Path, splits: Any, counts: dict[str, dict], recipes: dict[str, dict]) -> None:
    """Refuse a run trained on other data than the recipes' (another recipe, another Python's stdlib) or tokens."""
    data = load_yaml_file(run / "recipe.yaml")["data"]
    summary = json.loads((run / "summary.json").read_text())
    kind = next((k for k, r in recipes.items() if r == data), None)
    if kind is None:
        raise SystemExit(f"{run}: its data is neither the teacher recipe's nor the student recipe's")
    if summary.get("data/documents") != counts[kind]:
        raise SystemExit(f"{run}: it read {summary.get('data/documents')} documents, these files give {counts[kind]} "
                         "(another Python's standard library?)")
    if summary.get("data/tokenizer_sha256") != splits.info["tokenizer"]["tokenizer_json_sha256"]:
        raise SystemExit(f"{run}: its tokenizer is not the one the unseen files were tokenized with")


@torch.no_grad()
def score(run: Path, splits: Any, teacher: torch.nn.Module | None = None,
          batch_size: int = 64) -> dict[str, float | None]:
    """Perplexity, token NLL and next-token accuracy of ``run``'s model on ``splits.eval``.

    With a ``teacher``, also the mean per-token forward KL, JSD (beta 0.5) and reverse KL
    between the teacher and the model (``token_kd``), keyed by divergence.
    """
    model = kdforge.load_student(run).eval()
    task = LanguageModeling(splits.num_classes)
    divergences = {kind: kdforge.create("loss", "token_kd", divergence=kind, num_classes=splits.num_classes)
                   for kind in MATCH} if teacher is not None else {}
    sums: dict[str, float] = {}
    for item in DataLoader(splits.eval, batch_size=batch_size, collate_fn=splits.collate_fn):
        batch = task.to_batch(item)
        logits = task.forward(model, batch)
        for key, value in task.eval_batch(logits, batch).items():
            sums[key] = sums.get(key, 0.0) + float(value)
        if teacher is not None:
            out = StepOutputs(student=ModelOutputs(logits), teacher=ModelOutputs(task.forward(teacher, batch)),
                              targets=batch.targets, batch=batch)
            n = float(task.batch_weight(batch))
            for kind, loss in divergences.items():
                sums[kind] = sums.get(kind, 0.0) + float(loss(out)) * n
    result = task.eval_result(sums)
    result.update({kind: sums[kind] / sums["tokens"] for kind in divergences})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", default=DEFAULT_RUNS)
    parser.add_argument("--teacher", default="runs/lm-teacher", help="run whose model the divergences compare to")
    parser.add_argument("--teacher-recipe", default="recipes/lm/teacher.yaml")
    parser.add_argument("--student-recipe", default="recipes/lm/student.yaml")
    args = parser.parse_args()
    recipes = {kind: load_yaml_file(Path(path))["data"]
               for kind, path in (("teacher", args.teacher_recipe), ("student", args.student_recipe))}
    params, names, counts = unseen_params(recipes["teacher"]["params"], recipes["student"]["params"])
    splits = kdforge.create("dataset", "text", **params)
    tokens = splits.info["tokens"]["eval"]
    if splits.eval is None or not tokens:
        raise SystemExit("the unseen files hold less than one block of tokens")
    for run in dict.fromkeys([args.teacher, *args.runs]):
        check_run(Path(run), splits, counts, recipes)
    teacher = kdforge.load_student(Path(args.teacher)).eval()
    print(f"{len(names)} held-out files, {tokens:,} tokens, that no run trained on and no recipe was tuned on")
    print(f"divergences: mean per token between {args.teacher} and the run (token_kd, the JSD with beta 0.5)")
    print(f"{'run':<24}{'perplexity':>11}{'accuracy':>10}" + "".join(f"{kind:>12}" for kind in MATCH))
    for run in args.runs:
        result = score(Path(run), splits, teacher)
        print(f"{Path(run).name:<24}{result['perplexity']:>11.2f}{result['accuracy']:>9.2%} "
              + "".join(f"{result[kind]:>12.4f}" for kind in MATCH))


if __name__ == "__main__":
    main()
