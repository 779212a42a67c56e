"""Real training runs on real data: the run directory, distillation, third-party plugins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import kdforge
from conftest import run_in_subprocess, base_recipe, run_cli

SUMMARY_KEYS = {"student/accuracy", "student/params", "epochs", "wall_seconds", "num_processes"}


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_teacher_run_writes_the_whole_run_directory(digits_teacher: Path) -> None:
    summary = json.loads((digits_teacher / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["epochs"] == 4 and summary["num_processes"] == 1
    assert "teacher/accuracy" not in summary
    resolved = yaml.safe_load((digits_teacher / "recipe.yaml").read_text())
    # the values the engine filled in from the data are recorded
    assert resolved["student"]["params"]["num_classes"] == 10
    assert resolved["student"]["params"]["in_channels"] == 1
    weights = load_file(str(digits_teacher / "student.safetensors"))
    params = [t for k, t in weights.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert sum(t.numel() for t in params) == summary["student/params"]
    checkpoints = sorted(p.name for p in (digits_teacher / "checkpoints").iterdir())
    assert checkpoints == ["epoch-0003", "epoch-0004"]  # keep_checkpoints: 2
    metrics = read_metrics(digits_teacher)
    evals = [m for m in metrics if "student/accuracy" in m]
    assert [m["epoch"] for m in evals] == [1, 2, 3, 4]
    assert evals[-1]["student/accuracy"] == summary["student/accuracy"]
    train = [m for m in metrics if "train/loss" in m]
    assert train and all("train/loss/ce" in m and "train/samples_per_second" in m for m in train)
    assert train[-1]["train/loss"] < train[0]["train/loss"]


def test_distilled_student_learns_from_a_checkpoint_teacher(digits_teacher: Path, tmp_path: Path) -> None:
    recipe = base_recipe(
        tmp_path,
        data={"name": "digits", "params": {"labeled": 100}},
        teacher={"name": "checkpoint", "params": {"path": str(digits_teacher)}},
        losses=[{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9, "params": {"temperature": 4.0}}],
        trainer={"epochs": 6, "batch_size": 64, "progress_bar": False},
    )
    summary = kdforge.run(recipe)
    assert summary["teacher/accuracy"] == json.loads((digits_teacher / "summary.json").read_text())["student/accuracy"]
    assert summary["teacher/params"] > summary["student/params"]
    assert summary["student/accuracy"] > 0.85  # 10 classes: chance is 0.1
    metrics = read_metrics(tmp_path / "run")
    assert all("train/loss/kd" in m and "train/loss/ce" in m for m in metrics if "train/loss" in m)


def test_a_third_party_loss_and_schedule_drive_a_real_run(digits_teacher: Path, tmp_path: Path) -> None:
    # kdforge-logit-l1 (tests/fixtures) is installed with pip and uses only the contract.
    recipe = base_recipe(
        tmp_path,
        teacher={"name": "checkpoint", "params": {"path": str(digits_teacher)}},
        losses=[
            {"name": "ce", "weight": 1.0},
            {"name": "logit_l1", "weight": {"schedule": "triangle", "params": {"peak": 0.5}},
             "params": {"scale": {"schedule": "triangle", "params": {"peak": 2.0}}}},
        ],
        trainer={"epochs": 2, "batch_size": 64, "progress_bar": False, "log_every": 4},
    )
    summary = kdforge.run(recipe)
    assert summary["student/accuracy"] > 0.5
    train = [m for m in read_metrics(tmp_path / "run") if "train/loss" in m]
    weights = [m["train/weight/logit_l1"] for m in train]
    scales = [m["train/logit_l1/scale"] for m in train]
    total = summary["train/steps"]
    for m, w, s in zip(train, weights, scales):
        p = (m["step"] - 1) / total
        assert w == pytest.approx(0.5 * (1 - abs(2 * p - 1)))
        assert s == pytest.approx(2.0 * (1 - abs(2 * p - 1)))
    assert max(weights) > weights[0] and weights[-1] < max(weights)


def test_scheduled_learning_rate_and_temperature(digits_teacher: Path, tmp_path: Path) -> None:
    recipe = base_recipe(
        tmp_path,
        teacher={"name": "checkpoint", "params": {"path": str(digits_teacher)}},
        losses=[{"name": "kd", "params": {"temperature": {"schedule": "progressive", "params": {"values": [10, 5, 1]}}}}],
        optimizer={"name": "sgd", "params": {"lr": {"schedule": "cosine", "params": {"start": 0.1, "end": 0.0, "warmup": 0.2}},
                                             "momentum": 0.9}},
        trainer={"epochs": 3, "batch_size": 64, "progress_bar": False, "log_every": 1},
    )
    summary = kdforge.run(recipe)
    total = summary["train/steps"]
    lr = kdforge.create("schedule", "cosine", start=0.1, end=0.0, warmup=0.2)
    temperature = kdforge.create("schedule", "progressive", values=[10, 5, 1])
    train = [m for m in read_metrics(tmp_path / "run") if "train/loss" in m]
    assert len(train) == total
    for m in train:
        # step s (counted from 1) ran at progress (s - 1) / total: that is what is logged
        assert m["train/lr"] == pytest.approx(lr((m["step"] - 1) / total), abs=1e-9)
        assert m["train/kd/temperature"] == temperature((m["step"] - 1) / total)
    assert {m["train/kd/temperature"] for m in train} == {10, 5, 1}


def test_weight_decay_skips_biases_and_norms() -> None:
    from kdforge.optim import parameter_groups
    from kdforge.plugins.models import SmallCNN

    model = SmallCNN(num_classes=3, in_channels=1, channels=[4])
    decay, no_decay = parameter_groups([model], 5e-4, decay_norm_and_bias=False)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"])
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in model.parameters() if p.ndim <= 1}
    (everything,) = parameter_groups([model], 5e-4, decay_norm_and_bias=True)
    assert len(everything["params"]) == len(list(model.parameters()))


def test_runs_are_reproducible_on_cpu(tmp_path: Path) -> None:
    recipe = base_recipe(tmp_path, student={"name": "mlp", "params": {"hidden": [16], "dropout": 0.2}},
                         trainer={"epochs": 1, "batch_size": 64, "progress_bar": False})
    kdforge.run(recipe, output_dir=tmp_path / "a")
    kdforge.run(recipe, output_dir=tmp_path / "b")
    a, b = load_file(str(tmp_path / "a/student.safetensors")), load_file(str(tmp_path / "b/student.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    kdforge.run(recipe, {"seed": 1}, output_dir=tmp_path / "c")
    c = load_file(str(tmp_path / "c/student.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_unlabeled_transfer_set(digits_teacher: Path, tmp_path: Path) -> None:
    # A train split without any targets: the student learns from the teacher alone.
    recipe = base_recipe(
        tmp_path,
        data={"name": "synthetic", "params": {"shape": [1, 8, 8], "num_classes": 10, "train_size": 256,
                                              "eval_size": 64, "unlabeled": True}},
        teacher={"name": "checkpoint", "params": {"path": str(digits_teacher)}},
        losses=[{"name": "ce", "weight": 0.5}, {"name": "kd", "weight": 1.0}],
        trainer={"epochs": 1, "batch_size": 64, "progress_bar": False, "log_every": 1},
    )
    kdforge.run(recipe)
    train = [m for m in read_metrics(tmp_path / "run") if "train/loss" in m]
    assert all(m["train/loss/ce"] == 0.0 for m in train)
    assert all(m["train/loss/kd"] > 0.0 for m in train)


def test_bf16_mixed_precision_on_cpu(tmp_path: Path) -> None:
    recipe = base_recipe(tmp_path, trainer={"epochs": 2, "batch_size": 64, "progress_bar": False,
                                            "mixed_precision": "bf16"})
    summary = run_in_subprocess(recipe, tmp_path)  # Accelerate fixes the precision per process
    assert summary["mixed_precision"] == "bf16"
    assert summary["student/accuracy"] > 0.5


def test_compare_prints_the_runs_side_by_side(digits_teacher: Path, tmp_path: Path) -> None:
    kdforge.run(base_recipe(tmp_path, name="tiny-student", trainer={"epochs": 1, "progress_bar": False}))
    result = run_cli("compare", str(digits_teacher), str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "student acc" in lines[0]
    assert any(line.startswith("test-teacher") for line in lines)
    assert any(line.startswith("tiny-student") for line in lines)
    as_json = json.loads(run_cli("compare", "--json", str(tmp_path / "run")).stdout)
    assert as_json[0]["name"] == "tiny-student"


def test_validate_dry_run_catches_what_static_checks_cannot(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base_recipe(tmp_path, student={"name": "torchvision", "params": {"arch": "resnet18", "num_classes": 7}})))
    assert run_cli("validate", str(path)).returncode == 0
    result = run_cli("validate", str(path), "--dry-run")
    assert result.returncode == 2
    assert "student" in result.stderr and "10 classes" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_torchvision_student_on_grayscale_digits(tmp_path: Path) -> None:
    # in_channels is filled in from the data (1), so the first convolution is adapted.
    recipe = base_recipe(tmp_path, student={"name": "torchvision", "params": {"arch": "resnet18"}},
                         trainer={"epochs": 1, "batch_size": 128, "progress_bar": False})
    summary = kdforge.run(recipe)
    assert summary["student/params"] > 10_000_000
