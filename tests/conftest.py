"""Shared fixtures: small recipes, a trained digits teacher, a clean environment."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# The suite runs two tests at a time (`pytest -n 2`, on 2 cores). One torch thread per
# process: otherwise the OpenMP pools of both workers and of the runs they start
# oversubscribe the cores and spin, and everything takes longer. Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
KDFORGE = [sys.executable, "-m", "kdforge"]


@pytest.fixture(autouse=True)
def _quiet_offline_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No network, no stray files in $HOME: wandb offline with its dirs under tmp."""
    wandb_home = tmp_path_factory.getbasetemp() / "wandb-home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(wandb_home / var.lower()))
    monkeypatch.delenv("KDFORGE_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)


def base_recipe(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    """A small, fast digits recipe (plain supervised MLP) with ``changes`` merged in at top level."""
    recipe: dict[str, Any] = {
        "name": "test-run",
        "seed": 0,
        "data": {"name": "digits"},
        "student": {"name": "mlp", "params": {"hidden": [32]}},
        "losses": [{"name": "ce", "weight": 1.0}],
        "optimizer": {"name": "adam", "params": {"lr": 0.01}},
        "trainer": {"epochs": 2, "batch_size": 128, "progress_bar": False, "log_every": 5},
        "output_dir": str(tmp_path / "run"),
    }
    for key, value in changes.items():
        recipe[key] = copy.deepcopy(value)
    return recipe


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: int | None = None,
            own_process: bool = False) -> subprocess.CompletedProcess:
    """Run ``kdforge ARGS`` and capture its exit code, stdout and stderr.

    In this process through ``kdforge.cli.main`` (an interpreter start with torch costs
    seconds), except where a test needs a process of its own: ``own_process``, an ``env``
    (plugin paths are read when plugins load), a ``timeout``, and ``kdforge plugins``
    (entry points are read once per process).
    """
    if own_process or env is not None or timeout is not None or args[:1] == ("plugins",):
        full_env = {**os.environ, **(env or {})}
        return subprocess.run([*KDFORGE, *args], capture_output=True, text=True, env=full_env,
                              cwd=cwd or ROOT, timeout=timeout or 300)
    import contextlib
    import io

    from kdforge.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd or ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(["kdforge", *args], code, out.getvalue(), err.getvalue())


def run_in_subprocess(recipe: dict[str, Any], tmp_path: Path, *args: str) -> dict[str, Any]:
    """Train ``recipe`` with ``kdforge run`` in its own process; return its summary.

    For runs whose mixed precision differs from the test process's: Accelerate fixes the
    precision once per process.
    """
    import json

    import yaml

    path = tmp_path / "subprocess-recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_cli("run", str(path), *args, own_process=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((Path(recipe["output_dir"]) / "summary.json").read_text())


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small_cnn teacher trained on all digits labels (shared by the tests that distill)."""
    import kdforge

    out = tmp_path_factory.mktemp("teacher") / "run"
    recipe = base_recipe(
        out.parent,
        name="test-teacher",
        student={"name": "small_cnn", "params": {"channels": [16, 32]}},
        optimizer={"name": "adamw", "params": {"lr": 0.005}},
        trainer={"epochs": 4, "batch_size": 64, "progress_bar": False},
        output_dir=str(out),
    )
    summary = kdforge.run(recipe)
    assert summary["student/accuracy"] > 0.9
    return out


# CI runs the fuzz tests with a fixed seed so a submission's result does not depend on luck;
# locally every run explores new inputs.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    _hypothesis_settings.load_profile("ci")
