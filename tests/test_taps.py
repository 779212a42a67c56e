"""Feature taps in the engine: hooks, tap errors, dry-run shape errors, connectors under
training, resume and two processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import kdforge
from conftest import run_in_subprocess, base_recipe, run_cli
from kdforge.taps import FeatureTaps


def feature_recipe(tmp_path: Path, teacher_run: Path, losses: list[dict], epochs: int = 2) -> dict:
    return base_recipe(
        tmp_path,
        data={"name": "digits", "params": {"labeled": 200}},
        teacher={"name": "checkpoint", "params": {"path": str(teacher_run)}},
        student={"name": "small_cnn", "params": {"channels": [8, 12]}},
        losses=[{"name": "ce"}, *losses],
        trainer={"epochs": epochs, "batch_size": 64, "progress_bar": False, "keep_checkpoints": 5},
    )


FITNET = {"name": "fitnet", "weight": 10, "params": {"student_tap": "features.1", "teacher_tap": "features.1"}}
ATTENTION = {"name": "attention", "weight": 50,
             "params": {"student_taps": ["features.0", "features.1"], "teacher_taps": ["features.0", "features.1"]}}


def test_taps_capture_the_last_output_and_are_removable() -> None:
    shared = torch.nn.Linear(2, 2)
    model = torch.nn.Sequential()
    model.add_module("shared", shared)
    model.forward = lambda x: shared(shared(x))  # the module runs twice per forward pass
    taps = FeatureTaps(model, ["shared"])
    x = torch.randn(3, 2)
    model(x)
    captured = taps.take()["shared"]
    assert torch.equal(captured, shared(shared(x)))
    taps.remove()
    model(x)
    assert taps.take() == {}


def test_wrong_tap_name_lists_close_module_names(tmp_path: Path, digits_teacher: Path) -> None:
    bad = {**FITNET, "params": {"student_tap": "feature.1", "teacher_tap": "features.1"}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(feature_recipe(tmp_path, digits_teacher, [bad])))
    result = run_cli("run", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert "losses[1].params.student_tap" in line and "'feature.1'" in line and "features.1" in line
    assert not (tmp_path / "run").exists()


def test_unpairable_tap_shapes_are_reported_with_the_shapes(tmp_path: Path, digits_teacher: Path) -> None:
    # features.0 is 4x4, the teacher's features.1 is 2x2: without pooling attention cannot pair them
    bad = {"name": "attention", "params": {"student_taps": ["features.0"], "teacher_taps": ["features.1"], "pool": False}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(feature_recipe(tmp_path, digits_teacher, [bad])))
    result = run_cli("validate", str(path), "--dry-run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert "losses[1]" in line and "spatial sizes differ" in line
    assert "features.0 (4, 8, 4, 4)" in line and "features.1 (4, 32, 2, 2)" in line


def test_connector_trains_and_is_checkpointed(tmp_path: Path, digits_teacher: Path) -> None:
    summary = kdforge.run(feature_recipe(tmp_path, digits_teacher, [FITNET, ATTENTION], epochs=2))
    assert summary["student/accuracy"] > 0.15  # two short epochs; chance is 0.1 (0.15 is 4 sd above it on 540 samples)
    first = load_file(str(tmp_path / "run/checkpoints/epoch-0001/model_1.safetensors"))
    second = load_file(str(tmp_path / "run/checkpoints/epoch-0002/model_1.safetensors"))
    assert set(first) >= {"connector.0.weight", "connector.1.weight", "connector.1.running_mean"}
    assert first["connector.0.weight"].shape == (32, 12, 1, 1)  # student 12 channels -> teacher 32
    assert not torch.equal(first["connector.0.weight"], second["connector.0.weight"])
    metrics = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "train/loss" in m]
    assert all(m["train/loss/fitnet"] > 0 and m["train/loss/attention"] > 0 for m in train)


def test_resume_restores_the_connector(tmp_path: Path, digits_teacher: Path) -> None:
    full, split = tmp_path / "full", tmp_path / "split"
    kdforge.run(feature_recipe(full, digits_teacher, [FITNET], epochs=3))
    kdforge.run(feature_recipe(split, digits_teacher, [FITNET], epochs=1))
    kdforge.run(feature_recipe(split, digits_teacher, [FITNET], epochs=3), resume=True)
    for name in ("model.safetensors", "model_1.safetensors"):
        a = load_file(str(full / "run/checkpoints/epoch-0003" / name))
        b = load_file(str(split / "run/checkpoints/epoch-0003" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_bf16_with_taps(tmp_path: Path, digits_teacher: Path) -> None:
    recipe = feature_recipe(tmp_path, digits_teacher, [FITNET, ATTENTION, {"name": "relational", "params": {"student_tap": "pool", "teacher_tap": "pool"}}], epochs=1)
    recipe["trainer"]["mixed_precision"] = "bf16"
    summary = run_in_subprocess(recipe, tmp_path)  # Accelerate fixes the precision per process
    assert summary["student/accuracy"] is not None


@pytest.mark.slow
def test_two_processes_with_taps_and_a_connector(tmp_path: Path, digits_teacher: Path) -> None:
    from test_distributed import launch

    recipe = feature_recipe(tmp_path, digits_teacher, [FITNET, ATTENTION], epochs=2)
    recipe["data"] = {"name": "synthetic", "params": {"shape": [1, 8, 8], "num_classes": 10, "train_size": 256, "eval_size": 64}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = launch(path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["num_processes"] == 2
    assert summary["train/samples_seen_per_process"] == [256, 256]
    assert (tmp_path / "run/checkpoints/epoch-0002/model_1.safetensors").exists()


def test_hooks_are_removed_when_the_run_ends(tmp_path: Path, digits_teacher: Path) -> None:
    built: list[torch.nn.Module] = []

    class Plugin:
        @kdforge.hookimpl
        def register_students(self, register):
            def recorded(**params):
                model = kdforge.create("student", "small_cnn", **params)
                built.append(model)
                return model

            register("recorded_cnn", recorded)

    plugin = Plugin()
    kdforge.register_plugin(plugin)
    try:
        recipe = feature_recipe(tmp_path, digits_teacher, [ATTENTION], epochs=1)
        recipe["student"] = {"name": "recorded_cnn", "params": {"num_classes": 10, "in_channels": 1,
                                                                "input_shape": [1, 8, 8], "channels": [8, 12]}}
        kdforge.run(recipe)
    finally:
        kdforge.unregister_plugin(plugin)
    (model,) = built
    assert all(not m._forward_hooks for m in model.modules())
