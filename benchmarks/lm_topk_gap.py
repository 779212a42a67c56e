"""Sparse teacher (token_kd ``top_k``) vs dense on the LM demo: loss gap, storage per token, and a trained student.

After ``make demo-lm`` (runs/lm-teacher, runs/lm-student):

    .venv/bin/python benchmarks/lm_topk_gap.py            # loss gap on the held-out blocks
    .venv/bin/python benchmarks/lm_topk_gap.py --train    # also trains recipes/lm/kd-forward_kl.yaml with top_k 64

The loss gap is measured between the demo's teacher and the baseline student on every
held-out block of the students' data: token_kd with the dense teacher distribution vs its
top-k view (k largest probabilities plus one tail bucket), for each divergence.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import kdforge
from kdforge import ModelOutputs, StepOutputs
from kdforge.plugins.lm_losses import DIVERGENCES, bytes_per_token
from kdforge.plugins.lm_task import LanguageModeling
from kdforge.recipe import load_yaml_file


@torch.no_grad()
def loss_gap(teacher_run: Path, student_run: Path, ks: list[int], batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Mean token_kd over the eval split for the dense teacher and each top-k, per divergence.

    The data is the student's: the text the students are distilled on, with the teacher's
    tokenizer (the demo's teacher was trained on more text, with a larger held-out split).
    """
    recipe = load_yaml_file(student_run / "recipe.yaml")
    splits = kdforge.create("dataset", recipe["data"]["name"], **recipe["data"].get("params", {}))
    teacher, student = kdforge.load_student(teacher_run).eval(), kdforge.load_student(student_run).eval()
    task = LanguageModeling(splits.num_classes)
    losses = {(kind, k): kdforge.create("loss", "token_kd", divergence=kind, top_k=k, num_classes=splits.num_classes)
              for kind in DIVERGENCES for k in [None, *ks]}
    sums = {key: 0.0 for key in losses}
    tokens = 0
    for start in range(0, len(splits.eval), batch_size):
        items = [splits.eval[i] for i in range(start, min(start + batch_size, len(splits.eval)))]
        batch = task.to_batch(splits.collate_fn(items))
        out = StepOutputs(student=ModelOutputs(task.forward(student, batch)),
                          teacher=ModelOutputs(task.forward(teacher, batch)), targets=batch.targets, batch=batch)
        n = int(task.batch_weight(batch))
        tokens += n
        for key, loss in losses.items():
            sums[key] += float(loss(out)) * n
    table: dict[str, dict[str, float]] = {}
    for (kind, k), total in sums.items():
        table.setdefault(kind, {})["dense" if k is None else f"top_{k}"] = total / tokens
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="runs/lm-teacher")
    parser.add_argument("--student", default="runs/lm-student")
    parser.add_argument("--k", type=int, nargs="*", default=[16, 64])
    parser.add_argument("--train", action="store_true", help="also train the forward-KL student with top_k 64")
    args = parser.parse_args()
    table = loss_gap(Path(args.teacher), Path(args.student), args.k)
    vocab = json.loads((Path(args.teacher) / "summary.json").read_text())["data/vocab_size"]
    print(f"token_kd on the held-out blocks, teacher {args.teacher} vs student {args.student} (vocabulary {vocab})")
    cols = ["dense", *[f"top_{k}" for k in args.k]]
    print(f"{'divergence':<16}" + "".join(f"{c:>10}" for c in cols) + "".join(f"{'gap ' + c:>12}" for c in cols[1:]))
    for kind, row in table.items():
        gaps = [(row[c] - row["dense"]) / row["dense"] if row["dense"] else 0.0 for c in cols[1:]]
        print(f"{kind:<16}" + "".join(f"{row[c]:>10.4f}" for c in cols) + "".join(f"{g:>11.2%} " for g in gaps))
    for k in args.k:
        print(f"bytes per token, top_{k} (fp16 log-probs + int32 indices + fp32 tail): {bytes_per_token(k)}; "
              f"dense: {2 * vocab} (bf16), {4 * vocab} (fp32); at a 32k vocabulary {2 * 32000} / {4 * 32000}; "
              f"Qwen2's 151,936 rows: {2 * 151936} / {4 * 151936}")
    if args.train:
        summary = kdforge.run("recipes/lm/kd-forward_kl.yaml", ["losses.0.params.top_k=64", "name=lm-kd-topk64",
                                                                "output_dir=runs/lm-kd-topk64"], overwrite=True)
        dense = json.loads(Path("runs/lm-kd-forward_kl/summary.json").read_text())
        print(f"trained with top_k 64: held-out perplexity {summary['student/perplexity']:.3f} "
              f"(dense forward KL: {dense['student/perplexity']:.3f})")


if __name__ == "__main__":
    main()
