"""Step-time cost of feature taps: the same distillation run with and without taps.

Runs three variants on synthetic 32x32 data (CIFAR-sized) with the CIFAR ResNets and
reports training throughput (samples/s from metrics.jsonl, first epoch dropped as warm-up):

  kd        ce + kd                              (no taps)
  taps      ce + kd + a loss that only taps      (hook cost alone: 3 student + 3 teacher taps)
  attention ce + kd + attention on 3 stages      (hooks plus the attention maps and their loss)

It also times the hooks alone (``isolated``): a bare forward/backward loop over the same
models with and without 3 + 3 taps, outside the engine, interleaved.

Usage: python benchmarks/taps_overhead.py [--student resnet8] [--teacher resnet20] [--repeats 3]

On CPU the engine-level numbers move by +-15% with the allocator's behaviour (holding the
tapped activations changes how often large blocks are freed and re-faulted: we measured the
backward pass itself getting faster); the isolated numbers are the cost of the hooks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

import kdforge

STAGES = ["layer1", "layer2", "layer3"]


class TapOnly(torch.nn.Module):
    """Declares taps and returns zero: measures what capturing features costs."""

    student_taps = STAGES
    teacher_taps = STAGES

    def forward(self, out: kdforge.StepOutputs) -> torch.Tensor:
        return out.student.logits.sum() * 0.0


class _Plugin:
    @kdforge.hookimpl
    def register_losses(self, register):
        register("tap_only", TapOnly)


VARIANTS = {
    "kd": [],
    "taps": [{"name": "tap_only"}],
    "attention": [{"name": "attention", "weight": 1000, "params": {"student_taps": STAGES, "teacher_taps": STAGES}}],
}


def throughput(variant: str, args: argparse.Namespace, workdir: Path) -> float:
    recipe = {
        "name": f"bench-{variant}",
        "data": {"name": "synthetic", "params": {"shape": [3, 32, 32], "num_classes": 100,
                                                 "train_size": args.samples, "eval_size": 64}},
        "teacher": {"name": args.teacher},
        "student": {"name": args.student},
        "losses": [{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9}, *VARIANTS[variant]],
        "optimizer": {"name": "sgd", "params": {"lr": 0.05, "momentum": 0.9}},
        "trainer": {"epochs": 2, "batch_size": args.batch_size, "progress_bar": False, "log_every": 4},
    }
    out = workdir / variant
    kdforge.run(recipe, output_dir=out, overwrite=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/samples_per_second"] for r in records if "train/samples_per_second" in r and r["epoch"] == 2]
    return statistics.mean(rates)


def isolated(args: argparse.Namespace) -> dict[str, float]:
    """ms per training step with and without taps, outside the engine (median of repeats)."""
    import time

    from kdforge.taps import FeatureTaps

    torch.manual_seed(0)
    student = kdforge.create("student", args.student, num_classes=100)
    teacher = kdforge.create("teacher", args.teacher, num_classes=100).eval()
    x, y = torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 100, (args.batch_size,))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01)

    def step(taps: list[FeatureTaps] | None) -> None:
        with torch.no_grad():
            teacher(x)
        logits = student(x)
        for tap in taps or []:
            tap.take()
        torch.nn.functional.cross_entropy(logits, y).backward()
        optimizer.step()
        optimizer.zero_grad()

    times: dict[str, list[float]] = {"no taps": [], "taps": []}
    for repeat in range(2 * args.repeats):
        for mode in (["no taps", "taps"] if repeat % 2 == 0 else ["taps", "no taps"]):
            taps = [FeatureTaps(student, STAGES), FeatureTaps(teacher, STAGES)] if mode == "taps" else None
            for _ in range(3):
                step(taps)
            start = time.perf_counter()
            for _ in range(20):
                step(taps)
            times[mode].append((time.perf_counter() - start) / 20 * 1000)
            for tap in taps or []:
                tap.remove()
    return {mode: statistics.median(values) for mode, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="resnet8")
    parser.add_argument("--teacher", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    kdforge.register_plugin(_Plugin())
    results: dict[str, list[float]] = {v: [] for v in VARIANTS}
    names = list(VARIANTS)
    with tempfile.TemporaryDirectory() as tmp:
        throughput("kd", args, Path(tmp))  # warm-up run, discarded
        for repeat in range(args.repeats):
            # interleaved and rotated, so load drifts and position effects hit every variant alike
            for variant in names[repeat % len(names):] + names[: repeat % len(names)]:
                results[variant].append(throughput(variant, args, Path(tmp)))
    base = statistics.median(results["kd"])
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{args.student} from {args.teacher}, batch {args.batch_size}, {device}; median of {args.repeats}")
    print(f"{'variant':<10} {'samples/s':>10} {'ms/step':>8} {'vs kd':>7}")
    for variant, rates in results.items():
        rate = statistics.median(rates)
        print(f"{variant:<10} {rate:10.1f} {1000 * args.batch_size / rate:8.1f} {100 * (base / rate - 1):+6.1f}%")
    hooks = isolated(args)
    print(f"isolated: {hooks['no taps']:.1f} ms/step without taps, {hooks['taps']:.1f} with 3 + 3 taps "
          f"({100 * (hooks['taps'] / hooks['no taps'] - 1):+.1f}%)")


if __name__ == "__main__":
    main()
