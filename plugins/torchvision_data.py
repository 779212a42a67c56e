"""torchvision-backed dataset helpers, imported only when a recipe uses CIFAR or image folders
(importing torchvision costs about a second, which ``kdforge plugins`` should not pay)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchvision import transforms
from torchvision.datasets import CIFAR10, CIFAR100, ImageFolder
from torchvision.datasets.utils import check_integrity, download_and_extract_archive

from kdforge import DataSplits, RecipeError, with_labeled


# -- CIFAR ------------------------------------------------------------------------------
def _without_md5(entries: list[list[Any]]) -> list[list[Any]]:
    return [[name, None] for name, _ in entries]


class _CheckedCIFAR10(CIFAR10):
    """torchvision's CIFAR-10 loader for files ``_prepare_cifar`` has already checked.

    torchvision hashes every file (all splits plus the meta file) on each construction;
    with the md5s set to ``None`` its check only tests that the files exist, so the
    train and eval splits don't hash ~180 MB twice each, and a copy that is in the real
    format but not byte-identical to the release loads when ``verify`` is off.
    """

    train_list = _without_md5(CIFAR10.train_list)
    test_list = _without_md5(CIFAR10.test_list)
    meta = {**CIFAR10.meta, "md5": None}


class _CheckedCIFAR100(CIFAR100):
    """torchvision's CIFAR-100 loader for already-checked files (see ``_CheckedCIFAR10``)."""

    train_list = _without_md5(CIFAR100.train_list)
    test_list = _without_md5(CIFAR100.test_list)
    meta = {**CIFAR100.meta, "md5": None}


@dataclass(frozen=True)
class _CifarSpec:
    title: str
    official: type[CIFAR10]
    loader: type[CIFAR10]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR10_SPEC = _CifarSpec("CIFAR-10", CIFAR10, _CheckedCIFAR10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_SPEC = _CifarSpec("CIFAR-100", CIFAR100, _CheckedCIFAR100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def _cifar_files(spec: _CifarSpec) -> dict[str, str]:
    """File name -> official md5, for every file torchvision reads."""
    tv = spec.official
    files = {name: md5 for name, md5 in tv.train_list + tv.test_list}
    files[tv.meta["filename"]] = tv.meta["md5"]
    return files


def _prepare_cifar(spec: _CifarSpec, root: str, download: bool, verify: bool) -> None:
    """Make sure the files are under ``root`` (downloading only if asked), or raise ``RecipeError``."""
    folder = os.path.join(root, spec.official.base_folder)
    files = _cifar_files(spec)

    def missing() -> list[str]:
        return [name for name in files if not os.path.isfile(os.path.join(folder, name))]

    def mismatched() -> list[str]:
        return [name for name, md5 in files.items() if not check_integrity(os.path.join(folder, name), md5)]

    def fetch() -> None:
        tv = spec.official
        download_and_extract_archive(tv.url, root, filename=tv.filename, md5=tv.tgz_md5)

    fetched = False
    if download and missing():
        fetch()
        fetched = True
    absent = missing()
    if len(absent) == len(files):
        raise RecipeError(
            f"{spec.title} not found under '{root}' (expected {spec.official.base_folder}/); "
            "set download: true to fetch it, or point root at an existing copy",
            key="data.params.root",
        )
    if absent:
        raise RecipeError(
            f"{spec.title} under '{root}' is incomplete: {spec.official.base_folder}/ lacks "
            f"{', '.join(absent)}; set download: true to fetch it again, or point root at a complete copy",
            key="data.params.root",
        )
    if not verify:
        return
    bad = mismatched()
    if bad and download and not fetched:
        fetch()
        bad = mismatched()
    if bad:
        raise RecipeError(
            f"{spec.title} under '{root}' does not match the official release (md5 of "
            f"{spec.official.base_folder}/{', '.join(bad)}); set download: true to fetch a fresh copy, "
            "or verify: false to use a custom copy in the same format",
            key="data.params.root",
        )


def cifar(
    spec: _CifarSpec,
    root: str,
    download: bool,
    augment: bool,
    verify: bool,
    labeled: int | None,
    drop_unlabeled: bool,
    label_seed: int,
) -> DataSplits:
    _prepare_cifar(spec, root, download, verify)
    finish = [transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)]
    augmentation = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    train = spec.loader(root, train=True, transform=transforms.Compose(augmentation + finish))
    eval_split = spec.loader(root, train=False, transform=transforms.Compose(finish))
    return DataSplits(
        train=with_labeled(train, train.targets, labeled, drop_unlabeled, label_seed),
        eval=eval_split,
        num_classes=len(train.classes),
        input_shape=(3, 32, 32),
    )



def load_image_folder(path: Path, transform: Any, param: str) -> ImageFolder:
    try:
        return ImageFolder(str(path), transform=transform)
    except FileNotFoundError as exc:  # no class folders, or class folders without images
        raise RecipeError(f"'{path}': {exc}", key=f"data.params.{param}") from None


