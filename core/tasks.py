"""``TaskBase``: the usual batch handling for task plugins, and the indexed data loading.

A task plugin (``register_tasks``) owns how a collated item becomes a ``Batch``, how a
model is called on it, what its outputs must look like, and the evaluation metrics. The
engine adds each sample's ``index`` to every batch itself, by wrapping the dataset.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from .outputs import BATCH_FIELDS, Batch, DataSplits, batch_size_of


class BatchError(ValueError):
    """A dataset item that cannot be read as a batch without guessing (reported in the dry run)."""


class TaskBase:
    """Defaults for a task plugin: subclass it and implement the metrics.

    Items are read as ``(inputs, targets)`` pairs, bare inputs (no labels), or mappings
    with an ``inputs`` key, an optional ``targets`` key and extra fields by name; a mapping
    without ``inputs`` is the inputs as a whole (kdforge 0.1 did the same). A tuple of three
    or more is refused (name the fields with a mapping instead), as is a mapping with
    ``targets`` but no ``inputs``, or with a field called ``index`` (the engine's). The model
    is called as ``model(batch.inputs)``; an output with a ``logits`` attribute (Hugging Face
    models) gives its logits. A batch weighs its number of samples.
    """

    headline: str = "loss"
    higher_is_better: bool = False

    def to_batch(self, item: Any) -> Batch:
        """A collated item as a ``Batch``."""
        if isinstance(item, Mapping):
            if "inputs" not in item and "targets" in item:
                raise BatchError(f"its items are mappings with the keys {sorted(map(str, item))}: 'targets' without "
                                 "'inputs'; name what the model takes 'inputs'")
            if "inputs" not in item:
                return Batch(dict(item))
            if "index" in item:
                raise BatchError("its items have an 'index' field; kdforge adds each sample's index itself, "
                                 "so rename that field")
            extras = {k: v for k, v in item.items() if k not in BATCH_FIELDS}
            return Batch(item["inputs"], item.get("targets"), None, extras)
        if isinstance(item, (list, tuple)):
            if len(item) == 1:
                return Batch(item[0])
            if len(item) == 2:
                return Batch(item[0], item[1])
            raise BatchError(f"its items are {len(item)}-tuples; kdforge reads (inputs, targets) pairs. "
                             "Return a mapping such as {'inputs': x, 'targets': y, 'mask': m} to pass more fields")
        return Batch(item)

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """``model(batch.inputs)``, or its ``.logits`` when the model returns an output object."""
        output = model(batch.inputs)
        logits = getattr(output, "logits", None)
        return logits if isinstance(logits, torch.Tensor) else output

    def check_outputs(self, logits: torch.Tensor, batch: Batch, splits: DataSplits) -> None:
        """Accept any tensor with one row per sample."""
        if not isinstance(logits, torch.Tensor) or logits.ndim == 0 or logits.shape[0] != batch.size:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"gives outputs of shape {got} for a batch of {batch.size} samples")

    def batch_weight(self, batch: Batch) -> int | torch.Tensor:
        """The batch's samples."""
        return int(batch.index.numel()) if batch.index is not None else batch.size

    def has_labels(self, batch: Batch) -> bool:
        """Whether any sample of the batch has a label (the dry run looks for one)."""
        return batch.targets is not None

    def eval_batch(self, logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """No metrics by default."""
        return {}

    def eval_result(self, sums: Mapping[str, float]) -> dict[str, float | None]:
        """No metrics by default."""
        return {}


class IndexedDataset(Dataset):
    """Items of ``base`` paired with their position: ``(index, item)``.

    With a ``seed``, each item is made under its own random stream (torch, NumPy and
    ``random``), seeded from the seed, the epoch and the index, and the caller's streams are
    left as they were: augmentation then depends on nothing else (not on the worker that
    loads the item, nor on the order, nor on a resume). The epoch lives in shared memory, so
    ``set_epoch`` reaches persistent worker processes too.
    """

    def __init__(self, base: Dataset, seed: int | None = None, cache: Any = None) -> None:
        self.base = base
        self.seed = seed
        self.cache = cache  # a TeacherCache: items come with the teacher's stored outputs (and replayed views)
        needs_epoch = seed is not None or cache is not None
        self.epoch = torch.zeros(1, dtype=torch.long).share_memory_() if needs_epoch else None

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next items are drawn for."""
        if self.epoch is not None:
            self.epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitems__(self, indices: list[int]) -> Any:
        """A whole batch at once, when the data is in memory (``gather``) and drawn without randomness.

        torch's DataLoader calls this instead of ``__getitem__`` per sample; what it returns goes
        to ``IndexedCollate`` as it is.
        """
        gather = getattr(self.base, "gather", None)
        if not callable(gather) or self.seed is not None and self.cache is None:
            return [self[i] for i in indices]
        index = torch.tensor(indices, dtype=torch.long)
        real = torch.where(index >= 0, index, -1 - index)
        if self.cache is None:
            return Gathered((index, gather(real)))
        if self.cache.params is not None:  # replayed augmentation: per sample
            return [self[i] for i in indices]
        rows = real.numpy()
        return Gathered((index, gather(real), self.cache.rows(rows, self._views(rows))))

    def _views(self, rows: np.ndarray) -> np.ndarray:
        """The stored view each of ``rows`` is trained on this epoch (all 0 with one view: no Python per sample)."""
        views = self.cache.views
        if views == 1:
            return np.zeros(len(rows), dtype=np.int64)
        from .cache import view_of

        seed, epoch = self.seed or 0, int(self.epoch[0])
        return np.fromiter((view_of(seed, epoch, i, views) for i in rows.tolist()), dtype=np.int64, count=len(rows))

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        # a negative index -1 - i is sample i repeated to pad an evaluation shard: the batch keeps the mark
        real = index if index >= 0 else -1 - index
        if self.cache is not None:
            return self._cached(real)
        if self.seed is None:
            return index, self.base[real]
        return index, self._seeded(real)

    def _cached(self, index: int) -> tuple[int, Any, Any]:
        """The sample as one of its stored views (replayed exactly), with the teacher's outputs for it."""
        from .cache import view_of

        cache = self.cache
        view = view_of(self.seed or 0, int(self.epoch[0]), index, cache.views)
        if cache.params is not None:
            item = self.base.replay_augmented(index, torch.from_numpy(np.array(cache.params[index, view])))
        else:
            item = self.base[index]
        return index, item, cache.row(index, view)

    def _seeded(self, index: int) -> Any:
        import random

        import numpy as np

        stream = sample_seed(self.seed, int(self.epoch[0]), index)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream)
            random.seed(stream)
            np.random.seed(stream % 2**32)
            try:
                return self.base[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample in one epoch, well spread over (seed, epoch, index)."""
    import hashlib

    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class Gathered(tuple):
    """A batch ``IndexedDataset.__getitems__`` gathered at once: already collated."""


class IndexedCollate:
    """Collate ``(index, item)`` pairs into ``(LongTensor of indices, collated items)``."""

    def __init__(self, collate: Callable[[list[Any]], Any] | None = None) -> None:
        self.collate = collate or default_collate

    def __call__(self, samples: Sequence[tuple[Any, ...]]) -> tuple[Any, ...]:
        if isinstance(samples, Gathered):
            return tuple(samples)
        index = torch.tensor([s[0] for s in samples], dtype=torch.long)
        collated = self.collate([s[1] for s in samples])
        if len(samples[0]) == 2:
            return index, collated
        return index, collated, default_collate([s[2] for s in samples])  # the teacher's cached outputs


def read_batch(task: Any, loaded: tuple[Any, ...]) -> Batch:
    """A loaded ``(index, item)`` pair as the task's ``Batch``, with ``index`` set (and cached teacher outputs)."""
    from .cache import BATCH_FIELD

    batch = task.to_batch(loaded[1])
    if BATCH_FIELD in batch.extras:
        raise BatchError(f"its items have a field {BATCH_FIELD!r}, which kdforge uses for the teacher cache; rename it")
    batch = batch.replace(index=loaded[0])
    return batch.replace(**{BATCH_FIELD: loaded[2]}) if len(loaded) == 3 else batch


__all__ = ["BatchError", "IndexedCollate", "IndexedDataset", "TaskBase", "batch_size_of", "read_batch"]
