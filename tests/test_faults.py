"""Faults during training: non-finite losses, out of memory, a full disk, Ctrl-C, and an error
in one of several processes. Each gets one clear message and keeps the last good checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import KDFORGE, ROOT, base_recipe, run_cli

FAULTY = {"PYTHONPATH": str(ROOT / "tests" / "fixtures" / "faulty")}


def write_recipe(tmp_path: Path, kind: str, at: float = 0.55, epochs: int = 4, **trainer) -> Path:
    recipe = base_recipe(tmp_path, losses=[{"name": "ce"}, {"name": "faulty", "params": {"kind": kind, "at": at}}],
                         trainer={"epochs": epochs, "batch_size": 128, "progress_bar": False, "log_every": 100,
                                  "keep_checkpoints": 10, **trainer})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_a_non_finite_loss_stops_with_the_term_step_and_epoch(kind: str, tmp_path: Path) -> None:
    result = run_cli("run", str(write_recipe(tmp_path, kind)), env=FAULTY)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    # 10 steps per epoch, 40 in all: progress 0.55 is reached at step 23 (epoch 3)
    assert "'faulty'" in message and "step 23 " in message and "epoch 3" in message
    assert "epoch-0002" in message  # the last good checkpoint is named and kept
    checkpoints = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert checkpoints == ["epoch-0001", "epoch-0002"]
    weights = load_file(str(tmp_path / "run/checkpoints/epoch-0002/model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (tmp_path / "run/summary.json").exists()


def test_non_finite_steps_can_be_skipped_and_counted(tmp_path: Path) -> None:
    result = run_cli("run", str(write_recipe(tmp_path, "nan", at=0.8, nonfinite="skip")), env=FAULTY)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    # steps at progress >= 0.8 keep failing (progress stops moving while they are skipped)
    assert summary["train/skipped_steps"] > 0
    assert summary["train/steps"] == 32


@pytest.mark.parametrize(("kind", "fragment"), [("oom", "out of memory"), ("disk", "no space left on device")])
def test_resource_errors_say_what_to_change(kind: str, fragment: str, tmp_path: Path) -> None:
    result = run_cli("run", str(write_recipe(tmp_path, kind)), env=FAULTY)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert fragment in line and ("batch_size" in line or "output_dir" in line)
    assert (tmp_path / "run/checkpoints/epoch-0002").is_dir()


@pytest.mark.slow
def test_ctrl_c_checkpoints_at_the_next_step_and_resumes_exactly(tmp_path: Path) -> None:
    def recipe(out: Path) -> Path:
        data = base_recipe(out, student={"name": "small_cnn", "params": {"channels": [8, 16], "dropout": 0.2}},
                           trainer={"epochs": 6, "batch_size": 32, "progress_bar": False, "keep_checkpoints": 10})
        path = out / "recipe.yaml"
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(data))
        return path

    full = recipe(tmp_path / "full")
    assert run_cli("run", str(full)).returncode == 0
    interrupted = recipe(tmp_path / "cut")
    proc = subprocess.Popen([*KDFORGE, "run", str(interrupted)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    marker = tmp_path / "cut/run/checkpoints/epoch-0002"
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted at step" in stderr and "--resume" in stderr and "Traceback" not in stderr
    mid = [p.name for p in (tmp_path / "cut/run/checkpoints").iterdir() if p.name.startswith("step-")]
    assert len(mid) == 1, "a checkpoint at the step boundary"
    result = run_cli("run", str(interrupted), "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    a = load_file(str(tmp_path / "full/run/student.safetensors"))
    b = load_file(str(tmp_path / "cut/run/student.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_an_error_in_one_process_stops_all_of_them(tmp_path: Path) -> None:
    from test_distributed import launch

    recipe = base_recipe(tmp_path, data={"name": "synthetic", "params": {"shape": [1, 8, 8], "train_size": 256, "eval_size": 32}},
                         losses=[{"name": "ce"}, {"name": "faulty", "params": {"kind": "crash", "at": 0.3, "rank": 1}}],
                         trainer={"epochs": 3, "batch_size": 32, "progress_bar": False})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    os.environ["PYTHONPATH"] = FAULTY["PYTHONPATH"]
    try:
        start = time.time()
        result = launch(path)
    finally:
        del os.environ["PYTHONPATH"]
    assert result.returncode != 0
    assert time.time() - start < 120  # no hang in a collective
    assert result.stderr.count("kdforge: failed (process 1): RuntimeError: the faulty loss crashed on purpose") == 1
    assert not (tmp_path / "run/summary.json").exists()
