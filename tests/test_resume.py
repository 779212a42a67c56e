"""Checkpoints and --resume: a killed run continues to the same weights as an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import kdforge
from conftest import KDFORGE, ROOT, base_recipe, run_cli


def recipe_for(tmp_path: Path, epochs: int) -> dict:
    # dropout and augmentation-free digits: the RNG state matters (dropout masks)
    return base_recipe(
        tmp_path,
        student={"name": "small_cnn", "params": {"channels": [8, 16], "dropout": 0.3}},
        optimizer={"name": "sgd", "params": {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}},
        trainer={"epochs": epochs, "batch_size": 32, "progress_bar": False, "keep_checkpoints": 3},
    )


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "student.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("full")
    kdforge.run(recipe_for(out, 5), output_dir=out / "run")
    return out / "run"


def test_resume_continues_to_the_same_weights(uninterrupted: Path, tmp_path: Path) -> None:
    # stop after 2 epochs, then resume the same run to 5
    kdforge.run(recipe_for(tmp_path, 2))
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["epoch-0001", "epoch-0002"]
    summary = kdforge.run(recipe_for(tmp_path, 5), resume=True)
    assert summary["epochs"] == 5
    assert max_difference(weights(uninterrupted), weights(tmp_path / "run")) == 0.0
    full = (uninterrupted / "metrics.jsonl").read_text().splitlines()
    resumed = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in yaml.safe_load(x).items() if "per_second" not in k} for x in lines]  # noqa: E731
    assert strip(resumed) == strip(full)


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(uninterrupted: Path, tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_for(tmp_path, 5)))
    proc = subprocess.Popen([*KDFORGE, "run", str(path)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 120
    while not (checkpoints / "epoch-0002").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "summary.json").exists(), "killed before the end"
    result = run_cli("run", str(path), "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert max_difference(weights(uninterrupted), weights(tmp_path / "run")) == 0.0


def test_resume_refuses_a_changed_recipe(tmp_path: Path) -> None:
    kdforge.run(recipe_for(tmp_path, 1))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_for(tmp_path, 3)))
    result = run_cli("run", str(path), "--resume", "--set", "optimizer.params.lr=0.1", "--set", "seed=3")
    assert result.returncode == 2
    assert "optimizer.params.lr" in result.stderr and "seed" in result.stderr
    assert "Traceback" not in result.stderr
    # the epoch count may change
    assert run_cli("run", str(path), "--resume").returncode == 0


def test_a_half_written_checkpoint_is_never_resumed_from(tmp_path: Path) -> None:
    kdforge.run(recipe_for(tmp_path, 1))
    checkpoints = tmp_path / "run" / "checkpoints"
    # what a crash during the second save would leave behind
    (checkpoints / ".tmp-epoch-0002").mkdir()
    (checkpoints / ".tmp-epoch-0002" / "model.safetensors").write_bytes(b"garbage")
    (checkpoints / "epoch-0003").mkdir()  # no kdforge_state.json: incomplete
    summary = kdforge.run(recipe_for(tmp_path, 2), resume=True)
    assert summary["epochs"] == 2
    assert summary["train/steps"] == 2 * 40  # 1257 / 32 per epoch, both epochs counted once


def test_checkpoint_every_and_keep(tmp_path: Path) -> None:
    recipe = recipe_for(tmp_path, 5)
    recipe["trainer"].update(checkpoint_every=2, keep_checkpoints=2)
    kdforge.run(recipe)
    # epochs 2 and 4 by the interval, 5 because it is the last; only the newest 2 kept
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["epoch-0004", "epoch-0005"]
