"""Safe loading: weights files are read with safetensors or torch.load(weights_only=True)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import kdforge
from kdforge.weights import load_state_dict

MARKER = "pwned.txt"


class Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    target = tmp_path / MARKER
    evil = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "extra": Payload(str(target))}, evil)
    with pytest.raises(kdforge.RecipeError, match="refusing to load") as info:
        load_state_dict(evil)
    assert "pickled Python objects" in str(info.value)
    assert not target.exists()


def test_plain_pickle_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / MARKER
    evil = tmp_path / "weights.pth"
    evil.write_bytes(pickle.dumps(Payload(str(target))))
    with pytest.raises(kdforge.RecipeError):
        load_state_dict(evil)
    assert not target.exists()


def test_a_model_refuses_an_evil_weights_path_in_a_recipe(tmp_path: Path) -> None:
    from conftest import run_cli
    import yaml
    from conftest import base_recipe

    target = tmp_path / MARKER
    evil = tmp_path / "teacher.pt"
    torch.save({"model": Payload(str(target))}, evil)
    recipe = base_recipe(tmp_path, teacher={"name": "mlp", "params": {"weights_path": str(evil)}},
                         losses=[{"name": "kd"}])
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_cli("run", str(path))
    assert result.returncode == 2
    assert "refusing to load" in result.stderr and "Traceback" not in result.stderr
    assert not target.exists()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_state_dicts_load_from_every_format(tmp_path: Path, suffix: str) -> None:
    model = kdforge.create("student", "mlp", num_classes=3, input_shape=[4], hidden=[5])
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(model.state_dict(), str(path))
    else:  # wrapped and DDP-prefixed, as training scripts often save them
        torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    clone = kdforge.create("student", "mlp", num_classes=3, input_shape=[4], hidden=[5], weights_path=str(path))
    for key, value in model.state_dict().items():
        assert torch.equal(clone.state_dict()[key], value)


def test_weights_of_the_wrong_shape_are_a_clear_error(tmp_path: Path) -> None:
    model = kdforge.create("student", "mlp", num_classes=3, input_shape=[4], hidden=[5])
    path = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(path))
    with pytest.raises(kdforge.RecipeError, match="do not fit the model"):
        kdforge.create("student", "mlp", num_classes=4, input_shape=[4], hidden=[5], weights_path=str(path))


def test_torchvision_weights_path_without_download(tmp_path: Path) -> None:
    model = kdforge.create("teacher", "torchvision", arch="resnet18", num_classes=10)
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    clone = kdforge.create("teacher", "torchvision", arch="resnet18", num_classes=10, weights_path=str(path))
    assert torch.equal(clone.fc.weight, model.fc.weight)


def test_a_tampered_checkpoint_is_refused_on_resume(tmp_path: Path) -> None:
    import yaml

    from conftest import base_recipe, run_cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(base_recipe(tmp_path, trainer={"epochs": 1, "progress_bar": False})))
    assert run_cli("run", str(recipe)).returncode == 0
    target = tmp_path / MARKER
    torch.save({"state": {}, "param_groups": [], "x": Payload(str(target))},
               tmp_path / "run/checkpoints/epoch-0001/optimizer.bin")
    result = run_cli("run", str(recipe), "--resume", "--set", "trainer.epochs=2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "refusing to resume" in result.stderr and "optimizer.bin" in result.stderr
    assert not target.exists()
