"""Per-step cost of kdforge's training step against a hand-written PyTorch KD loop, side by side.

Both run the same models (the student starts from the same weights), the same data, the
same batches in the same order, ce + T^2 KL (T=4): the first step's loss is printed for each
so it is visibly the same work. Rounds alternate which goes first; each round times N
optimizer steps after a warm-up; the table gives the median ms per step and the ratio.

Workloads: ``digits`` (the demo: mlp [64] student, small_cnn teacher, batch 64) and
``resnet`` (torchvision resnet18 student, resnet50 teacher, CIFAR-shaped synthetic 32x32
data, batch 64, 100 classes).

Usage: python benchmarks/engine_overhead.py [--workloads digits resnet] [--rounds 5] [--steps 10]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

import kdforge
from kdforge.build import build_run
from kdforge.loop import prepare_session, train_step, windows
from kdforge.recipe import load_recipe
from kdforge.runner import install_taps, make_accelerator
from kdforge.stats import LossStats

WORKLOADS: dict[str, dict[str, Any]] = {
    "digits": {
        "data": {"name": "digits"},
        "teacher": {"name": "small_cnn", "params": {"channels": [32, 64]}},
        "student": {"name": "mlp", "params": {"hidden": [64]}},
    },
    "resnet": {
        "data": {"name": "synthetic", "params": {"shape": [3, 32, 32], "num_classes": 100, "train_size": 2048,
                                                 "eval_size": 0}},
        "teacher": {"name": "torchvision", "params": {"arch": "resnet50"}},
        "student": {"name": "torchvision", "params": {"arch": "resnet18"}},
    },
}


def recipe_for(workload: str, out: Path) -> dict[str, Any]:
    return {"name": f"overhead-{workload}", **WORKLOADS[workload],
            "losses": [{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9, "params": {"temperature": 4.0}}],
            "optimizer": {"name": "sgd", "params": {"lr": 0.01, "momentum": 0.9}},
            "trainer": {"epochs": 1000, "batch_size": 64, "progress_bar": False, "log_every": 10_000},
            "output_dir": str(out)}


class KdforgeSteps:
    """kdforge's own step function on a prepared session (no evaluation, no checkpoints)."""

    def __init__(self, recipe: dict[str, Any], run_dir: Path) -> None:
        parsed = load_recipe(recipe)
        self.built = build_run(parsed)
        self.initial = copy.deepcopy(self.built.student.state_dict())
        taps = install_taps(self.built)
        self.session = prepare_session(self.built, make_accelerator(parsed, run_dir), run_dir, *taps, None)
        self.session.stats = LossStats(len(self.session.terms), "cpu")
        self.session.step_tensor = torch.ones(())
        self.batches = self._batches()

    def _batches(self):
        epoch = 0
        while True:
            self.session.train_loader.set_epoch(epoch)
            yield from windows(iter(self.session.train_loader), self.built.task, 1)
            epoch += 1

    def step(self) -> None:
        train_step(self.session, next(self.batches))

    def first_loss(self) -> float:
        return float(self.session.stats.sums[0])


class HandWrittenSteps:
    """The loop a user would write: the same models and batches, no framework."""

    def __init__(self, kd: KdforgeSteps) -> None:
        self.student = copy.deepcopy(kd.built.student)
        self.student.load_state_dict(kd.initial)
        self.teacher = copy.deepcopy(kd.built.teacher).eval().requires_grad_(False)
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr=0.01, momentum=0.9)
        # the same sample order as kdforge's first epoch, so both take the same first step
        kd.session.train_loader.set_epoch(0)
        order = [int(i) for loaded in kd.session.train_loader for i in loaded[0]]
        loader = torch.utils.data.DataLoader(kd.built.splits.train, batch_size=64, sampler=order)
        self.loader, self.batches, self.losses = loader, self._batches(loader), []

    @staticmethod
    def _batches(loader):
        while True:
            yield from loader

    def step(self) -> None:
        x, y = next(self.batches)
        with torch.no_grad():
            t = self.teacher(x)
        s = self.student(x)
        kd = F.kl_div(F.log_softmax(s / 4, -1), F.log_softmax(t / 4, -1), reduction="batchmean", log_target=True) * 16
        loss = 0.1 * F.cross_entropy(s, y) + 0.9 * kd
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if not self.losses:
            self.losses.append(loss.item())


def timed(step: Callable[[], None], n: int) -> float:
    """Milliseconds per step over ``n`` steps."""
    start = time.perf_counter()
    for _ in range(n):
        step()
    return 1000 * (time.perf_counter() - start) / n


def run(workload: str, rounds: int, steps: int, workdir: Path) -> dict[str, Any]:
    kd = KdforgeSteps(recipe_for(workload, workdir / workload), workdir / workload)
    hand = HandWrittenSteps(kd)
    kd.step()
    hand.step()  # warm-up, and the first losses
    first = {"kdforge": kd.first_loss(), "hand-written": hand.losses[0]}
    times: dict[str, list[float]] = {"kdforge": [], "hand-written": []}
    ways = [("kdforge", kd.step), ("hand-written", hand.step)]
    for r in range(rounds):
        for name, step in (ways if r % 2 == 0 else ways[::-1]):
            times[name].append(timed(step, steps))
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"workload": workload, "first_loss": first, "ms_per_step": times, "median_ms": median,
            "ratio": median["kdforge"] / median["hand-written"],
            "overhead_ms": median["kdforge"] - median["hand-written"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for workload in args.workloads:
            results.append(run(workload, args.rounds, args.steps, Path(tmp)))
    print(f"{'workload':10} {'first loss (kdforge / hand)':30} {'kdforge ms/step':>16} {'hand ms/step':>13} "
          f"{'kdforge/hand':>13} {'hand/kdforge':>13}")
    for r in results:
        losses = f"{r['first_loss']['kdforge']:.5f} / {r['first_loss']['hand-written']:.5f}"
        print(f"{r['workload']:10} {losses:30} {r['median_ms']['kdforge']:16.2f} {r['median_ms']['hand-written']:13.2f} "
              f"{r['ratio']:13.3f} {1 / r['ratio']:13.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
