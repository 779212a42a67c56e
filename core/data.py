"""Reusable pieces for dataset plugins: in-memory pairs, the stratified split, partial labels.

The built-in datasets use exactly these, so a custom dataset that calls them splits and
hides labels the same way. The one rule they keep: a teacher's training images never end
up in the eval split, because the split is a pure function of the labels, the fraction and
the seed, and every run (teacher and students) calls it with the same values.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .outputs import UNLABELED


class TensorPairs(Dataset):
    """In-memory ``(inputs[i], targets[i])`` pairs with python-int targets."""

    def __init__(self, inputs: torch.Tensor, targets: Sequence[int]) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
        self.inputs = inputs
        self.targets = [int(t) for t in targets]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.inputs[index], self.targets[index]

    def gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples at ``index`` as one collated batch (what default collation of the items gives)."""
        if getattr(self, "_target_tensor", None) is None:
            self._target_tensor = torch.tensor(self.targets, dtype=torch.long)
        return self.inputs[index], self._target_tensor[index]


def stratified_split(targets: Sequence[int], test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and eval indices of a stratified split (the split scikit-learn's ``train_test_split`` makes).

    Each class keeps its share in both parts; the result depends only on the labels,
    ``test_fraction`` and ``seed``. The built-in ``digits`` dataset is
    ``stratified_split(load_digits().target, 0.3, split_seed)``: 1,257 train and 540 eval
    images at the defaults. Reuse it (same fraction and seed) for every run that shares a
    teacher, so no image the teacher trained on is evaluated as unseen.

    The indices are those of ``train_test_split(range(n), test_size=test_fraction,
    random_state=seed, stratify=targets)`` (a test compares them), computed here without
    importing scikit-learn, whose import costs seconds in every process.
    """
    labels = np.asarray(list(targets))
    n = len(labels)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, not {test_fraction}")
    n_test = math.ceil(test_fraction * n)
    n_train = n - n_test  # as scikit-learn, not floor((1 - f) * n): 0.7 * 90 is 62.999...
    classes, label_ids = np.unique(labels, return_inverse=True)
    counts = np.bincount(label_ids)
    if n_train < len(classes) or n_test < len(classes) or counts.min() < 2:
        raise ValueError(f"a stratified split of {n} samples in {len(classes)} classes needs at least two samples "
                         f"of every class and one per class on each side")
    members = np.split(np.argsort(label_ids, kind="mergesort"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    train_counts = _share_draws(counts, n_train, rng)
    test_counts = _share_draws(counts - train_counts, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for pool, k_train, k_test in zip(members, train_counts, test_counts):
        shuffled = pool.take(rng.permutation(len(pool)), mode="clip")
        train.extend(shuffled[:k_train])
        test.extend(shuffled[k_train:k_train + k_test])
    return rng.permutation(train), rng.permutation(test)


def _share_draws(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """How many of ``draws`` each class gets: its floored proportional share, and the draws left over
    go one each to the classes with the largest fractional parts (ties broken at random)."""
    exact = counts / counts.sum() * draws
    share = np.floor(exact)
    left = int(draws - share.sum())
    fractions = exact - share
    for value in np.unique(fractions)[::-1]:
        if left <= 0:
            break
        (tied,) = np.where(fractions == value)
        take = min(len(tied), left)
        share[rng.choice(tied, size=take, replace=False)] += 1
        left -= take
    return share.astype(int)


def balanced_subset(targets: Sequence[int], n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``n`` labeled samples, spread over the classes as evenly as possible.

    Each class gets ``n // classes`` samples (a class with fewer gets all of them and its
    share goes to the others); the remainder goes to classes picked at random. Negative
    targets (already unlabeled) are never picked. Deterministic given ``seed``: this is the
    ``labeled`` pick of every built-in dataset.
    """
    labels = np.asarray(list(targets), dtype=np.int64)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels[labels >= 0])
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    sizes = np.array([len(p) for p in pools], dtype=np.int64)
    if n > sizes.sum():
        raise ValueError(f"asked for {n} labeled samples but only {int(sizes.sum())} have a label")
    take = np.zeros(len(pools), dtype=np.int64)
    left = int(n)
    order = rng.permutation(len(pools))  # which classes get the remainder
    while left > 0:
        open_classes = [i for i in order if take[i] < sizes[i]]
        share = left // len(open_classes)
        if share == 0:
            for i in open_classes[:left]:
                take[i] += 1
            break
        for i in open_classes:
            add = min(share, int(sizes[i] - take[i]))
            take[i] += add
            left -= add
    chosen = [pool[:k] for pool, k in zip(pools, take)]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


class PartiallyLabeled(Dataset):
    """Wrap a dataset of ``(x, y)`` items so that only the samples in ``keep`` keep their label.

    The others get ``UNLABELED`` (-1) as target, or, with ``drop=True``, are left out
    (the wrapper then holds only the ``keep`` samples, in index order). Works for any
    base dataset; ``targets`` (the effective labels) is available when the base has
    a ``targets`` attribute.
    """

    def __init__(self, base: Dataset, keep: Iterable[int], drop: bool = False) -> None:
        self.base = base
        size = len(base)  # type: ignore[arg-type]
        indices = np.fromiter((int(i) for i in keep), dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= size):
            raise IndexError(f"keep holds indices outside 0..{size - 1}")
        self.labeled_mask = np.zeros(size, dtype=bool)
        self.labeled_mask[indices] = True
        self.drop = bool(drop)
        self.indices = np.flatnonzero(self.labeled_mask)

    def __len__(self) -> int:
        return len(self.indices) if self.drop else len(self.labeled_mask)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if self.drop:
            return self.base[int(self.indices[index])]
        x, y = self.base[index]
        return x, (int(y) if self.labeled_mask[index] else UNLABELED)

    # ReplaysAugmentation and gather, passed on from the base (labels hidden as in __getitem__)
    def __getattr__(self, name: str) -> Any:
        if name in ("augmentation_spec", "draw_augmented", "replay_augmented", "gather") and hasattr(self.base, name):
            return getattr(self, f"_{name}")
        raise AttributeError(name)

    def _gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.drop:
            return self.base.gather(torch.as_tensor(self.indices, dtype=torch.long)[index])
        x, y = self.base.gather(index)
        keep = torch.from_numpy(self.labeled_mask)[index]
        return x, torch.where(keep, y, torch.full_like(y, UNLABELED))

    def _augmentation_spec(self) -> Any:
        return self.base.augmentation_spec()

    def _draw_augmented(self, index: int, generator: torch.Generator) -> tuple[Any, torch.Tensor]:
        item, params = self.base.draw_augmented(self._base_index(index), generator)
        return self._label(index, item), params

    def _replay_augmented(self, index: int, params: torch.Tensor) -> Any:
        return self._label(index, self.base.replay_augmented(self._base_index(index), params))

    def _base_index(self, index: int) -> int:
        return int(self.indices[index]) if self.drop else index

    def _label(self, index: int, item: Any) -> Any:
        if self.drop:
            return item
        x, y = item
        return x, (int(y) if self.labeled_mask[index] else UNLABELED)

    @property
    def targets(self) -> list[int]:
        """The labels this wrapper hands out, ``UNLABELED`` where hidden."""
        base_targets = [int(t) for t in getattr(self.base, "targets")]
        if self.drop:
            return [base_targets[i] for i in self.indices]
        return [t if keep else UNLABELED for t, keep in zip(base_targets, self.labeled_mask)]


def with_labeled(
    base: Dataset, targets: Sequence[int], labeled: int | None, drop_unlabeled: bool, seed: int
) -> Dataset:
    """Apply the built-in datasets' ``labeled`` / ``drop_unlabeled`` params to a training split.

    ``labeled=None`` keeps every label; ``labeled=N`` keeps the labels of the
    ``balanced_subset(targets, N, seed)`` samples and marks the rest ``UNLABELED``, or drops
    them with ``drop_unlabeled``. Only ever apply it to the train split.
    """
    if labeled is None:
        return base
    available = sum(1 for t in targets if int(t) >= 0)
    if labeled > available:
        raise ValueError(
            f"labeled={labeled} is more than the {available} labeled training samples; "
            f"use at most {available} (or leave labeled unset to keep every label)"
        )
    if drop_unlabeled and labeled == 0:
        raise ValueError("labeled=0 with drop_unlabeled=true leaves no training samples")
    keep = balanced_subset(targets, labeled, seed)
    return PartiallyLabeled(base, keep, drop=drop_unlabeled)
