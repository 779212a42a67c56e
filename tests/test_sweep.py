"""``kdforge sweep``: sweep files and their checks, trials as run directories, two workers on one study,
a killed sweep that continues, interrupts, pruning, journal storage, and the sweep's report."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import ROOT, run_cli
from kdforge import RecipeError

optuna = pytest.importorskip("optuna")

from kdforge import sweep as sweeping  # noqa: E402

TINY = {"name": "tiny", "seed": 0, "data": {"name": "digits"}, "student": {"name": "mlp", "params": {"hidden": [16]}},
        "losses": [{"name": "ce"}], "optimizer": {"name": "adam", "params": {"lr": 0.01}},
        "trainer": {"epochs": 1, "batch_size": 128, "progress_bar": False}}


def write_sweep(tmp_path: Path, name: str = "s", recipe: dict[str, Any] | None = None, **spec: Any) -> Path:
    """A base recipe and a sweep file over its learning rate (``spec`` replaces sweep keys)."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(recipe or TINY))
    data = {"name": name, "recipe": "base.yaml", "space": {"optimizer.params.lr": {"float": [0.001, 0.1], "log": True}},
            "trials": 2, "sampler": {"name": "random", "seed": 0}, "output_dir": str(tmp_path / "runs" / name)}
    data.update(spec)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def sweep(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    sweeping.add_arguments(parser)
    return sweeping.run(parser.parse_args(list(argv)))


def study_of(path: Path) -> Any:
    s = sweeping.load_sweep(path)
    return optuna.load_study(study_name=s.name, storage=sweeping.make_storage(s))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def eval_epochs(run_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["epoch"] for r in records if "student/accuracy" in r]


# -- the sweep file and the checks before any trial ---------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"spaces": {}}, "unknown key 'spaces'"),
    ({"space": {}}, "space: is required"),
    ({"space": {"optimizer.params.lr": {"float": [0.1, 0.01]}}}, "needs low <= high"),
    ({"space": {"optimizer.params.lr": {"float": [0, 0.1], "log": True}}}, "a log scale needs low > 0"),
    ({"space": {"optimizer.params.lr": {"float": [0.01, 0.1], "log": True, "step": 0.01}}}, "takes no step"),
    ({"space": {"optimizer.params.lr": {"float": [0.01, 0.1], "choice": [1]}}}, "exactly one of"),
    ({"space": {"optimizer.params.lr": {"choice": []}}}, "non-empty list"),
    ({"space": {"optimizer.params.lr": {"flaot": [0.01, 0.1]}}}, "Did you mean 'float'"),
    ({"sampler": "grid"}, "the grid sampler needs values to enumerate"),
    ({"sampler": "cmaes"}, "unknown sampler 'cmaes'"),
    ({"trials": 0}, "trials: is the number of trials"),
    ({"objective": {"direction": "up"}}, "maximize or minimize"),
    ({"heartbeat": {"interval": 5, "grace": 5}}, "longer than the interval"),
    ({"overrides": {"optimizer.params.lr": 0.1}}, "both searched"),
])
def test_sweep_file_errors_name_their_key(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        sweeping.load_sweep(write_sweep(tmp_path, **change))


@pytest.mark.parametrize("space, message", [
    ({"trainer.batch_size": {"int": [0, 64]}}, r"space.trainer.batch_size: the space reaches a value the recipe refuses "
                                               r"\(trainer.batch_size=0\)"),
    ({"optimizer.params.lrr": {"float": [0.001, 0.1]}}, "space.optimizer.params.lrr"),
    ({"losses[1].params.temperature": {"float": [1, 4]}}, "space.losses"),
    # two dimensions, the second to blame: the error names it, not the first
    ({"optimizer.params.lr": {"float": [0.001, 0.1]}, "trainer.batch_size": {"int": [0, 64]}},
     r"^space.trainer.batch_size: "),
])
def test_every_value_of_the_space_is_checked_before_any_trial(tmp_path: Path, space: dict[str, Any], message: str) -> None:
    path = write_sweep(tmp_path, space=space)
    with pytest.raises(RecipeError, match=message):
        sweep(str(path))
    assert not (tmp_path / "runs").exists()  # nothing written: no study, no trial


def test_objective_defaults_to_the_headline_and_other_metrics_need_a_direction(tmp_path: Path) -> None:
    s = sweeping.load_sweep(write_sweep(tmp_path))
    assert sweeping.check_sweep(s, dry_run=False) == ("student/accuracy", "maximize")
    other = sweeping.load_sweep(write_sweep(tmp_path, objective={"metric": "student/top5_accuracy"}))
    with pytest.raises(RecipeError, match="objective.direction is needed"):
        sweeping.check_sweep(other, dry_run=False)
    missing = sweeping.load_sweep(write_sweep(tmp_path))
    missing.recipe = tmp_path / "nope.yaml"
    with pytest.raises(RecipeError, match="does not exist"):
        sweeping.check_sweep(missing)


def test_the_shipped_temperature_sweep_is_valid() -> None:
    s = sweeping.load_sweep(ROOT / "recipes" / "digits" / "sweep-temperature.yaml")
    assert s.recipe == ROOT / "recipes" / "digits" / "kd.yaml"
    assert list(s.space) == ["losses[1].params.temperature"] and s.space["losses[1].params.temperature"].log
    assert s.trials == 8 and s.overrides["trainer.epochs"] <= 15
    assert sweeping.check_sweep(s, dry_run=False) == ("student/accuracy", "maximize")


# -- the budget and the samplers -------------------------------------------------------------
def test_the_budget_counts_reruns_once_and_skips_surplus_trials() -> None:
    study = optuna.create_study()
    state = optuna.trial.TrialState
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}

    def add(s: Any, **attrs: Any) -> None:
        study.add_trial(optuna.create_trial(state=s, params={"x": 0.5}, distributions=dist,
                                            value=0.5 if s == state.COMPLETE else None,
                                            user_attrs=attrs.get("user", {}), system_attrs=attrs.get("system", {})))

    add(state.COMPLETE)                                    # 0 counts
    add(state.FAIL)                                        # 1 an error: counts
    add(state.FAIL, user={"interrupted": True})            # 2 rerun as 4: does not count
    add(state.FAIL, user={"surplus": True})                # 3 surplus: does not count
    add(state.WAITING, system={"failed_trial": 2, "retry_history": [2]})  # 4 the rerun of 2: counts
    add(state.PRUNED)                                      # 5 counts
    assert [t.number for t in sweeping.budget_trials(study.get_trials())] == [0, 1, 4, 5]


def test_samplers_are_seeded_per_trial_number(tmp_path: Path) -> None:
    s = sweeping.load_sweep(write_sweep(tmp_path, sampler={"name": "tpe", "seed": 3}))

    def proposals(numbers: int) -> list[float]:
        study = optuna.create_study(sampler=sweeping.make_sampler(s), direction="maximize")
        values = []
        for _ in range(numbers):
            trial = study.ask()
            values.append(s.space["optimizer.params.lr"].suggest(trial))
            study.tell(trial, 0.5)
        return values

    first, again = proposals(3), proposals(3)
    assert first == again and len(set(first)) == 3  # the same search every time; no trial repeats another


# -- trials -------------------------------------------------------------------------------------
def test_a_sweep_runs_every_trial_as_a_run_directory_and_writes_its_report(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_sweep(tmp_path, space={"optimizer.params.lr": {"float": [0.001, 0.1], "log": True},
                                        "student.params.hidden": {"choice": [[8], [16]]}})
    assert sweep(str(path)) == 0
    out = capsys.readouterr().out
    assert "trial 0 [lr=" in out and "rank" in out and "2 trial(s): 2 complete" in out
    study = study_of(path)
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1] and all(t.state.name == "COMPLETE" for t in trials)
    for t in trials:
        run_dir = tmp_path / "runs" / "s" / f"trial-{t.number:03d}"
        assert t.user_attrs["run_dir"] == str(run_dir)
        summary = json.loads((run_dir / "summary.json").read_text())
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
        assert t.value == summary["student/accuracy"]
        assert recipe["optimizer"]["params"]["lr"] == t.params["optimizer.params.lr"]
        assert recipe["student"]["params"]["hidden"] == json.loads(t.params["student.params.hidden"])
    report = tmp_path / "runs" / "s" / "report"
    data = json.loads((report / "sweep.json").read_text())
    assert [r["number"] for r in data["trials"]] == [0, 1] and data["best"][0]["value"] == study.best_value
    figures = {f["file"] for f in data["figures"]}
    assert figures == {"objective-vs-optimizer.params.lr.png", "objective-vs-student.params.hidden.png", "history.png",
                       "pairs.png"}
    for name in figures:
        assert png_size(report / name) == (600, 460)
    page = (report / "index.html").read_text()
    for link in re.findall(r'(?:src|href)="([^"]+)"', page):
        assert (report / link).is_file(), link
    # a rerun finds the budget full and only reports; a larger --trials extends the study
    assert sweep(str(path)) == 0 and len(study_of(path).get_trials()) == 2
    assert sweep(str(path), "--trials", "3") == 0
    assert [t.state.name for t in study_of(path).get_trials()] == ["COMPLETE"] * 3
    with pytest.raises(RecipeError, match="no study 'again'"):
        sweep(str(write_sweep(tmp_path, name="again")), "--report-only")


def test_another_base_recipe_is_refused_by_an_existing_study(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, trials=1)
    assert sweep(str(path)) == 0
    write_sweep(tmp_path, trials=1, recipe={**TINY, "trainer": {**TINY["trainer"], "batch_size": 64}})
    with pytest.raises(RecipeError, match="was started with another recipe"):
        sweep(str(path))


def test_a_study_whose_marks_are_half_written_is_joined_and_a_different_mark_is_refused(tmp_path: Path) -> None:
    """Two workers start at once: one finds the other's study with only some of its marks written yet."""
    s = sweeping.load_sweep(write_sweep(tmp_path))
    study = optuna.create_study(study_name=s.name, storage=sweeping.make_storage(s), direction="maximize")
    first = next(iter(sweeping.fingerprint(s).items()))
    study.set_user_attr(*first)  # the other worker got this far
    joined = sweeping.open_study(s, "maximize", "student/accuracy")
    assert set(joined.user_attrs) == {*sweeping.fingerprint(s), "kdforge.metric"}
    with pytest.raises(RecipeError, match="started with another metric"):
        sweeping.open_study(s, "maximize", "student/top5_accuracy")


def test_two_worker_processes_share_one_study_without_losing_or_repeating_a_trial(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, trials=4, sampler={"name": "tpe", "seed": 0})
    command = [sys.executable, "-m", "kdforge.sweep", str(path), "--no-report"]
    workers = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]  # both at once, on a study that does not exist yet
    outputs = [w.communicate(timeout=240) for w in workers]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]
    trials = study_of(path).get_trials()
    counted = sweeping.budget_trials(trials)
    assert [t.number for t in counted] == list(range(4)) and all(t.state.name == "COMPLETE" for t in counted)
    extra = [t for t in trials if t not in counted]
    assert all(t.user_attrs.get("surplus") and "run_dir" not in t.user_attrs for t in extra)
    dirs = sorted((tmp_path / "runs" / "s").glob("trial-*"))
    assert [d.name for d in dirs] == [f"trial-{t.number:03d}" for t in counted]
    assert all((d / "summary.json").is_file() for d in dirs)
    assert len({t.params["optimizer.params.lr"] for t in counted}) == 4  # no values run twice
    assert len({t.user_attrs["pid"] for t in counted}) == 2  # both workers ran trials
    lines = [line for out, _ in outputs for line in out.splitlines() if ": trial " in line]
    assert sorted(int(line.split(": trial ")[1].split()[0]) for line in lines) == [t.number for t in counted]


def test_a_killed_sweep_continues_and_reruns_the_killed_trial_from_its_checkpoint(tmp_path: Path) -> None:
    # enough epochs that the kill lands mid-run on a fast machine (3 epochs could finish between two polls)
    recipe = {**TINY, "trainer": {**TINY["trainer"], "epochs": 30, "batch_size": 64}}
    path = write_sweep(tmp_path, trials=1, recipe=recipe, heartbeat={"interval": 1, "grace": 3})
    trial_dir = tmp_path / "runs" / "s" / "trial-000"
    worker = subprocess.Popen([sys.executable, "-m", "kdforge.sweep", str(path), "--no-report"], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any((trial_dir / "checkpoints").glob("epoch-*")):  # older checkpoints are rotated away
        assert worker.poll() is None, worker.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "trial 0 never checkpointed"
        time.sleep(0.02)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    assert not (trial_dir / "summary.json").exists()
    [killed] = study_of(path).get_trials()
    assert killed.state.name == "RUNNING"  # as the kill left it
    assert sweep(str(path), "--no-report") == 0  # waits for the heartbeat to go stale, then reruns trial 0
    trials = study_of(path).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    rerun = trials[1]
    assert sweeping.budget_trials(trials) == [rerun] and rerun.system_attrs["failed_trial"] == 0
    assert rerun.params == killed.params and rerun.user_attrs["resumed"] is True
    assert rerun.user_attrs["run_dir"] == str(trial_dir)
    assert eval_epochs(trial_dir) == list(range(1, 31))  # resumed: no epoch twice, none lost
    assert json.loads((trial_dir / "summary.json").read_text())["student/accuracy"] == rerun.value


def test_an_interrupted_trial_is_queued_again_with_the_same_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import kdforge
    from kdforge.errors import TrainingStopped

    path = write_sweep(tmp_path, trials=1)
    real = kdforge.run

    def interrupted(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise TrainingStopped("interrupted at step 3 (epoch 1); saved ...", exit_code=130)

    monkeypatch.setattr(kdforge, "run", interrupted)
    assert sweep(str(path)) == 130
    assert "interrupted; rerun the same command" in capsys.readouterr().out
    first, queued = study_of(path).get_trials()
    assert first.state.name == "FAIL" and first.user_attrs["interrupted"]
    assert queued.state.name == "WAITING" and queued.params == first.params
    monkeypatch.setattr(kdforge, "run", real)
    assert sweep(str(path)) == 0
    trials = study_of(path).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"] and trials[1].params == first.params
    assert trials[1].user_attrs["run_dir"].endswith("trial-000")


def test_pruning_on_per_epoch_metrics_with_a_journal_storage(tmp_path: Path) -> None:
    recipe = {**TINY, "trainer": {**TINY["trainer"], "epochs": 3}}
    path = write_sweep(tmp_path, recipe=recipe, space={"optimizer.params.lr": {"choice": [0.05, 1e-6]}},
                       trials=5, sampler={"name": "grid", "seed": 0}, storage="journal",
                       pruner={"name": "threshold", "params": {"lower": 0.5}})
    assert sweeping.load_sweep(path).trials == 2  # a grid of two points
    assert sweep(str(path)) == 0
    assert (tmp_path / "runs" / "s" / "study.journal").is_file() and not (tmp_path / "runs" / "s" / "study.db").exists()
    trials = {t.params["optimizer.params.lr"]: t for t in study_of(path).get_trials()}
    assert trials[0.05].state.name == "COMPLETE" and trials[0.05].value > 0.5
    pruned = trials[1e-6]
    assert pruned.state.name == "PRUNED" and list(pruned.intermediate_values) == [1]
    run_dir = Path(pruned.user_attrs["run_dir"])
    assert eval_epochs(run_dir) == [1] and not (run_dir / "summary.json").exists()
    data = json.loads((tmp_path / "runs" / "s" / "report" / "sweep.json").read_text())
    assert sorted(r["state"] for r in data["trials"]) == ["complete", "pruned"]


def test_missing_optuna_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(RecipeError, match=r"pip install 'kdforge\[sweep\]'"):
        sweep(str(write_sweep(tmp_path)))


def test_cli_sweep(tmp_path: Path) -> None:
    """Needs the lead's wiring: ``kdforge sweep`` as a subcommand."""
    path = write_sweep(tmp_path, trials=1)
    result = run_cli("sweep", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rank" in result.stdout and (tmp_path / "runs" / "s" / "trial-000" / "summary.json").is_file()
    bad = run_cli("sweep", str(write_sweep(tmp_path, name="bad", trials=0)), cwd=tmp_path)
    assert bad.returncode == 2 and "trials" in bad.stderr and bad.stderr.count("\n") == 1
