"""The data objects that flow between the engine and plugins (public contract)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from torch.utils.data import Dataset


@dataclass
class ModelOutputs:
    """What one model produced for a batch: its logits and any tapped features.

    ``log_probs(T)`` is the temperature-softened distribution a loss should distill from:
    ``log_softmax(logits / T)`` for one model; a combined view (several teachers) supplies
    its own rule through ``soften``, e.g. the mean of its members' softened distributions.
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


#: field names a batch always has; a dataset's extra fields may not reuse them
BATCH_FIELDS = ("inputs", "targets", "index")


class Batch(Mapping[str, Any]):
    """One collated batch as named fields: ``inputs``, ``targets``, ``index`` and any extras.

    - ``inputs``: what the models take (a tensor, or a structure of tensors);
    - ``targets``: the labels, or ``None`` when the split carries none;
    - ``index``: a ``LongTensor`` with each sample's position in its dataset, always there;
    - extra fields a dataset returns (masks, sample weights, ...) by name: ``batch["mask"]``
      or ``batch.mask``; ``batch.extras`` holds them as a dict.

    A ``Batch`` is a read-only mapping, so ``dict(batch)`` and ``"mask" in batch`` work.
    """

    __slots__ = ("inputs", "targets", "index", "extras")

    def __init__(self, inputs: Any, targets: Any = None, index: torch.Tensor | None = None,
                 extras: Mapping[str, Any] | None = None) -> None:
        extras = dict(extras or {})
        clash = [k for k in extras if k in BATCH_FIELDS]
        if clash:
            raise ValueError(f"extra batch fields may not be named {clash[0]!r} ({', '.join(BATCH_FIELDS)} are reserved)")
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "extras", extras)

    def __getattr__(self, name: str) -> Any:
        try:
            return object.__getattribute__(self, "extras")[name]
        except KeyError:
            raise AttributeError(f"the batch has no field {name!r} (fields: {', '.join(self)})") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a Batch is read-only; build a new one with Batch.replace(...)")

    def __getitem__(self, name: str) -> Any:
        if name in BATCH_FIELDS:
            return object.__getattribute__(self, name)
        return self.extras[name]

    def __iter__(self) -> Iterator[str]:
        yield "inputs"
        if self.targets is not None:
            yield "targets"
        if self.index is not None:
            yield "index"
        yield from self.extras

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"Batch({', '.join(self)}; {self.size} samples)"

    @property
    def size(self) -> int:
        """Samples in the batch (from the first tensor found in ``inputs``)."""
        return batch_size_of(self.inputs)

    def replace(self, **fields: Any) -> "Batch":
        """A copy with some fields replaced (extras by name)."""
        values = {"inputs": self.inputs, "targets": self.targets, "index": self.index}
        extras = dict(self.extras)
        for name, value in fields.items():
            if name in values:
                values[name] = value
            else:
                extras[name] = value
        return Batch(values["inputs"], values["targets"], values["index"], extras)

    def take(self, n: int) -> "Batch":
        """The batch's first ``n`` samples (every tensor, list and tuple cut along its first dimension)."""
        cut = lambda v: take_first(v, n)  # noqa: E731
        return Batch(cut(self.inputs), cut(self.targets), cut(self.index), {k: cut(v) for k, v in self.extras.items()})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """The batch with every tensor moved to ``device``."""
        move = lambda v: move_to(v, device, non_blocking)  # noqa: E731
        return Batch(move(self.inputs), move(self.targets), move(self.index),
                     {k: move(v) for k, v in self.extras.items()})


def move_to(value: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """``value`` with every tensor inside (mappings, lists, tuples) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, Mapping):
        return {k: move_to(v, device, non_blocking) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(move_to(v, device, non_blocking) for v in value)
    return value


def take_first(value: Any, n: int) -> Any:
    """The first ``n`` samples of a batched value: tensors and sequences cut, mappings and tuples cut inside."""
    if isinstance(value, torch.Tensor):
        return value[:n] if value.ndim else value
    if isinstance(value, Mapping):
        return {k: take_first(v, n) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(take_first(v, n) for v in value)
    if isinstance(value, list):
        return value[:n]
    return value


def batch_size_of(inputs: Any) -> int:
    """Samples in a batch of inputs (a tensor, or a structure of tensors); 0 when none is found."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.ndim else 1
    if isinstance(inputs, Mapping):
        for value in inputs.values():
            size = batch_size_of(value)
            if size:
                return size
        return 0
    if isinstance(inputs, (list, tuple)) and inputs:
        return batch_size_of(inputs[0])
    return 0


@dataclass
class StepOutputs:
    """Everything a loss plugin sees for one training step.

    ``progress`` is ``step / total_steps`` (in [0, 1]). ``step`` counts the optimizer steps
    taken before this one (0-based), ``epoch`` is the current epoch (0-based) of ``epochs``,
    ``steps_per_epoch`` and ``total_steps`` are optimizer steps. ``batch`` has every field of
    the batch (``batch.index``, extras); ``inputs``, ``targets`` and ``index`` repeat its main
    fields for convenience.
    """

    student: ModelOutputs
    teacher: ModelOutputs | None = None
    teachers: list[ModelOutputs] = field(default_factory=list)
    targets: torch.Tensor | None = None
    inputs: Any = None
    progress: float = 0.0
    batch: Batch | None = None
    index: torch.Tensor | None = None
    step: int = 0
    epoch: int = 0
    epochs: int = 1
    steps_per_epoch: int = 1
    total_steps: int = 1
    training: bool = True


@dataclass
class DataSplits:
    """A dataset plugin's product: train and eval splits plus what models need to know.

    Items of ``train`` / ``eval`` are ``(input, target)`` pairs, mappings with an
    ``inputs`` key (``targets`` and any extra fields beside it), or bare inputs (a split
    without labels). A target of ``-1`` marks an unlabeled sample. ``eval`` may be ``None``
    when there is nothing to evaluate on. ``num_classes`` is the size of the models' output
    (classes for classification). ``task`` names the task plugin this data is meant for
    (``None``: the recipe's ``task``, by default ``classification``). ``collate_fn``
    batches a list of items when torch's default collation does not fit (padding, say).
    ``random_transforms`` says that the train split's items draw random numbers (augmentation):
    kdforge then gives every item its own random stream, seeded from the recipe's seed, the
    epoch and the sample index, so that augmentation is the same with any number of workers
    and a resumed run sees exactly the pixels the uninterrupted one did. ``info`` carries
    anything else a dataset wants to tell other plugins (counts of skipped files, say; it is
    copied into ``summary.json`` as ``data/<key>``).
    """

    train: Dataset
    eval: Dataset | None
    num_classes: int
    input_shape: tuple[int, ...]
    task: str | None = None
    collate_fn: Callable[[list[Any]], Any] | None = field(default=None, repr=False)
    info: dict[str, Any] = field(default_factory=dict)
    random_transforms: bool = False

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(d) for d in self.input_shape)
        self.num_classes = int(self.num_classes)


UNLABELED: int = -1
"""Target value that marks an unlabeled sample; ``ce`` ignores it."""
