"""Built-in dataset plugins: ``digits``, ``cifar10``, ``cifar100``, ``image_folder``, ``synthetic``.

Every factory returns a ``kdforge.DataSplits`` whose items are ``(float32 tensor, int)``
pairs. The ``labeled`` / ``drop_unlabeled`` params (semi-supervised distillation) are
shared: ``labeled=N`` keeps the labels of N class-balanced training samples and marks
the rest ``UNLABELED`` (-1); ``drop_unlabeled`` removes the unlabeled ones instead.
Nothing is ever downloaded unless a factory's ``download`` param is true.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import numpy as np
import torch
from pydantic import Field
from torch.utils.data import Dataset

from kdforge import (
    Chain,
    DataSplits,
    HorizontalFlip,
    PartiallyLabeled,
    RandomResizedCrop,
    RandomShift,
    RecipeError,
    ReplayableDataset,
    TensorPairs,
    balanced_subset,
    hookimpl,
    stratified_split,
    with_labeled,
)

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


# The reusable pieces (TensorPairs, PartiallyLabeled, balanced_subset, with_labeled,
# stratified_split) are public kdforge names; they are re-exported here for older imports.


# -- digits -----------------------------------------------------------------------------
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``(pixels (1797, 64) float64, targets (1797,) int)``, as ``load_digits`` gives them.

    Read straight from the CSV that scikit-learn ships, without importing scikit-learn
    (seconds per process); ``load_digits`` is the fallback when the file is not where it was.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is None or not csv.is_file():
        from sklearn.datasets import load_digits

        data = load_digits()
        return data.data, data.target
    table = np.loadtxt(csv, delimiter=",")
    return table[:, :-1], table[:, -1].astype(int)


def digits(
    labeled: Labeled = None,
    drop_unlabeled: bool = False,
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.3,
    split_seed: Seed = 0,
    shift: Annotated[int, Field(ge=0, le=4)] = 0,
) -> DataSplits:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes, no download).

    A stratified split (``kdforge.stratified_split`` with ``test_fraction``, ``split_seed``)
    gives 1257 train / 540 eval images at the defaults. Pixels are scaled to [0, 1]; inputs have shape (1, 8, 8).
    ``labeled=N`` keeps the labels of N class-balanced training images (picked from
    ``split_seed``), the rest get -1; ``drop_unlabeled`` removes those. Eval keeps all labels.
    ``shift=k`` augments the train split: each image moves by a random offset of up to k pixels
    in each direction (a random crop of the zero-padded image), drawn anew every epoch.
    """
    pixels, target = digits_arrays()
    images = (pixels.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    train_idx, eval_idx = stratified_split(target, test_fraction, split_seed)
    train = TensorPairs(torch.from_numpy(np.ascontiguousarray(images[train_idx])), target[train_idx].tolist())
    eval_split = TensorPairs(torch.from_numpy(np.ascontiguousarray(images[eval_idx])), target[eval_idx].tolist())
    augmented = ReplayableDataset(train, RandomShift(shift)) if shift else train
    return DataSplits(
        train=with_labeled(augmented, train.targets, labeled, drop_unlabeled, split_seed),
        eval=eval_split,
        num_classes=10,
        input_shape=(1, 8, 8),
        random_transforms=bool(shift),
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
    """CIFAR-10 (50000 train / 10000 test 32x32 colour images, 10 classes), in torchvision's format.

    Reads the python-format release under ``root`` (``cifar-10-batches-py/``) with a
    restricted unpickler that builds only numpy arrays and lists (a file whose pickle
    would call anything else is a recipe error, never run); fetches it only when
    ``download`` is true. Items and their order are torchvision's ``CIFAR10``'s.
    ``augment`` adds RandomCrop(32, padding=4) and a horizontal flip to the train split;
    both splits are normalized with the per-channel CIFAR-10 mean and std. ``verify`` checks the files' md5 against the official release
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
    """CIFAR-100 (50000 train / 10000 test 32x32 colour images, 100 fine classes), in torchvision's format.

    Reads the python-format release under ``root`` (``cifar-100-python/``) with the same
    restricted unpickler as ``cifar10``; fetches it only when ``download`` is true. Same
    augmentation, ``verify`` and ``labeled`` params as ``cifar10``, normalized with the
    CIFAR-100 per-channel mean and std.
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
    on_bad_image: Literal["error", "skip"] = "error",
) -> DataSplits:
    """Images in class folders (``root/train/<class>/*.png``), in torchvision ImageFolder's classes and order.

    ``root/train_dir`` is the train split and ``root/eval_dir`` the eval split (optional:
    without it, eval is None); both must hold the same class folders. Train images get
    RandomResizedCrop(image_size) and a horizontal flip when ``augment`` (else the eval
    resize and center crop); eval images are resized to image_size*256/224 and center
    cropped. Inputs are normalized with ``mean``/``std`` (ImageNet's by default) and have
    shape (3, image_size, image_size). ``labeled`` / ``drop_unlabeled`` as in ``digits``.

    Every image's header is checked when the data is built; folder symlinks are followed,
    each real folder once (a loop ends). ``on_bad_image: error`` makes an unreadable file,
    a dangling symlink or a looping folder link a recipe error naming it; ``skip`` leaves
    them out, warns once, and counts them in ``info["skipped_files"]`` (per split, with
    examples in ``info["skipped_examples"]``). An image that fails only when its pixels are
    decoded is an error at that read, or with ``skip`` is replaced by the next image that
    reads (counted in ``info["skipped_at_read"]`` when read in the main process).
    """
    from torchvision import transforms

    from kdforge.plugins import torchvision_data as tvd

    normalize = [transforms.ToTensor(), transforms.Normalize(list(mean), list(std))]
    center = [transforms.Resize(int(image_size * 256 / 224)), transforms.CenterCrop(image_size)]
    # augmented: un-augmented tensors here, a replayable crop and flip around them below
    train_tf = [transforms.ToTensor()] if augment else center + normalize
    train_path = Path(root) / train_dir
    if not train_path.is_dir():
        raise RecipeError(
            f"no training images: '{train_path}' is not a directory "
            f"(image_folder expects {root}/{train_dir}/<class>/<image files>)",
            key="data.params.root",
        )
    at_read = {"train": 0, "eval": 0}
    train, train_bad = tvd.load_image_folder(
        train_path, transforms.Compose(train_tf), "root", on_bad_image, "train", at_read)
    eval_path = Path(root) / eval_dir
    eval_split, eval_bad = None, []
    if eval_dir and eval_path.is_dir():
        eval_split, eval_bad = tvd.load_image_folder(
            eval_path, transforms.Compose(center + normalize), "eval_dir", on_bad_image, "eval", at_read)
        if eval_split.classes != train.classes:
            only_train = sorted(set(train.classes) - set(eval_split.classes))
            only_eval = sorted(set(eval_split.classes) - set(train.classes))
            raise RecipeError(
                f"'{train_path}' and '{eval_path}' hold different classes "
                f"(only in {train_dir}: {only_train or 'none'}; only in {eval_dir}: {only_eval or 'none'}); "
                "both splits need the same class folders",
                key="data.params.eval_dir",
            )
    info = {
        "skipped_files": {"train": len(train_bad), "eval": len(eval_bad)},
        "skipped_examples": {"train": [str(b) for b in train_bad[: tvd.EXAMPLES_KEPT]],
                             "eval": [str(b) for b in eval_bad[: tvd.EXAMPLES_KEPT]]},
        "skipped_at_read": at_read,
    }
    classes = train.classes
    if augment:
        train = ReplayableDataset(train, Chain([RandomResizedCrop(image_size), HorizontalFlip()]),
                                  finish=transforms.Normalize(list(mean), list(std)),
                                  finish_spec={"normalize": [list(mean), list(std)]})
    return DataSplits(
        train=with_labeled(train, train.targets, labeled, drop_unlabeled, label_seed),
        eval=eval_split,
        num_classes=len(classes),
        input_shape=(3, image_size, image_size),
        info=info,
        random_transforms=augment,
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
    train: Dataset = SyntheticClasses(prototypes, train_labels, noise, train_seed, labeled=not unlabeled)
    eval_split: Dataset | None = SyntheticClasses(prototypes, eval_labels, noise, eval_seed) if eval_size else None
    train, eval_split = in_memory(train), in_memory(eval_split) if eval_split is not None else None
    return DataSplits(train=train, eval=eval_split, num_classes=num_classes, input_shape=dims)


IN_MEMORY_LIMIT = 256 << 20  # bytes of samples held as one tensor (batches then come by index, at once)


def in_memory(dataset: SyntheticClasses) -> Dataset:
    """The same samples as ``TensorPairs`` when they are labeled and fit in ``IN_MEMORY_LIMIT``, else as they are."""
    size = len(dataset) * dataset.prototypes[0].numel() * 4
    if not dataset.labeled or size > IN_MEMORY_LIMIT or len(dataset) == 0:
        return dataset
    inputs = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return TensorPairs(inputs, dataset.labels)


@hookimpl
def register_datasets(register: Any) -> None:
    """Register the built-in datasets."""
    register("digits", digits)
    register("cifar10", cifar10)
    register("cifar100", cifar100)
    register("image_folder", image_folder)
    register("synthetic", synthetic)
