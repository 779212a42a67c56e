"""The KD term's own cost on a tiny student, in a bare loop: the reference for the cached digits ratio.

With the teacher cached, a KD step differs from a student-only step by the KD term's own
math: a second softened ``log_softmax``, the KL and their backward. On the digits demo's
student (``mlp [64]`` on 8x8 images, batch 64) a whole step is under a millisecond of
compute, so that math is a visible share of it, in any implementation. This times a minimal
hand-written step (no kdforge in the loop: forward, loss, backward, AdamW) three ways, in
interleaved rounds:

* ``ce``: masked cross-entropy with the labels (the demo's: 100 of the 1,257 training images are
  labeled, -1 marks the rest), the student-only step;
* ``kd``: T^2 KL at T = 4 against stored float16 teacher logits, nothing else;
* ``ce+kd``: 0.1 CE + 0.9 KD, the demo's loss (and the bench's cached way).

The ``ce+kd / ce`` ratio is what the KD term costs relative to a student-only step on this
workload with no engine around either. Ratios are medians of the round-by-round ratios.

Usage: python benchmarks/kd_term_cost.py [--rounds 9] [--steps 400] [--threads N (default: all cores, as bench.py)]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

import kdforge

TEMPERATURE, CE_WEIGHT, KD_WEIGHT, BATCH = 4.0, 0.1, 0.9, 64


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Time the three steps; print ms per step (median over rounds) and the ratio to ``ce``; return the medians."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=400, help="timed steps per way and round")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    splits = kdforge.create("dataset", "digits", labeled=100)  # recipes/digits/kd.yaml's data
    inputs = torch.stack([splits.train[i][0] for i in range(BATCH)])
    targets = torch.tensor([splits.train[i][1] for i in range(BATCH)])  # -1: unlabeled
    teacher_logits = torch.randn(BATCH, splits.num_classes).half()  # what the cache stores
    student = kdforge.create("student", "mlp", num_classes=splits.num_classes, input_shape=list(inputs.shape[1:]),
                             hidden=[64])
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)

    def ce(logits: torch.Tensor) -> torch.Tensor:
        per_sample = F.cross_entropy(logits, targets.clamp_min(0), reduction="none")
        labeled = (targets >= 0).float()
        return (per_sample * labeled).sum() / labeled.sum().clamp_min(1.0)

    def kd(logits: torch.Tensor) -> torch.Tensor:
        log_q = F.log_softmax(logits / TEMPERATURE, dim=-1)
        log_p = F.log_softmax(teacher_logits.float() / TEMPERATURE, dim=-1)
        return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1).mean() * TEMPERATURE**2

    ways: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "ce": ce, "kd": kd, "ce+kd": lambda z: CE_WEIGHT * ce(z) + KD_WEIGHT * kd(z)}

    def timed(loss_fn: Callable[[torch.Tensor], torch.Tensor], steps: int) -> float:
        started = time.perf_counter()
        for _ in range(steps):
            loss_fn(student(inputs)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return (time.perf_counter() - started) / steps * 1e3

    for fn in ways.values():
        timed(fn, max(args.steps // 4, 1))
    ms: dict[str, list[float]] = {name: [] for name in ways}
    names = list(ways)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            ms[name].append(timed(ways[name], args.steps))
    print(f"{'step':8s} {'ms/step (median)':>17s} {'/ ce, round by round (median)':>31s}")
    medians = {}
    for name in names:
        medians[name] = statistics.median(ms[name])
        ratio = statistics.median(a / b for a, b in zip(ms[name], ms["ce"]))
        print(f"{name:8s} {medians[name]:17.3f} {ratio:31.3f}")
    return medians


if __name__ == "__main__":
    main()
