"""The built-in ``classification`` task: logits ``(batch, num_classes)``, top-1 and top-5 accuracy."""

from __future__ import annotations

from typing import Annotated, Mapping

import torch
from pydantic import Field

from kdforge import UNLABELED, Batch, DataSplits, TaskBase, hookimpl


class Classification(TaskBase):
    """Single-label classification: top-1 accuracy (the headline), and top-k when there are >= k classes.

    Targets are class indices; ``-1`` (``kdforge.UNLABELED``) marks a sample without a label,
    which evaluation skips. Models return logits ``(batch, num_classes)``.
    """

    headline = "accuracy"
    higher_is_better = True

    def __init__(self, top_k: Annotated[int, Field(ge=2)] = 5) -> None:
        self.top_k = top_k

    def check_outputs(self, logits: torch.Tensor, batch: Batch, splits: DataSplits) -> None:
        """Logits must be ``(batch, num_classes)`` and targets integer class indices."""
        expected = splits.num_classes
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[1] != expected:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"gives logits of shape {got}; the dataset has {expected} classes, "
                             f"so (batch, {expected}) was expected")
        targets = batch.targets
        if targets is not None:
            integral = isinstance(targets, torch.Tensor) and (
                not targets.dtype.is_floating_point or bool((targets == targets.round()).all()))
            if not integral or targets.ndim != 1:
                got = f"{targets.dtype} {tuple(targets.shape)}" if isinstance(targets, torch.Tensor) else type(targets).__name__
                raise ValueError(f"classification needs one class index per sample as targets (integers, or floats "
                                 f"with integer values), got {got}")

    def has_labels(self, batch: Batch) -> bool:
        """Whether any target is a class index (not ``UNLABELED``)."""
        return batch.targets is not None and bool((batch.targets != UNLABELED).any())

    def eval_batch(self, logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """Labeled samples, and how many of them are right at top-1 (and top-k)."""
        if batch.targets is None:
            return {}
        targets = batch.targets.long()
        labeled = targets != UNLABELED
        sums = {"count": labeled.sum(), "correct": (logits.argmax(dim=-1).eq(targets) & labeled).sum()}
        if logits.shape[-1] >= self.top_k:
            top = logits.topk(self.top_k, dim=-1).indices
            sums[f"correct_top{self.top_k}"] = (top.eq(targets[:, None]).any(dim=-1) & labeled).sum()
        return sums

    def eval_result(self, sums: Mapping[str, float]) -> dict[str, float | None]:
        """``accuracy`` and ``top{k}_accuracy`` over the labeled eval samples (``None`` without any)."""
        count = sums.get("count", 0.0)
        result: dict[str, float | None] = {"accuracy": sums["correct"] / count if count else None}
        if f"correct_top{self.top_k}" in sums:
            result[f"top{self.top_k}_accuracy"] = sums[f"correct_top{self.top_k}"] / count if count else None
        return result


@hookimpl
def register_tasks(register) -> None:
    """Register ``classification``."""
    register("classification", Classification)
