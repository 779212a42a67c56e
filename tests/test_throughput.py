"""Throughput options (channels_last, compile, data-loader workers, fused optimizers, in-memory batches):
each gives the same training as the plain run, to float tolerance or exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kdforge
from conftest import base_recipe


def image_recipe(tmp_path: Path, **trainer) -> dict:
    return base_recipe(
        tmp_path, data={"name": "synthetic", "params": {"shape": [3, 16, 16], "train_size": 192, "eval_size": 64}},
        student={"name": "small_cnn", "params": {"channels": [8, 16]}},
        optimizer={"name": "adamw", "params": {"lr": 0.003}},
        trainer={"epochs": 2, "batch_size": 64, "progress_bar": False, **trainer})


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("plain")
    kdforge.run(image_recipe(out))
    return load_file(str(out / "run/student.safetensors"))


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


class Inspector:
    """A lifecycle callback that looks at the student when the run starts."""

    def __init__(self) -> None:
        self.seen: dict[str, object] = {}

    def on_fit_start(self, run: kdforge.RunContext) -> None:
        conv = next(m for m in run.student.modules() if isinstance(m, torch.nn.Conv2d))
        self.seen["channels_last"] = conv.weight.is_contiguous(memory_format=torch.channels_last)
        self.seen["compiled"] = getattr(run.student, "_compiled_call_impl", None) is not None


def test_channels_last(tmp_path: Path, plain) -> None:
    inspector = Inspector()
    kdforge.run(image_recipe(tmp_path, channels_last=True), callbacks=[inspector])
    assert inspector.seen["channels_last"] is True
    assert largest_difference(plain, load_file(str(tmp_path / "run/student.safetensors"))) < 1e-4


def test_compile_the_student(tmp_path: Path, plain) -> None:
    inspector = Inspector()
    # aot_eager traces forward and backward with torch.compile's machinery without generating code: the
    # inductor backend (the default) does the same plus code generation, which a GPU benchmark measures
    kdforge.run(image_recipe(tmp_path, compile={"backend": "aot_eager"}), callbacks=[inspector])
    assert inspector.seen["compiled"] is True
    assert largest_difference(plain, load_file(str(tmp_path / "run/student.safetensors"))) < 1e-5
    with pytest.raises(kdforge.RecipeError, match=r"trainer\.compile\.mode"):
        kdforge.validate(image_recipe(tmp_path, compile={"mode": "fastest"}))


def test_data_loader_workers_pinning_and_prefetch(tmp_path: Path, plain) -> None:
    kdforge.run(image_recipe(tmp_path, num_workers=2, persistent_workers=True, prefetch_factor=4, pin_memory=True))
    assert largest_difference(plain, load_file(str(tmp_path / "run/student.safetensors"))) == 0.0
    with pytest.raises(kdforge.RecipeError, match=r"trainer\.persistent_workers: needs worker processes"):
        kdforge.validate(image_recipe(tmp_path, persistent_workers=True))


@pytest.mark.parametrize("flag", ["fused", "foreach"])
def test_fused_and_foreach_optimizers(flag: str, tmp_path: Path, plain) -> None:
    recipe = image_recipe(tmp_path)
    recipe["optimizer"]["params"][flag] = True
    kdforge.run(recipe)
    assert largest_difference(plain, load_file(str(tmp_path / "run/student.safetensors"))) < 1e-5


def test_in_memory_datasets_are_batched_by_index_at_once(tmp_path: Path) -> None:
    from kdforge.plugins.datasets import digits, synthetic
    from kdforge.tasks import Gathered, IndexedCollate, IndexedDataset

    for splits in (digits(labeled=100), synthetic()):
        wrapped = IndexedDataset(splits.train)
        gathered = wrapped.__getitems__([3, 1, 40])
        assert isinstance(gathered, Gathered)  # no Python per sample
        one_by_one = IndexedCollate()([wrapped[i] for i in (3, 1, 40)])
        index, (x, y) = IndexedCollate()(gathered)
        assert torch.equal(index, one_by_one[0]) and torch.equal(x, one_by_one[1][0]) and torch.equal(y, one_by_one[1][1])
    # and a whole run is the same either way
    kdforge.run(base_recipe(tmp_path / "fast", trainer={"epochs": 2, "batch_size": 128, "progress_bar": False}))
    slow = IndexedDataset.__getitems__
    try:
        del IndexedDataset.__getitems__
        kdforge.run(base_recipe(tmp_path / "slow", trainer={"epochs": 2, "batch_size": 128, "progress_bar": False}))
    finally:
        IndexedDataset.__getitems__ = slow
    a = load_file(str(tmp_path / "fast/run/student.safetensors"))
    b = load_file(str(tmp_path / "slow/run/student.safetensors"))
    assert largest_difference(a, b) == 0.0
