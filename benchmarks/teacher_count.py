"""Cost per training step of N teachers (an ``ensemble`` of N CIFAR ResNets), N = 0..4.

Synthetic 32x32 data, a resnet8 student, resnet20 teachers, ce + kd (ce alone for N = 0).
Reports training throughput from metrics.jsonl (second epoch), median over repeats, with
the variants interleaved and rotated.

Usage: python benchmarks/teacher_count.py [--max-teachers 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

import kdforge


def throughput(n: int, args: argparse.Namespace, workdir: Path) -> float:
    recipe: dict = {
        "name": f"bench-{n}-teachers",
        "data": {"name": "synthetic", "params": {"shape": [3, 32, 32], "num_classes": 100,
                                                 "train_size": args.samples, "eval_size": 64}},
        "student": {"name": args.student},
        "losses": [{"name": "ce"}],
        "optimizer": {"name": "sgd", "params": {"lr": 0.05, "momentum": 0.9}},
        "trainer": {"epochs": 2, "batch_size": args.batch_size, "progress_bar": False, "log_every": 4},
    }
    if n:
        recipe["teacher"] = {"name": "ensemble", "params": {"teachers": [{"name": args.teacher}] * n}}
        recipe["losses"] = [{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9}]
    out = workdir / str(n)
    kdforge.run(recipe, output_dir=out, overwrite=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.mean(r["train/samples_per_second"] for r in records if r.get("epoch") == 2 and "train/samples_per_second" in r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="resnet8")
    parser.add_argument("--teacher", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--max-teachers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    counts = list(range(args.max_teachers + 1))
    results: dict[int, list[float]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory() as tmp:
        throughput(1, args, Path(tmp))  # warm-up, discarded
        for repeat in range(args.repeats):
            for n in counts[repeat % len(counts):] + counts[: repeat % len(counts)]:
                results[n].append(throughput(n, args, Path(tmp)))
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{args.student} student, {args.teacher} teachers, batch {args.batch_size}, {device}; median of {args.repeats}")
    base = 1000 * args.batch_size / statistics.median(results[0])
    print(f"{'teachers':>8} {'samples/s':>10} {'ms/step':>8} {'+ms vs 0':>9}")
    for n in counts:
        ms = 1000 * args.batch_size / statistics.median(results[n])
        print(f"{n:>8} {statistics.median(results[n]):10.1f} {ms:8.1f} {ms - base:+9.1f}")


if __name__ == "__main__":
    main()
