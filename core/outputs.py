"""The data objects that flow between the engine and plugins (public contract)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils.data import Dataset


@dataclass
class ModelOutputs:
    """What one model produced for a batch: its logits and any tapped features.

    ``log_probs(T)`` is the temperature-softened distribution a loss should distill from:
    ``log_softmax(logits / T)`` for one model; a combined view (an ensemble) supplies its
    own rule, e.g. the mean of its members' softened distributions (Hinton et al. 2015).
    """

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    soften: Callable[[float], torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def log_probs(self, temperature: float = 1.0) -> torch.Tensor:
        """Float32 log-probabilities of the softened distribution at ``temperature``."""
        if self.soften is not None:
            return self.soften(float(temperature))
        return torch.log_softmax(self.logits.float() / float(temperature), dim=-1)

    def probs(self, temperature: float = 1.0) -> torch.Tensor:
        """Float32 probabilities of the softened distribution at ``temperature``."""
        return self.log_probs(temperature).exp()


@dataclass
class StepOutputs:
    """Everything a loss plugin sees for one training step."""

    student: ModelOutputs
    teacher: ModelOutputs | None = None
    teachers: list[ModelOutputs] = field(default_factory=list)
    targets: torch.Tensor | None = None
    inputs: Any = None
    progress: float = 0.0


@dataclass
class DataSplits:
    """A dataset plugin's product: train and eval splits plus what models need to know.

    Items of ``train`` / ``eval`` are ``(input, target)`` pairs; a target of ``-1``
    marks an unlabeled sample. A split whose items are bare inputs (or 1-tuples)
    is unlabeled as a whole. ``eval`` may be ``None`` when there is nothing to
    evaluate on.
    """

    train: Dataset
    eval: Dataset | None
    num_classes: int
    input_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(d) for d in self.input_shape)
        self.num_classes = int(self.num_classes)


UNLABELED: int = -1
"""Target value that marks an unlabeled sample; ``ce`` ignores it."""
