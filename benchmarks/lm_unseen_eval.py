"""Score the LM demo's runs on held-out files that no run trained on and no recipe was tuned on.

After ``make demo-lm``:

    .venv/bin/python benchmarks/lm_unseen_eval.py    # runs/lm-teacher, lm-student, lm-kd-* by default

The students' learning rates were picked on their own held-out split (10 files), so that
split is no longer an unbiased test. The teacher reads the first 1 MB of the same sorted
files and holds out a quarter of them by the same name hash; the held-out files beyond the
students' first 250 kB were never trained on by any run and never used to choose anything.
This script builds exactly those files with the ``text`` dataset (the students' files
excluded, the byte budget reduced by theirs), packs them with the teacher's tokenizer, and
reports each run's perplexity and next-token accuracy there (the task's own metrics), and how
close each run came to the teacher: the mean per-token forward KL, JSD and reverse KL.
"""

from __future__ import annotations

import argparse
import os
import sysconfig
from pathlib import Path
from typing import Any

import torch

import kdforge
from kdforge import ModelOutputs, StepOutputs
from kdforge.plugins.lm_data import STDLIB_EXCLUDE, find_files, read_documents, split_documents
from kdforge.plugins.lm_task import LanguageModeling
from kdforge.recipe import load_yaml_file

MATCH = ("forward_kl", "jsd", "reverse_kl")
DEFAULT_RUNS = ["runs/lm-teacher", "runs/lm-student", "runs/lm-kd-forward_kl", "runs/lm-kd-jsd", "runs/lm-kd-onpolicy"]


def _documents(params: dict[str, Any]) -> list[Any]:
    patterns = params.get("files") or [os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py")]
    found = find_files([patterns] if isinstance(patterns, str) else patterns, params.get("exclude", STDLIB_EXCLUDE),
                       params.get("max_file_bytes"), params.get("max_files"))
    return read_documents(found, params.get("text_key", "text"), params.get("max_bytes"))


def unseen_params(teacher_recipe: Path, student_recipe: Path) -> tuple[dict[str, Any], list[str]]:
    """``text`` params whose eval split is the teacher's held-out files beyond the students' text, and their names."""
    teacher = load_yaml_file(teacher_recipe)["data"]["params"]
    student = load_yaml_file(student_recipe)["data"]["params"]
    for key in ("files", "exclude", "max_file_bytes", "eval_fraction", "split_seed", "seq_len"):
        if teacher.get(key) != student.get(key):
            raise SystemExit(f"the teacher's and students' data differ in {key!r}; the unseen split needs them equal")
    seen = _documents(student)
    seen_bytes = sum(len(d.text.encode()) for d in seen)
    params = dict(student, exclude=list(teacher.get("exclude", STDLIB_EXCLUDE)) + [d.name for d in seen],
                  max_bytes=teacher["max_bytes"] - seen_bytes)
    _, teacher_eval = split_documents(_documents(teacher), teacher.get("eval_fraction", 0.1), teacher.get("split_seed", 0))
    _, unseen = split_documents(_documents(params), params.get("eval_fraction", 0.1), params.get("split_seed", 0))
    names = [d.name for d in unseen]
    assert set(names) <= {d.name for d in teacher_eval}, "an unseen file is not among the teacher's held-out files"
    assert not set(names) & {d.name for d in seen}, "an unseen file is among the students' files"
    return params, names


@torch.no_grad()
def score(run: Path, splits: Any, teacher: torch.nn.Module | None = None, batch_size: int = 64) -> dict[str, float | None]:
    """Perplexity, token NLL and next-token accuracy of ``run``'s model on ``splits.eval``.

    With a ``teacher``, also the mean per-token forward KL, JSD (beta 0.5) and reverse KL
    between the teacher and the model (``token_kd``), keyed by divergence.
    """
    model = kdforge.load_student(run).eval()
    task = LanguageModeling(splits.num_classes)
    divergences = {kind: kdforge.create("loss", "token_kd", divergence=kind, num_classes=splits.num_classes)
                   for kind in MATCH} if teacher is not None else {}
    sums: dict[str, float] = {}
    for start in range(0, len(splits.eval), batch_size):
        items = [splits.eval[i] for i in range(start, min(start + batch_size, len(splits.eval)))]
        batch = task.to_batch(splits.collate_fn(items))
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
    params, names = unseen_params(Path(args.teacher_recipe), Path(args.student_recipe))
    splits = kdforge.create("dataset", "text", **params)
    teacher = kdforge.load_student(Path(args.teacher)).eval()
    tokens = splits.info["tokens"]["eval"]
    print(f"{len(names)} held-out files, {tokens:,} tokens, that no run trained on and no recipe was tuned on")
    print(f"divergences: mean per token between {args.teacher} and the run (token_kd, the JSD with beta 0.5)")
    print(f"{'run':<24}{'perplexity':>11}{'accuracy':>10}" + "".join(f"{kind:>12}" for kind in MATCH))
    for run in args.runs:
        result = score(Path(run), splits, teacher)
        print(f"{Path(run).name:<24}{result['perplexity']:>11.2f}{result['accuracy']:>9.2%} "
              + "".join(f"{result[kind]:>12.4f}" for kind in MATCH))


if __name__ == "__main__":
    main()
