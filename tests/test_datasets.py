"""Tests for the built-in dataset plugins (``kdforge.plugins.datasets``).

CIFAR and image-folder data are written here, tiny, in the real on-disk formats
(torchvision's pickle batches, PNG files in class folders); nothing is downloaded.
"""

from __future__ import annotations

import collections
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

import kdforge
from kdforge import UNLABELED, DataSplits, RecipeError
from kdforge.plugins import datasets as ds
from kdforge.plugins import torchvision_data as tvd

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


# -- fake data in the real formats --------------------------------------------------------
def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: Path, per_batch: int = 4, test_size: int = 6) -> dict[str, np.ndarray]:
    """Write ``root/cifar-10-batches-py/`` (5 train batches, test batch, meta) as the release does.

    Rows of ``data`` are 3072 uint8: the 1024 red, then green, then blue pixels, row-major.
    Returns the train data and labels in file order.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    all_data, all_labels = [], []
    for b in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [(b * per_batch + j) % 10 for j in range(per_batch)]
        _pickle(folder / f"data_batch_{b}", {
            "batch_label": f"training batch {b} of 5",
            "labels": labels,
            "data": data,
            "filenames": [f"img_{b}_{j}.png" for j in range(per_batch)],
        })
        all_data.append(data)
        all_labels += labels
    test = rng.integers(0, 256, (test_size, 3072), dtype=np.uint8)
    _pickle(folder / "test_batch", {
        "batch_label": "testing batch 1 of 1",
        "labels": [j % 10 for j in range(test_size)],
        "data": test,
        "filenames": [f"test_{j}.png" for j in range(test_size)],
    })
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072})
    return {"data": np.concatenate(all_data), "labels": np.array(all_labels)}


def write_cifar100(root: Path, train_size: int = 200, test_size: int = 50) -> None:
    """Write ``root/cifar-100-python/`` (train, test, meta) with the release's keys."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, n in (("train", train_size), ("test", test_size)):
        fine = [j % 100 for j in range(n)]
        _pickle(folder / name, {
            "filenames": [f"{name}_{j}.png" for j in range(n)],
            "batch_label": f"{name}ing batch 1 of 1",
            "fine_labels": fine,
            "coarse_labels": [f // 5 for f in fine],
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        })
    _pickle(folder / "meta", {
        "fine_label_names": [f"fine_{i}" for i in range(100)],
        "coarse_label_names": [f"coarse_{i}" for i in range(20)],
    })


def write_image_folder(root: Path, split: str, classes: list[str], per_class: int = 3) -> None:
    """Write small PNGs of assorted sizes to ``root/split/<class>/``."""
    for c, name in enumerate(classes):
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            size = (40 + 7 * i, 30 + 5 * c)
            Image.new("RGB", size, (40 * c, 20 * i, 200)).save(folder / f"{i}.png")


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything tries to download."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"unexpected download: {args}")

    monkeypatch.setattr(tvd, "download_and_extract_archive", refuse)


# -- registration -----------------------------------------------------------------------
def test_all_datasets_are_registered_with_a_summary() -> None:
    records = {r.name: r for r in kdforge.list_plugins() if r.kind == "dataset"}
    for name in ("digits", "cifar10", "cifar100", "image_folder", "synthetic"):
        assert records[name].status == "ok"
        assert records[name].summary


# -- digits -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_default() -> DataSplits:
    return ds.digits()


def test_digits_sizes_shapes_and_range(digits_default: DataSplits) -> None:
    splits = digits_default
    assert (len(splits.train), len(splits.eval)) == (1257, 540)
    assert splits.num_classes == 10 and splits.input_shape == (1, 8, 8)
    x, y = splits.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    assert type(y) is int
    xs = torch.stack([splits.train[i][0] for i in range(len(splits.train))])
    assert xs.min() >= 0 and xs.max() <= 1 and xs.max() == 1  # /16 scaling, not /255
    assert sorted(set(splits.train.targets)) == list(range(10))
    assert all(t >= 0 for t in splits.eval.targets)


def test_digits_split_is_stratified_and_follows_split_seed(digits_default: DataSplits) -> None:
    eval_counts = collections.Counter(digits_default.eval.targets)
    totals = eval_counts + collections.Counter(digits_default.train.targets)
    assert all(abs(eval_counts[c] - 0.3 * totals[c]) <= 1 for c in range(10))  # 30% of every class
    again = ds.digits()
    assert torch.equal(again.train.inputs, digits_default.train.inputs)
    other = ds.digits(split_seed=1)
    assert not torch.equal(other.train.inputs, digits_default.train.inputs)
    assert len(ds.digits(test_fraction=0.5).eval) == 899


def test_digits_labeled_is_class_balanced() -> None:
    splits = ds.digits(labeled=100)
    assert len(splits.train) == 1257
    targets = [splits.train[i][1] for i in range(len(splits.train))]
    counts = collections.Counter(t for t in targets if t != UNLABELED)
    assert sum(counts.values()) == 100 and set(counts.values()) == {10} and len(counts) == 10
    assert targets.count(UNLABELED) == 1157
    assert splits.train.targets == targets
    assert len(splits.eval) == 540 and UNLABELED not in splits.eval.targets


def test_digits_labeled_keeps_the_true_labels(digits_default: DataSplits) -> None:
    splits = ds.digits(labeled=55)
    full = digits_default.train.targets
    kept = [i for i, t in enumerate(splits.train.targets) if t != UNLABELED]
    assert len(kept) == 55
    assert all(splits.train[i][1] == full[i] for i in kept)
    assert sorted(collections.Counter(full[i] for i in kept).values()) == [5] * 5 + [6] * 5


def test_digits_drop_unlabeled() -> None:
    splits = ds.digits(labeled=100, drop_unlabeled=True)
    assert len(splits.train) == 100
    labels = [splits.train[i][1] for i in range(100)]
    assert UNLABELED not in labels and collections.Counter(labels) == {c: 10 for c in range(10)}
    assert ds.digits(drop_unlabeled=True).train.__len__() == 1257  # no labeled: nothing dropped


def test_digits_labeled_subset_is_deterministic() -> None:
    def kept(**params: int) -> list[int]:
        targets = ds.digits(labeled=30, **params).train.targets
        return [i for i, t in enumerate(targets) if t != UNLABELED]

    assert kept() == kept()
    assert kept(split_seed=0) != kept(split_seed=3)


def test_digits_labeled_more_than_train_is_an_error() -> None:
    with pytest.raises(ValueError, match="labeled=2000"):
        ds.digits(labeled=2000)
    with pytest.raises(RecipeError, match="labeled=2000"):
        kdforge.create("dataset", "digits", labeled=2000)


def test_digits_through_create_and_param_validation() -> None:
    splits = kdforge.create("dataset", "digits", labeled=100)
    assert isinstance(splits, DataSplits)
    assert sum(t != UNLABELED for t in splits.train.targets) == 100
    with pytest.raises(RecipeError, match="labeled"):
        kdforge.create("dataset", "digits", labeled=-5)
    with pytest.raises(RecipeError, match="test_fraction"):
        kdforge.create("dataset", "digits", test_fraction=1.0)


# -- shared helpers -----------------------------------------------------------------------
def test_balanced_subset_spreads_evenly_and_fills_from_larger_classes() -> None:
    targets = [0] * 1 + [1] * 5 + [2] * 5 + [UNLABELED] * 4
    take = lambda n: collections.Counter(targets[i] for i in ds.balanced_subset(targets, n, seed=0))  # noqa: E731
    assert take(3) == {0: 1, 1: 1, 2: 1}
    assert take(7) == {0: 1, 1: 3, 2: 3}  # class 0 has one sample; its share goes to the others
    assert sorted(take(8).values()) == [1, 3, 4]
    assert take(11) == {0: 1, 1: 5, 2: 5}
    assert UNLABELED not in take(11)
    with pytest.raises(ValueError):
        ds.balanced_subset(targets, 12)


def test_balanced_subset_remainder_goes_to_seeded_random_classes() -> None:
    targets = [0, 1, 2] * 5

    def favoured(seed: int) -> int:
        counts = collections.Counter(targets[i] for i in ds.balanced_subset(targets, 4, seed))
        assert sorted(counts.values()) == [1, 1, 2]
        return counts.most_common(1)[0][0]

    assert favoured(5) == favoured(5)
    assert len({favoured(seed) for seed in range(20)}) == 3  # not always the lowest class id


def test_partially_labeled_wraps_any_dataset() -> None:
    base = [(f"x{i}", i % 3) for i in range(6)]
    hidden = ds.PartiallyLabeled(base, keep={1, 4})
    assert len(hidden) == 6
    assert [hidden[i] for i in range(6)] == [
        ("x0", -1), ("x1", 1), ("x2", -1), ("x3", -1), ("x4", 1), ("x5", -1),
    ]
    dropped = ds.PartiallyLabeled(base, keep=np.array([4, 1]), drop=True)
    assert [dropped[i] for i in range(len(dropped))] == [("x1", 1), ("x4", 1)]
    with pytest.raises(IndexError):
        ds.PartiallyLabeled(base, keep=[6])


# -- CIFAR ------------------------------------------------------------------------------
def test_cifar10_reads_the_real_format(tmp_path: Path, no_download: None) -> None:
    written = write_cifar10(tmp_path)
    splits = ds.cifar10(root=str(tmp_path), augment=False, verify=False)
    assert (len(splits.train), len(splits.eval)) == (20, 6)
    assert splits.num_classes == 10 and splits.input_shape == (3, 32, 32)
    x, y = splits.train[7]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert y == int(written["labels"][7])
    # The stored row is channel-planar RGB; the tensor must be that image, normalized.
    raw = torch.from_numpy(written["data"][7].reshape(3, 32, 32).astype(np.float32)) / 255
    mean, std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)
    assert torch.allclose(x, (raw - mean) / std, atol=1e-5)
    assert splits.eval[0][0].shape == (3, 32, 32)


def test_cifar10_augments_train_only(tmp_path: Path, no_download: None) -> None:
    write_cifar10(tmp_path)
    splits = ds.cifar10(root=str(tmp_path), verify=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        train_views = [splits.train[3][0] for _ in range(8)]
        eval_views = [splits.eval[3][0] for _ in range(8)]
    assert any(not torch.equal(train_views[0], v) for v in train_views[1:])
    assert all(torch.equal(eval_views[0], v) for v in eval_views[1:])


def test_cifar10_labeled_and_drop(tmp_path: Path, no_download: None) -> None:
    write_cifar10(tmp_path)
    splits = ds.cifar10(root=str(tmp_path), verify=False, labeled=10)
    labels = [splits.train[i][1] for i in range(len(splits.train))]
    assert len(labels) == 20 and labels.count(UNLABELED) == 10
    assert sorted(t for t in labels if t != UNLABELED) == list(range(10))
    reseeded = ds.cifar10(root=str(tmp_path), verify=False, labeled=10, label_seed=1)
    assert [t == UNLABELED for t in reseeded.train.targets] != [t == UNLABELED for t in labels]
    dropped = ds.cifar10(root=str(tmp_path), verify=False, labeled=10, drop_unlabeled=True)
    assert sorted(dropped.train[i][1] for i in range(len(dropped.train))) == list(range(10))
    with pytest.raises(ValueError, match="labeled"):
        ds.cifar10(root=str(tmp_path), verify=False, labeled=21)


def test_cifar10_verify_checks_the_official_md5(tmp_path: Path, no_download: None) -> None:
    # torchvision hashes every file even with download=False; a fake copy cannot pass.
    write_cifar10(tmp_path)
    with pytest.raises(RecipeError, match="md5.*verify: false") as info:
        ds.cifar10(root=str(tmp_path))
    assert info.value.key == "data.params.root"


def test_cifar10_missing_is_a_clear_error_without_download(tmp_path: Path, no_download: None) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(RecipeError) as info:
        ds.cifar10(root=str(root))
    assert info.value.key == "data.params.root"
    assert info.value.detail == (
        f"CIFAR-10 not found under '{root}' (expected cifar-10-batches-py/); "
        "set download: true to fetch it, or point root at an existing copy"
    )
    assert not root.exists()
    with pytest.raises(RecipeError, match="CIFAR-10 not found"):
        kdforge.create("dataset", "cifar10", root=str(root))
    with pytest.raises(RecipeError, match="CIFAR-100 not found .*cifar-100-python/"):
        ds.cifar100(root=str(root))


def test_cifar10_incomplete_copy_names_the_missing_file(tmp_path: Path, no_download: None) -> None:
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(RecipeError, match="lacks test_batch"):
        ds.cifar10(root=str(tmp_path), verify=False)


def test_cifar10_downloads_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_download(url: str, root: str, filename: str, md5: str) -> None:
        calls.append((url, filename, md5))
        write_cifar10(Path(root))

    monkeypatch.setattr(tvd, "download_and_extract_archive", fake_download)
    splits = ds.cifar10(root=str(tmp_path), download=True, verify=False)
    assert len(splits.train) == 20
    assert calls == [(
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
    )]
    ds.cifar10(root=str(tmp_path), download=True, verify=False)  # already there: no second fetch
    assert len(calls) == 1


def test_cifar100_reads_the_real_format(tmp_path: Path, no_download: None) -> None:
    write_cifar100(tmp_path)
    splits = ds.cifar100(root=str(tmp_path), verify=False, labeled=100, drop_unlabeled=True)
    assert splits.num_classes == 100 and splits.input_shape == (3, 32, 32)
    assert len(splits.train) == 100 and len(splits.eval) == 50
    assert sorted(splits.train[i][1] for i in range(100)) == list(range(100))
    x, y = splits.eval[42]
    assert x.shape == (3, 32, 32) and y == 42
    with pytest.raises(RecipeError, match="md5"):
        ds.cifar100(root=str(tmp_path))


# -- image folders ------------------------------------------------------------------------
def test_image_folder_classes_and_shapes(tmp_path: Path) -> None:
    write_image_folder(tmp_path, "train", ["dog", "cat", "bird"])
    write_image_folder(tmp_path, "val", ["cat", "dog", "bird"], per_class=2)
    splits = ds.image_folder(root=str(tmp_path), image_size=16)
    assert splits.num_classes == 3 and splits.input_shape == (3, 16, 16)
    assert splits.train.classes == ["bird", "cat", "dog"] == splits.eval.classes
    assert (len(splits.train), len(splits.eval)) == (9, 6)
    for split in (splits.train, splits.eval):
        x, y = split[len(split) - 1]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 2


def test_image_folder_without_eval_dir_and_labeled(tmp_path: Path) -> None:
    write_image_folder(tmp_path, "train", ["a", "b"], per_class=4)
    splits = ds.image_folder(root=str(tmp_path), image_size=12, augment=False, labeled=2)
    assert splits.eval is None
    labels = [splits.train[i][1] for i in range(8)]
    assert labels.count(UNLABELED) == 6 and sorted(t for t in labels if t >= 0) == [0, 1]
    assert splits.train[0][0].shape == (3, 12, 12)


def test_image_folder_mismatched_classes_is_an_error(tmp_path: Path) -> None:
    write_image_folder(tmp_path, "train", ["cat", "dog", "fox"])
    write_image_folder(tmp_path, "val", ["cat", "dog", "owl"])
    with pytest.raises(RecipeError, match=r"only in train: \['fox'\]; only in val: \['owl'\]"):
        ds.image_folder(root=str(tmp_path))


def test_image_folder_missing_or_empty_train_dir(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not a directory") as info:
        ds.image_folder(root=str(tmp_path))
    assert info.value.key == "data.params.root"
    (tmp_path / "train" / "empty_class").mkdir(parents=True)
    with pytest.raises(RecipeError, match="empty_class"):
        ds.image_folder(root=str(tmp_path))


# -- synthetic ----------------------------------------------------------------------------
def test_synthetic_shapes_and_determinism() -> None:
    a = ds.synthetic(shape=[3, 4, 5], num_classes=4, train_size=20, eval_size=8, seed=7)
    b = ds.synthetic(shape=[3, 4, 5], num_classes=4, train_size=20, eval_size=8, seed=7)
    c = ds.synthetic(shape=[3, 4, 5], num_classes=4, train_size=20, eval_size=8, seed=8)
    assert a.input_shape == (3, 4, 5) and a.num_classes == 4
    assert (len(a.train), len(a.eval)) == (20, 8)
    x, y = a.train[5]
    assert x.shape == (3, 4, 5) and x.dtype == torch.float32 and type(y) is int and 0 <= y < 4
    assert collections.Counter(a.train.targets) == {0: 5, 1: 5, 2: 5, 3: 5}
    for i in (0, 5, 19):
        assert torch.equal(a.train[i][0], b.train[i][0]) and a.train[i][1] == b.train[i][1]
        assert torch.equal(a.train[i][0], a.train[i][0])
    assert not torch.equal(a.train[0][0], c.train[0][0])
    assert not torch.equal(a.train[0][0], a.eval[0][0])
    assert torch.equal(a.train[-1][0], a.train[19][0])
    with pytest.raises(IndexError):
        a.train[20]


def test_synthetic_samples_are_prototype_plus_scaled_noise() -> None:
    def same_class_pair(noise: float) -> tuple[torch.Tensor, torch.Tensor]:
        split = ds.synthetic(train_size=30, noise=noise).train
        first = split.targets[0]
        other = next(i for i in range(1, 30) if split.targets[i] == first)
        return split[0][0], split[other][0]

    a, b = same_class_pair(0.0)
    assert torch.equal(a, b)
    a, b = same_class_pair(1.0)
    assert 0.5 < (a - b).std().item() * 2**-0.5 < 2.0  # two draws of unit noise


def test_synthetic_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    splits = ds.synthetic()
    splits.train[0]
    assert torch.equal(torch.rand(3), expected)


def test_synthetic_unlabeled_train_is_bare_inputs() -> None:
    splits = ds.synthetic(unlabeled=True, train_size=10, eval_size=4)
    item = splits.train[3]
    assert isinstance(item, torch.Tensor) and item.shape == (1, 8, 8)
    x, y = splits.eval[0]
    assert isinstance(y, int)
    assert ds.synthetic(eval_size=0).eval is None


def test_synthetic_is_learnable() -> None:
    splits = ds.synthetic(train_size=500, eval_size=200, noise=1.0)
    xs = torch.stack([splits.train[i][0] for i in range(500)]).flatten(1)
    ys = torch.tensor(splits.train.targets)
    centroids = torch.stack([xs[ys == c].mean(0) for c in range(10)])
    ex = torch.stack([splits.eval[i][0] for i in range(200)]).flatten(1)
    predicted = torch.cdist(ex, centroids).argmin(1)
    accuracy = (predicted == torch.tensor(splits.eval.targets)).float().mean().item()
    assert accuracy > 0.9


def test_synthetic_params_are_validated() -> None:
    splits = kdforge.create("dataset", "synthetic", shape=[2, 3, 3], num_classes=3)
    assert splits.input_shape == (2, 3, 3)
    with pytest.raises(RecipeError, match="shape"):
        kdforge.create("dataset", "synthetic", shape=[2, 0, 3])
    with pytest.raises(RecipeError, match="train_size"):
        kdforge.create("dataset", "synthetic", train_size=0)


# -- the split and the digits arrays match scikit-learn's, without importing it --------------------
@example(seed=0, fraction=0.3, counts=[2, 2, 2, 4, 40, 40], shuffle=0)  # 1 - 0.3 rounding: 62 vs 63 train
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), fraction=st.sampled_from([0.1, 0.2, 0.25, 0.3, 0.333, 0.5, 0.7]),
       counts=st.lists(st.integers(2, 40), min_size=2, max_size=8), shuffle=st.integers(0, 1000))
def test_stratified_split_is_the_split_scikit_learn_makes(seed: int, fraction: float, counts: list[int],
                                                          shuffle: int) -> None:
    from sklearn.model_selection import train_test_split

    labels = np.random.default_rng(shuffle).permutation(np.repeat(np.arange(len(counts)), counts))
    indices = np.arange(len(labels))
    try:
        expected = train_test_split(indices, test_size=fraction, random_state=seed, stratify=labels)
    except ValueError:
        with pytest.raises(ValueError):
            kdforge.stratified_split(labels.tolist(), fraction, seed)
        return
    train, test = kdforge.stratified_split(labels.tolist(), fraction, seed)
    np.testing.assert_array_equal(train, expected[0])
    np.testing.assert_array_equal(test, expected[1])


@pytest.mark.parametrize("seed", [0, 1, 7, 12345])
def test_the_digits_split_is_scikit_learns_for_every_seed(seed: int) -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = load_digits().target
    expected = train_test_split(np.arange(len(target)), test_size=0.3, random_state=seed, stratify=target)
    train, test = kdforge.stratified_split(target, 0.3, seed)
    assert (len(train), len(test)) == (1257, 540)
    np.testing.assert_array_equal(train, expected[0])
    np.testing.assert_array_equal(test, expected[1])


def test_digits_arrays_are_load_digits_without_importing_scikit_learn(tmp_path: Path) -> None:
    code = ("import sys, numpy as np; from kdforge.plugins.datasets import digits_arrays; x, y = digits_arrays(); "
            "assert 'sklearn' not in sys.modules, 'imported sklearn'; np.save(sys.argv[1], np.c_[x, y])")
    out = tmp_path / "digits.npy"
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, timeout=120)
    from sklearn.datasets import load_digits

    data = load_digits()
    table = np.load(out)
    np.testing.assert_array_equal(table[:, :-1], data.data)
    np.testing.assert_array_equal(table[:, -1].astype(int), data.target)
