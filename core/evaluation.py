"""Evaluation: the task's metric sums over the eval split, shared out over processes, one host sync.

Each process evaluates every ``num_processes``-th sample (no sample twice, none padded in),
adds the task's per-batch sums on the device, and one all-reduce plus one ``tolist`` gives
the totals. Extra heads that losses report (``ExtraOutputs``) are judged by the same task.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .extensions import Task
from .forward import step_outputs
from .outputs import ModelOutputs
from .taps import FeatureTaps
from .tasks import IndexedCollate, IndexedDataset, read_batch


class ShardSampler(Sampler[int]):
    """Every ``world``-th index starting at ``rank``: each sample on exactly one process."""

    def __init__(self, size: int, rank: int, world: int) -> None:
        self.size, self.rank, self.world = size, rank, world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world))


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
        try:
            for loaded in self.loader:
                batch = read_batch(self.task, loaded).to(acc.device)
                with acc.autocast():
                    logits = self.task.forward(model, batch)
                    features = taps.take() if taps is not None else {}
                    self._add(sums, "", self.task.eval_batch(logits, batch))
                    if heads:
                        out = step_outputs(ModelOutputs(logits, features), None, [], batch, training=False)
                        for head in heads:
                            for name, head_logits in head.eval_logits(out).items():
                                self._add(sums, name, self.task.eval_batch(head_logits, batch))
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
        # Every process must reduce the same keys: a process whose share held no batch has none.
        keys = sorted((head, k) for head, values in sums.items() for k in values)
        if acc.num_processes > 1:
            keys = sorted({tuple(k) for part in _gather_objects(acc, keys) for k in part})
        flat = torch.stack([sums.get(h, {}).get(k, torch.zeros((), dtype=torch.float64, device=acc.device))
                            .to(acc.device).reshape(()) for h, k in keys]) if keys else None
        totals: dict[str, dict[str, float]] = {}
        if flat is not None:
            if acc.num_processes > 1:
                flat = acc.reduce(flat, reduction="sum")
            for (head, key), value in zip(keys, flat.tolist()):  # the one host sync
                totals.setdefault(head, {})[key] = value
        results = {head: self.task.eval_result(values) for head, values in totals.items()}
        results.setdefault("", self.task.eval_result({}))
        return results


def _gather_objects(accelerator: Any, value: Any) -> list[Any]:
    from accelerate.utils import gather_object

    return gather_object([value])
