"""Evaluation: the task's metric sums over the eval split, shared out over processes.

Each process evaluates every ``num_processes``-th sample; shards are padded to the same
number of samples (with repeats that are cut off again before the metrics), so every process
runs the same number of forward passes: a DDP- or FSDP-wrapped model's collectives line up.
The task's per-batch sums stay on the device; one all-reduce and one ``tolist`` give the
totals (with several processes, one small object gather first agrees on the metric names).
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .extensions import EXTRA_HEADS_GROUP, Task
from .forward import step_outputs
from .outputs import ModelOutputs
from .taps import FeatureTaps
from .tasks import IndexedCollate, IndexedDataset, read_batch


class ShardSampler(Sampler[int]):
    """Every ``world``-th index starting at ``rank``, padded to ``ceil(size / world)`` samples.

    Padding repeats a sample, marked as such by a negative index (``-1 - i``); the evaluator
    drops it after the forward pass, so each sample is counted on exactly one process.
    """

    def __init__(self, size: int, rank: int, world: int) -> None:
        self.size, self.rank, self.world = size, rank, world
        self.real = len(range(rank, size, world))

    def __iter__(self) -> Iterator[int]:
        yield from range(self.rank, self.size, self.world)
        repeat = (self.rank % self.size) if self.size else 0
        for _ in range(len(self) - self.real):
            yield -1 - repeat

    def __len__(self) -> int:
        return math.ceil(self.size / self.world) if self.size else 0


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, rank: int, world: int,
                collate_fn: Any = None) -> DataLoader:
    """The eval split's loader for this process."""
    return DataLoader(IndexedDataset(dataset), batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, world),
                      num_workers=num_workers, collate_fn=IndexedCollate(collate_fn))


class Evaluator:
    """Evaluates a model (and extra heads) with the run's task on the eval split."""

    def __init__(self, task: Task, loader: DataLoader | None, accelerator: Any) -> None:
        self.task, self.loader, self.accelerator = task, loader, accelerator

    @torch.no_grad()
    def __call__(self, model: nn.Module, taps: FeatureTaps | None = None,
                 heads: list[nn.Module] = ()) -> dict[str, dict[str, float | None]]:
        """Metrics by head: ``""`` for ``model``, plus each name that ``heads``' ``eval_logits`` return."""
        if self.loader is None:
            return {}
        acc = self.accelerator
        modes = [(m, m.training) for m in (model, *heads)]
        for module, _ in modes:
            module.eval()  # heads too: their BatchNorm must use running statistics
        sums: dict[str, dict[str, torch.Tensor]] = {}
        real = self.loader.sampler.real
        try:
            for loaded in self.loader:
                batch = read_batch(self.task, loaded).to(acc.device)
                with acc.autocast():
                    logits = self.task.forward(model, batch)
                    features = taps.take() if taps is not None else {}
                    keep = min(batch.size, real)  # padding comes last: no device sync to find it
                    real -= keep
                    if keep == 0:
                        continue
                    if keep < batch.size:
                        batch, logits = batch.take(keep), logits[:keep]
                        features = {k: v[:keep] for k, v in features.items()}
                    self._add(sums, "", self.task.eval_batch(logits, batch))
                    if heads:
                        out = step_outputs(ModelOutputs(logits, features), None, [], batch, training=False)
                        for head in heads:
                            for name, head_logits in head.eval_logits(out).items():
                                self._add(sums, f"{EXTRA_HEADS_GROUP}/{name}",
                                          self.task.eval_batch(head_logits, batch))
        finally:
            if taps is not None:
                taps.take()
            for module, mode in modes:
                module.train(mode)
        return self._results(sums)

    @staticmethod
    def _add(sums: dict[str, dict[str, torch.Tensor]], head: str, batch_sums: Mapping[str, torch.Tensor]) -> None:
        into = sums.setdefault(head, {})
        for key, value in batch_sums.items():
            value = value.detach().double()
            into[key] = into[key] + value if key in into else value

    def _results(self, sums: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, float | None]]:
        acc = self.accelerator
        # Every process must reduce the same keys: a process whose share held no labels has none.
        keys = sorted((head, k) for head, values in sums.items() for k in values)
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            keys = sorted({tuple(k) for part in gather_object([keys]) for k in part})
        totals: dict[str, dict[str, float]] = {}
        if keys:
            zero = torch.zeros((), dtype=torch.float64, device=acc.device)
            flat = torch.stack([sums.get(h, {}).get(k, zero).to(acc.device).reshape(()) for h, k in keys])
            if acc.num_processes > 1:
                flat = acc.reduce(flat, reduction="sum")
            for (head, key), value in zip(keys, flat.tolist()):  # the one host sync
                totals.setdefault(head, {})[key] = value
        results = {head: self.task.eval_result(values) for head, values in totals.items()}
        results.setdefault("", self.task.eval_result({}))
        return results
