"""A real 2-process run on the CPU through `accelerate launch` (gloo), proving both took part."""  # noqa: D400

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, base_recipe


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(recipe_path: Path, *extra: str) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "kdforge", "run", str(recipe_path), *extra]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_two_processes_split_the_data(tmp_path: Path, digits_teacher: Path) -> None:
    # 512 training samples, batch 32 per process: each process must see 256 per epoch.
    recipe = base_recipe(
        tmp_path,
        data={"name": "synthetic", "params": {"shape": [1, 8, 8], "num_classes": 10, "train_size": 512, "eval_size": 200}},
        teacher={"name": "checkpoint", "params": {"path": str(digits_teacher)}},
        losses=[{"name": "ce", "weight": 0.5}, {"name": "kd", "weight": 0.5}],
        trainer={"epochs": 2, "batch_size": 32, "progress_bar": False, "log_every": 4},
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = launch(path, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["num_processes"] == 2, summary
    assert summary["train/samples_seen_per_process"] == [512, 512]  # 256 per epoch each, not 512
    assert summary["train/steps"] == 2 * 512 // (32 * 2)
    assert summary["student/accuracy"] is not None and summary["student/accuracy"] > 0.2, summary
    # the padding of the eval shards is cut off: accuracy counts exactly the 200 eval samples
    hits = summary["student/accuracy"] * 200
    assert abs(hits - round(hits)) < 1e-9
    # one process writes: one summary printed, one set of metrics lines per step
    assert result.stdout.count('"num_processes": 2') == 1, result.stdout
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in metrics if "train/loss" in m]
    assert steps == sorted(set(steps))
    assert (tmp_path / "run" / "checkpoints" / "epoch-0002" / "random_states_1.pkl").exists()


@pytest.mark.slow
def test_an_eval_split_smaller_than_the_process_count(tmp_path: Path) -> None:
    # one eval sample for two processes: one shard holds only padding, and the DDP-wrapped
    # student (with BatchNorm buffers) must still run the same forward passes on both
    recipe = base_recipe(
        tmp_path,
        data={"name": "synthetic", "params": {"shape": [1, 8, 8], "num_classes": 10, "train_size": 128, "eval_size": 1}},
        student={"name": "small_cnn", "params": {"channels": [8, 16]}},
        trainer={"epochs": 2, "batch_size": 32, "progress_bar": False},
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = launch(path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["student/accuracy"] in (0.0, 1.0)  # the one sample, counted once


@pytest.mark.slow
def test_fsdp_asked_for_without_a_gpu_says_it_does_not_shard(tmp_path: Path) -> None:
    # Accelerate runs plain DDP over gloo here and ignores --use_fsdp without a word; kdforge says so
    recipe = base_recipe(tmp_path, trainer={"epochs": 1, "batch_size": 64, "progress_bar": False})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--use_fsdp", "--fsdp_version", "2", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "kdforge", "run", str(path)]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["num_processes"] == 2
    notes = [line for line in result.stderr.splitlines() if "FSDP was asked for" in line]
    assert len(notes) == 1 and "runs MULTI_CPU here" in notes[0] and "not sharded" in notes[0], result.stderr[-2000:]
