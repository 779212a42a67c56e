"""Training statistics between log intervals, kept on the device: no host sync per step.

``LossStats`` adds up the loss terms of every micro-batch and remembers the first optimizer
step at which any of them was not finite. ``read`` is the one host sync of a log interval:
one gather carries the means, that step, and whether any process was interrupted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class WindowReport:
    """What ``LossStats.read`` found, reduced over all processes."""

    means: list[float]  # total first, then one per term
    bad_step: int | None  # the first step with a non-finite term (or gradient), or None
    bad_terms: list[bool]  # which of (total, *terms) were non-finite at that step
    bad_gradient: bool  # the gradient norm was non-finite (the loss values were not)
    grad_norm: float | None  # the mean gradient norm, when trainer.max_grad_norm computes it
    interrupted: bool
    samples: int
    seconds: float


class LossStats:
    """Per-term loss sums and non-finite tracking over a log interval, on ``device``."""

    def __init__(self, terms: int, device: torch.device | str) -> None:
        self.device = device
        self.sums = torch.zeros(terms + 1, device=device)
        self.bad_step = torch.full((), -1.0, device=device)
        self.bad_terms = torch.zeros(terms + 1, device=device)
        self.grad_norm = torch.zeros((), device=device)
        self.bad_gradient = torch.zeros((), dtype=torch.bool, device=device)
        self.step_of_last = torch.zeros((), device=device)
        self.norm_steps = 0
        self.batches = 0
        self.samples = 0
        self.started = time.perf_counter()

    def add(self, total: torch.Tensor, values: list[torch.Tensor], step: torch.Tensor, samples: int) -> None:
        """Add one micro-batch's total and term values; ``step`` is the step number on the device."""
        self.step_of_last = step
        row = torch.stack([total.detach().float(), *values])
        self.sums += row
        bad = ~torch.isfinite(row)
        first = bad.any() & (self.bad_step < 0)
        self.bad_step = torch.where(first, step, self.bad_step)
        self.bad_terms = torch.where(first, bad.float(), self.bad_terms)
        self.batches += 1
        self.samples += samples

    def add_grad_norm(self, norm: torch.Tensor) -> None:
        """The step's gradient norm (``trainer.max_grad_norm`` computes it): logged, and a non-finite one stops."""
        norm = norm.detach().float().to(self.device)
        self.grad_norm += norm
        self.norm_steps += 1
        first = ~torch.isfinite(norm) & (self.bad_step < 0)
        self.bad_step = torch.where(first, self.step_of_last, self.bad_step)
        self.bad_terms = torch.where(first, torch.zeros_like(self.bad_terms), self.bad_terms)
        self.bad_gradient = self.bad_gradient | first

    def read(self, accelerator, interrupted: bool) -> WindowReport:
        """Reduce over processes (one gather, one host sync) and start a new interval."""
        means = self.sums / max(self.batches, 1)
        extra = torch.stack([self.grad_norm / max(self.norm_steps, 1), self.bad_gradient.float(),
                             torch.tensor(float(interrupted), device=self.device)])
        flags = torch.cat([means, self.bad_step.reshape(1), self.bad_terms, extra])
        rows = accelerator.gather(flags.reshape(1, -1)).tolist()
        n = len(means)
        values = [sum(r[i] for r in rows) / len(rows) for i in range(n)]
        bad = [(r[n], r[n + 1: 2 * n + 1], r[2 * n + 2]) for r in rows if r[n] >= 0]
        bad_step, bad_terms, bad_gradient = (None, [False] * n, False)
        if bad:
            step, terms, gradient = min(bad, key=lambda item: item[0])
            bad_step, bad_terms, bad_gradient = int(step), [t > 0 for t in terms], gradient > 0
        norm = sum(r[2 * n + 1] for r in rows) / len(rows) if self.norm_steps else None
        report = WindowReport(values, bad_step, bad_terms, bad_gradient, norm, any(r[-1] > 0 for r in rows),
                              self.samples * accelerator.num_processes, max(time.perf_counter() - self.started, 1e-9))
        self.sums.zero_()
        self.grad_norm.zero_()
        self.norm_steps = 0
        self.batches, self.samples, self.started = 0, 0, time.perf_counter()
        return report
