"""W&B tracking through Accelerate's tracker, with the real wandb library in offline mode.

The values are read back from the offline run's own ``run-*.wandb`` log (tests/wandb_offline.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import kdforge
from conftest import base_recipe
from wandb_offline import find_run_files, read_run


def read_complete_run(path: Path, timeout: float = 20.0) -> dict:
    """The run's end waits for wandb to flush; on a loaded machine give its service a moment more."""
    import time

    from wandb_offline import WandbLogError

    deadline = time.time() + timeout
    while True:
        try:
            return read_run(path)
        except WandbLogError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture
def tracked_run(tmp_path: Path) -> tuple[Path, dict]:
    recipe = base_recipe(
        tmp_path,
        name="tracked",
        tracking={"wandb": {"project": "kdforge-tests", "name": "digits-tracked", "tags": ["ci", "digits"]}},
        trainer={"epochs": 2, "batch_size": 128, "progress_bar": False, "log_every": 3},
    )
    summary = kdforge.run(recipe)
    return tmp_path / "run", summary


def test_wandb_offline_run_holds_config_metrics_and_steps(tracked_run: tuple[Path, dict]) -> None:
    run_dir, summary = tracked_run
    files = find_run_files(run_dir)
    assert len(files) == 1, "one offline run, inside the run directory"
    assert "offline-run-" in str(files[0])
    logged = read_complete_run(files[0])
    assert logged["run"]["project"] == "kdforge-tests"
    assert logged["run"]["display_name"] == "digits-tracked"
    assert sorted(logged["run"]["tags"]) == ["ci", "digits"]
    # the resolved recipe is the run's config
    assert logged["config"]["name"] == "tracked"
    assert logged["config"]["trainer"]["epochs"] == 2
    assert logged["config"]["student"]["params"]["num_classes"] == 10
    # every record of metrics.jsonl reached W&B with its step and the same values
    local = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    history = logged["history"]
    for record in local:
        row = next(h for h in history if h["_step"] == record["step"] and
                   all(k in h for k in record if k != "step"))
        for key, value in record.items():
            if key != "step":
                assert row[key] == pytest.approx(value), key
    accuracies = [h["student/accuracy"] for h in history if "student/accuracy" in h]
    assert accuracies[-1] == pytest.approx(summary["student/accuracy"])


def test_no_wandb_files_without_tracking(tmp_path: Path) -> None:
    kdforge.run(base_recipe(tmp_path, trainer={"epochs": 1, "progress_bar": False}))
    assert find_run_files(tmp_path) == []
    assert (tmp_path / "run" / "metrics.jsonl").stat().st_size > 0


def test_recipe_mode_disabled_turns_tracking_off(tmp_path: Path) -> None:
    kdforge.run(base_recipe(tmp_path, tracking={"wandb": {"mode": "disabled"}},
                            trainer={"epochs": 1, "progress_bar": False}))
    assert find_run_files(tmp_path) == []


def test_offline_is_the_default_even_without_wandb_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kdforge.recipe import WandbSpec
    from kdforge.tracking import wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode(WandbSpec()) == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_mode(WandbSpec()) == "online"
    assert wandb_mode(WandbSpec(mode="offline")) == "offline"


def test_wandb_dir_follows_the_users_wandb_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "wandb-elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(elsewhere))
    kdforge.run(base_recipe(tmp_path, tracking={"wandb": {"project": "p"}}, trainer={"epochs": 1, "progress_bar": False}))
    assert len(find_run_files(elsewhere)) == 1
    assert find_run_files(tmp_path / "run") == []
