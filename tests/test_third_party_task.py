"""A separately installed package (tests/fixtures/kdforge-regression, pip-installed by `make test`)
adds a non-classification task, a dataset whose items carry an extra field, and losses that read
that field and the sample index: all through entry points, none of it known to the engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import run_cli


def regression_recipe(tmp_path: Path, epochs: int = 6, **trainer) -> Path:
    recipe = {
        "name": "sines",
        "data": {"name": "noisy_sines", "params": {"train_size": 256}},  # the dataset names its task
        "student": {"name": "linear_regressor", "params": {"hidden": 32}},
        "losses": [{"name": "weighted_mse"}, {"name": "index_consistency", "weight": 0.1, "params": {"dim": 3}}],
        "optimizer": {"name": "adam", "params": {"lr": 0.01}},
        "trainer": {"epochs": epochs, "batch_size": 32, "progress_bar": False, "log_every": 4, **trainer},
        "output_dir": str(tmp_path / "run"),
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "sines.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_the_plugins_are_found_through_entry_points() -> None:
    result = run_cli("plugins", "--json")
    records = {(r["kind"], r["name"]): r for r in json.loads(result.stdout)}
    for key in [("task", "regression"), ("dataset", "noisy_sines"), ("loss", "weighted_mse"),
                ("loss", "index_consistency"), ("student", "linear_regressor"), ("task", "classification")]:
        assert records[key]["status"] == "ok", key
    assert records[("task", "regression")]["provider"] == "kdforge-regression"


def test_a_regression_task_trains_end_to_end(tmp_path: Path) -> None:
    result = run_cli("run", str(regression_recipe(tmp_path)))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["task"] == "regression"
    assert summary["headline"] == {"metric": "mse", "higher_is_better": False}
    assert "student/accuracy" not in summary
    # predicting the mean of sin(...) would give an MSE near its variance (about 0.4): the model learned
    assert summary["student/mse"] < 0.2 and summary["student/mae"] < summary["student/mse"] ** 0.5 + 0.1
    metrics = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    evals = [m["student/mse"] for m in metrics if "student/mse" in m]
    assert len(evals) == 6 and evals[-1] < evals[0]
    # the index-keyed memory bank (a loss without trainable params) is checkpointed by kdforge itself
    bank = load_file(str(tmp_path / "run/checkpoints/epoch-0006/loss-1.safetensors"))
    assert bank["seen"].all() and bank["bank"].abs().sum() > 0  # every one of the 256 indices was seen
    compare = run_cli("compare", str(tmp_path / "run"))
    assert compare.returncode == 0 and "student mse (lower is better)" in compare.stdout


def test_the_index_bank_resumes_exactly(tmp_path: Path) -> None:
    full = regression_recipe(tmp_path / "full", epochs=4)
    assert run_cli("run", str(full)).returncode == 0
    part = regression_recipe(tmp_path / "part", epochs=2)
    assert run_cli("run", str(part)).returncode == 0
    resumed = run_cli("run", str(regression_recipe(tmp_path / "part", epochs=4)), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for name in ("model.safetensors", "loss-1.safetensors"):
        a = load_file(str(tmp_path / "full/run/checkpoints/epoch-0004" / name))
        b = load_file(str(tmp_path / "part/run/checkpoints/epoch-0004" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_a_three_field_tuple_dataset_is_a_dry_run_error_naming_the_dataset(tmp_path: Path) -> None:
    import kdforge

    class Triples(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 16

        def __getitem__(self, i: int):
            return torch.zeros(4), 0, i  # (inputs, targets, something): ambiguous

    class Plugin:
        @kdforge.hookimpl
        def register_datasets(self, register):
            register("triples", lambda: kdforge.DataSplits(Triples(), None, 2, (4,)))

    plugin = Plugin()
    kdforge.register_plugin(plugin, name="triples-test")
    try:
        recipe = {"data": {"name": "triples"}, "student": {"name": "mlp"}, "losses": [{"name": "ce"}],
                  "trainer": {"epochs": 1}, "output_dir": str(tmp_path / "run")}
        with pytest.raises(kdforge.RecipeError, match=r"^data: dataset 'triples': its items are 3-tuples.*mapping"):
            kdforge.validate(recipe, dry_run=True)
    finally:
        kdforge.unregister_plugin(plugin)


@pytest.mark.slow
def test_the_regression_task_in_two_processes(tmp_path: Path) -> None:
    from test_distributed import launch

    result = launch(regression_recipe(tmp_path, epochs=2))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["train/samples_seen_per_process"] == [256, 256]
    assert summary["student/mse"] is not None
    # kdforge.all_gather: each process put the other's samples into its bank too
    bank = load_file(str(tmp_path / "run/checkpoints/epoch-0002/loss-1.safetensors"))
    assert bank["seen"].all()
