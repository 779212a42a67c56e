"""Built-in dataset plugins: ``digits``, ``cifar10``, ``cifar100``, ``image_folder``, ``synthetic``.

Every factory returns a ``kdforge.DataSplits`` whose items are ``(float32 tensor, int)``
pairs. The ``labeled`` / ``drop_unlabeled`` params (semi-supervised distillation) are
shared: ``labeled=N`` keeps the labels of N class-balanced training samples and marks
the rest ``UNLABELED`` (-1); ``drop_unlabeled`` removes the unlabeled ones instead.
Nothing is ever downloaded unless a factory's ``download`` param is true.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Iterable, Sequence

import numpy as np
import torch
from pydantic import Field
from torch.utils.data import Dataset

from kdforge import UNLABELED, DataSplits, RecipeError, hookimpl

__all__ = [
    "PartiallyLabeled",
    "SyntheticClasses",
    "TensorPairs",
    "balanced_subset",
    "cifar10",
    "cifar100",
    "digits",
    "image_folder",
    "register_datasets",
    "synthetic",
    "with_labeled",
]

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# Shared annotations: pydantic checks recipe params against these.
Labeled = Annotated[int, Field(ge=0)] | None
Seed = Annotated[int, Field(ge=0)]
Stats = Annotated[list[float], Field(min_length=3, max_length=3)]


# -- reusable datasets and helpers ------------------------------------------------------
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

    @property
    def targets(self) -> list[int]:
        """The labels this wrapper hands out, ``UNLABELED`` where hidden."""
        base_targets = [int(t) for t in getattr(self.base, "targets")]
        if self.drop:
            return [base_targets[i] for i in self.indices]
        return [t if keep else UNLABELED for t, keep in zip(base_targets, self.labeled_mask)]


def balanced_subset(targets: Sequence[int], n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``n`` labeled samples, spread over the classes as evenly as possible.

    Each class gets ``n // classes`` samples (a class with fewer gets all of them and its
    share goes to the others); the remainder goes to classes picked at random. Negative
    targets (already unlabeled) are never picked. Deterministic given ``seed``.
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


def with_labeled(
    base: Dataset, targets: Sequence[int], labeled: int | None, drop_unlabeled: bool, seed: int
) -> Dataset:
    """Apply the shared ``labeled`` / ``drop_unlabeled`` params to a training split."""
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


# -- digits -----------------------------------------------------------------------------
def digits(
    labeled: Labeled = None,
    drop_unlabeled: bool = False,
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.3,
    split_seed: Seed = 0,
) -> DataSplits:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes, no download).

    A stratified split (``test_fraction``, ``split_seed``) gives 1257 train / 540 eval
    images at the defaults. Pixels are scaled to [0, 1]; inputs have shape (1, 8, 8).
    ``labeled=N`` keeps the labels of N class-balanced training images (picked from
    ``split_seed``), the rest get -1; ``drop_unlabeled`` removes those. Eval keeps all labels.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = (data.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    x_train, x_eval, y_train, y_eval = train_test_split(
        images, data.target, test_size=test_fraction, random_state=split_seed, stratify=data.target
    )
    train = TensorPairs(torch.from_numpy(np.ascontiguousarray(x_train)), y_train.tolist())
    eval_split = TensorPairs(torch.from_numpy(np.ascontiguousarray(x_eval)), y_eval.tolist())
    return DataSplits(
        train=with_labeled(train, train.targets, labeled, drop_unlabeled, split_seed),
        eval=eval_split,
        num_classes=10,
        input_shape=(1, 8, 8),
    )


def cifar10(
    root: str = "data/cifar10",
    download: bool = False,
    augment: bool = True,
    verify: bool = True,
    labeled: Labeled = None,
    drop_unlabeled: bool = False,
    label_seed: Seed = 0,
) -> DataSplits:
    """CIFAR-10 (50000 train / 10000 test 32x32 colour images, 10 classes) via torchvision.

    Reads torchvision's on-disk format under ``root`` (``cifar-10-batches-py/``); fetches
    it only when ``download`` is true. ``augment`` adds RandomCrop(32, padding=4) and a
    horizontal flip to the train split; both splits are normalized with the per-channel
    CIFAR-10 mean and std. ``verify`` checks the files' md5 against the official release
    (turn it off for a re-packed copy in the same format). ``labeled`` / ``drop_unlabeled``
    as in ``digits``, with the labeled images picked from ``label_seed``.
    """
    from kdforge.plugins import torchvision_data as tvd

    return tvd.cifar(tvd.CIFAR10_SPEC, root, download, augment, verify, labeled, drop_unlabeled, label_seed)


def cifar100(
    root: str = "data/cifar100",
    download: bool = False,
    augment: bool = True,
    verify: bool = True,
    labeled: Labeled = None,
    drop_unlabeled: bool = False,
    label_seed: Seed = 0,
) -> DataSplits:
    """CIFAR-100 (50000 train / 10000 test 32x32 colour images, 100 fine classes) via torchvision.

    Reads torchvision's on-disk format under ``root`` (``cifar-100-python/``); fetches it
    only when ``download`` is true. Same augmentation, ``verify`` and ``labeled`` params as
    ``cifar10``, normalized with the CIFAR-100 per-channel mean and std.
    """
    from kdforge.plugins import torchvision_data as tvd

    return tvd.cifar(tvd.CIFAR100_SPEC, root, download, augment, verify, labeled, drop_unlabeled, label_seed)


# -- image folders ----------------------------------------------------------------------
def image_folder(
    root: str,
    train_dir: str = "train",
    eval_dir: str = "val",
    image_size: Annotated[int, Field(ge=8)] = 224,
    augment: bool = True,
    mean: Stats = IMAGENET_MEAN,
    std: Stats = IMAGENET_STD,
    labeled: Labeled = None,
    drop_unlabeled: bool = False,
    label_seed: Seed = 0,
) -> DataSplits:
    """Images in class folders (``root/train/<class>/*.png``), read with torchvision's ImageFolder.

    ``root/train_dir`` is the train split and ``root/eval_dir`` the eval split (optional:
    without it, eval is None); both must hold the same class folders. Train images get
    RandomResizedCrop(image_size) and a horizontal flip when ``augment`` (else the eval
    resize and center crop); eval images are resized to image_size*256/224 and center
    cropped. Inputs are normalized with ``mean``/``std`` (ImageNet's by default) and have
    shape (3, image_size, image_size). ``labeled`` / ``drop_unlabeled`` as in ``digits``.
    """
    from torchvision import transforms

    from kdforge.plugins import torchvision_data as tvd

    normalize = [transforms.ToTensor(), transforms.Normalize(list(mean), list(std))]
    center = [transforms.Resize(int(image_size * 256 / 224)), transforms.CenterCrop(image_size)]
    if augment:
        train_tf = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    else:
        train_tf = center
    train_path = Path(root) / train_dir
    if not train_path.is_dir():
        raise RecipeError(
            f"no training images: '{train_path}' is not a directory "
            f"(image_folder expects {root}/{train_dir}/<class>/<image files>)",
            key="data.params.root",
        )
    train = tvd.load_image_folder(train_path, transforms.Compose(train_tf + normalize), "root")
    eval_path = Path(root) / eval_dir
    eval_split = None
    if eval_dir and eval_path.is_dir():
        eval_split = tvd.load_image_folder(eval_path, transforms.Compose(center + normalize), "eval_dir")
        if eval_split.classes != train.classes:
            only_train = sorted(set(train.classes) - set(eval_split.classes))
            only_eval = sorted(set(eval_split.classes) - set(train.classes))
            raise RecipeError(
                f"'{train_path}' and '{eval_path}' hold different classes "
                f"(only in {train_dir}: {only_train or 'none'}; only in {eval_dir}: {only_eval or 'none'}); "
                "both splits need the same class folders",
                key="data.params.eval_dir",
            )
    return DataSplits(
        train=with_labeled(train, train.targets, labeled, drop_unlabeled, label_seed),
        eval=eval_split,
        num_classes=len(train.classes),
        input_shape=(3, image_size, image_size),
    )


# -- synthetic --------------------------------------------------------------------------
class SyntheticClasses(Dataset):
    """Samples ``prototypes[y] + noise * randn``, each drawn from its own seed, so none are stored.

    Items are ``(x, y)``, or bare ``x`` when ``labeled`` is false.
    """

    def __init__(
        self, prototypes: torch.Tensor, targets: Sequence[int], noise: float, seed: int, labeled: bool = True
    ) -> None:
        self.prototypes = prototypes
        self.labels = [int(t) for t in targets]
        self.noise = float(noise)
        self.seed = int(seed)
        self.labeled = bool(labeled)
        if self.labeled:
            self.targets = self.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Any:
        if index < 0:
            index += len(self.labels)
        if not 0 <= index < len(self.labels):
            raise IndexError(f"index {index} out of range for {len(self.labels)} samples")
        y = self.labels[index]
        gen = torch.Generator().manual_seed(self.seed + index)
        x = self.prototypes[y] + self.noise * torch.randn(self.prototypes.shape[1:], generator=gen)
        return (x, y) if self.labeled else x


def synthetic(
    shape: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)] = [1, 8, 8],  # noqa: B006
    num_classes: Annotated[int, Field(ge=1)] = 10,
    train_size: Annotated[int, Field(ge=1)] = 512,
    eval_size: Annotated[int, Field(ge=0)] = 128,
    seed: Seed = 0,
    noise: Annotated[float, Field(ge=0)] = 1.0,
    unlabeled: bool = False,
) -> DataSplits:
    """Random but learnable tensors for tests and benchmarks (no files, no download).

    Each class has a random prototype of ``shape``; a sample is its class prototype plus
    ``noise`` times standard normal noise. Classes are balanced. Everything follows from
    ``seed`` (a private generator; the global RNG is untouched). ``unlabeled`` makes the
    train items bare input tensors (the whole split unlabeled); eval keeps its labels.
    ``eval_size: 0`` gives no eval split.
    """
    dims = tuple(int(d) for d in shape)
    gen = torch.Generator().manual_seed(int(seed))
    prototypes = torch.randn((int(num_classes), *dims), generator=gen)

    def balanced_labels(n: int) -> list[int]:
        return (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)].tolist()

    train_labels = balanced_labels(int(train_size))
    eval_labels = balanced_labels(int(eval_size))
    # Separate random seed bases keep train and eval samples independent of each other.
    train_seed, eval_seed = torch.randint(0, 2**62, (2,), generator=gen).tolist()
    train = SyntheticClasses(prototypes, train_labels, noise, train_seed, labeled=not unlabeled)
    eval_split = SyntheticClasses(prototypes, eval_labels, noise, eval_seed) if eval_size else None
    return DataSplits(train=train, eval=eval_split, num_classes=num_classes, input_shape=dims)


@hookimpl
def register_datasets(register: Any) -> None:
    """Register the built-in datasets."""
    register("digits", digits)
    register("cifar10", cifar10)
    register("cifar100", cifar100)
    register("image_folder", image_folder)
    register("synthetic", synthetic)
