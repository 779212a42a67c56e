"""File-system faults, run-directory races and hostile command lines: one clear line, nothing lost.

Each test here failed on kdforge 0.1 (a traceback, a hang, a lost or corrupted run, or a
silently wrong result).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import KDFORGE, ROOT, base_recipe, run_cli


def write(tmp_path: Path, recipe: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("kdforge: error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished small run and its recipe."""
    tmp = tmp_path_factory.mktemp("finished")
    path = write(tmp, base_recipe(tmp, trainer={"epochs": 1, "batch_size": 128, "progress_bar": False}))
    assert run_cli("run", str(path)).returncode == 0
    return path, tmp / "run"


# -- data loss ---------------------------------------------------------------------------------
def test_a_late_recipe_error_with_overwrite_leaves_the_finished_run_byte_for_byte(finished) -> None:
    path, run_dir = finished
    before = tree_digest(run_dir)
    result = run_cli("run", str(path), "--set", "trainer.batch_size=100000", "--set", "trainer.drop_last=true",
                     "--overwrite")
    one_error_line(result, "trainer.batch_size", "no training batch")
    assert tree_digest(run_dir) == before


def test_a_late_recipe_error_creates_no_run_directory(tmp_path: Path) -> None:
    path = write(tmp_path, base_recipe(tmp_path, trainer={"epochs": 1, "batch_size": 100000, "drop_last": True}))
    one_error_line(run_cli("run", str(path)), "no training batch")
    assert not (tmp_path / "run").exists()


def test_a_chain_checks_every_output_directory_before_training(tmp_path: Path, finished) -> None:
    path, _ = finished
    fresh = write(tmp_path, base_recipe(tmp_path, trainer={"epochs": 1, "progress_bar": False}), "fresh.yaml")
    line = one_error_line(run_cli("run", str(fresh), str(fresh)), "writes to", "as", "own output_dir")
    assert "fresh.yaml" in line
    assert not (tmp_path / "run").exists()  # the first recipe did not train
    one_error_line(run_cli("run", str(fresh), str(path)), "already holds a run")
    assert not (tmp_path / "run").exists()


# -- paths ---------------------------------------------------------------------------------------
def test_unusable_output_directories_are_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, base_recipe(tmp_path, trainer={"epochs": 1, "progress_bar": False}))
    (tmp_path / "a-file").write_text("x")
    one_error_line(run_cli("run", str(path), "--output-dir", str(tmp_path / "a-file" / "run")), "output_dir",
                   "a regular file")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    one_error_line(run_cli("run", str(path), "--output-dir", str(tmp_path / "dangling")), "output_dir", "does not exist")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)], capture_output=True)
    if mounted.returncode != 0:  # without the privilege to mount, a mode that stops a non-root user
        readonly.chmod(0o555)
        if os.geteuid() == 0:
            pytest.skip("running as root without the right to mount a read-only file system")
    try:
        one_error_line(run_cli("run", str(path), "--output-dir", str(readonly / "run")), "output_dir", "cannot write in")
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", str(readonly)], check=True)


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "directory", "huge"])
def test_a_recipe_path_that_is_not_a_regular_file_is_refused_before_reading(kind: str, tmp_path: Path) -> None:
    if kind == "dev-zero":
        path = Path("/dev/zero")
    elif kind == "fifo":
        path = tmp_path / "fifo.yaml"
        os.mkfifo(path)
    elif kind == "directory":
        path = tmp_path
    else:
        path = tmp_path / "huge.yaml"
        path.write_text("name: x\n" + "# padding\n" * 300_000)
    start = time.perf_counter()
    result = run_cli("validate", str(path), timeout=60)
    one_error_line(result, str(path))
    assert time.perf_counter() - start < 30
    if kind == "huge":
        assert "MiB" in result.stderr


# -- resume -----------------------------------------------------------------------------------------
def _run_with_checkpoint(tmp_path: Path, epochs: int = 2) -> tuple[Path, Path]:
    path = write(tmp_path, base_recipe(tmp_path, trainer={"epochs": epochs, "batch_size": 128, "progress_bar": False}))
    assert run_cli("run", str(path)).returncode == 0
    return path, tmp_path / "run"


@pytest.mark.parametrize("damage", ["invalid yaml", "missing", "a list"])
def test_resume_with_a_damaged_run_recipe_is_one_line(damage: str, tmp_path: Path) -> None:
    path, run_dir = _run_with_checkpoint(tmp_path)
    recipe = run_dir / "recipe.yaml"
    if damage == "invalid yaml":
        recipe.write_text("name: [unclosed\n")
    elif damage == "missing":
        recipe.unlink()
    else:
        recipe.write_text("- 1\n- 2\n")
    one_error_line(run_cli("run", str(path), "--set", "trainer.epochs=3", "--resume"), "--resume", "recipe.yaml",
                   "--overwrite")


@pytest.mark.parametrize("damage", [{"step": "three"}, {"epoch": None, "step": None}, {"history": 7}, "drop epoch"])
def test_resume_with_a_damaged_checkpoint_state_is_one_line(damage, tmp_path: Path) -> None:
    path, run_dir = _run_with_checkpoint(tmp_path)
    state_file = run_dir / "checkpoints/epoch-0002/kdforge_state.json"
    state = json.loads(state_file.read_text())
    if damage == "drop epoch":
        del state["epoch"]
    else:
        state.update(damage)
    state_file.write_text(json.dumps(state))
    result = run_cli("run", str(path), "--set", "trainer.epochs=3", "--resume")
    if isinstance(damage, dict) and "step" in damage:
        # a state without a readable step is not a complete checkpoint: the older one is used
        assert result.returncode == 0, result.stderr[-2000:]
        assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 3
    else:
        one_error_line(result, "--resume", "epoch-0002", "kdforge_state.json", "damaged")


def test_resume_with_a_model_file_of_another_architecture_is_one_line(tmp_path: Path) -> None:
    path, run_dir = _run_with_checkpoint(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    other_path = write(other, base_recipe(other, student={"name": "mlp", "params": {"hidden": [7]}},
                                          trainer={"epochs": 1, "batch_size": 256, "progress_bar": False}))
    assert run_cli("run", str(other_path)).returncode == 0
    (run_dir / "checkpoints/epoch-0002/model.safetensors").write_bytes(
        (other / "run/checkpoints/epoch-0001/model.safetensors").read_bytes())
    one_error_line(run_cli("run", str(path), "--set", "trainer.epochs=3", "--resume"), "--resume", "do not fit")


def test_a_run_killed_before_its_first_checkpoint_can_be_started_again(tmp_path: Path) -> None:
    path, run_dir = _run_with_checkpoint(tmp_path, epochs=1)
    import shutil

    shutil.rmtree(run_dir / "checkpoints")
    (run_dir / "summary.json").unlink()
    resumed = run_cli("run", str(path), "--resume")
    one_error_line(resumed, "saved no complete checkpoint", "without --resume")
    again = run_cli("run", str(path))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "starting it over" in again.stderr
    assert (run_dir / "summary.json").exists()


def test_overwrite_removes_everything_an_earlier_run_wrote(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")  # there before any run: kept
    byot = base_recipe(tmp_path, student={"name": "small_cnn", "params": {"channels": [8, 16]}},
                       losses=[{"name": "byot", "params": {"taps": ["features.0"], "deep_tap": "features.1"}}],
                       trainer={"epochs": 1, "batch_size": 256, "progress_bar": False})
    assert run_cli("run", str(write(tmp_path, byot, "byot.yaml"))).returncode == 0
    assert (tmp_path / "run/early_exits").is_dir()
    plain = write(tmp_path, base_recipe(tmp_path, trainer={"epochs": 1, "batch_size": 256, "progress_bar": False}))
    assert run_cli("run", str(plain), "--overwrite").returncode == 0
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert "early_exits" not in names and "notes.txt" in names
    assert (tmp_path / "run/notes.txt").read_text() == "mine"


def test_two_runs_in_one_directory_one_runs_the_other_is_refused(tmp_path: Path) -> None:
    recipe = base_recipe(tmp_path, trainer={"epochs": 2, "batch_size": 128, "progress_bar": False, "log_every": 5})
    path = write(tmp_path, recipe)
    release = tmp_path / "release"
    # the first run holds still after its first epoch until the second has been refused (no race on speed)
    script = ("import sys, time, kdforge\n"
              "from pathlib import Path\n"
              "class Hold:\n"
              "    def on_epoch_end(self, run):\n"
              "        Path(sys.argv[2] + '.held').touch()\n"
              "        while not Path(sys.argv[2]).exists(): time.sleep(0.02)\n"
              "kdforge.run(sys.argv[1], callbacks=[Hold()])\n")
    first = subprocess.Popen([sys.executable, "-c", script, str(path), str(release)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "release.held").exists():
        assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() is not None else ""
        time.sleep(0.02)
    second = run_cli("run", str(path), "--overwrite")
    line = one_error_line(second, "in use by another kdforge run", f"pid {first.pid}")
    assert str(tmp_path / "run") in line
    release.touch()
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    steps = [json.loads(x)["step"] for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()
             if "train/loss" in x]
    assert steps == sorted(set(steps))  # one run's records, in order
    assert (tmp_path / "run/summary.json").is_file()


def test_resume_and_overwrite_together_are_a_usage_error(finished) -> None:
    path, _ = finished
    one_error_line(run_cli("run", str(path), "--resume", "--overwrite"), "--resume and --overwrite")


# -- disk full -------------------------------------------------------------------------------------
def test_a_full_disk_while_checkpointing_is_one_message(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("no privilege to mount a small file system")
    try:
        recipe = base_recipe(tmp_path, student={"name": "mlp", "params": {"hidden": [256]}},
                             trainer={"epochs": 2, "batch_size": 256, "progress_bar": False})
        result = run_cli("run", str(write(tmp_path, recipe)), "--output-dir", str(small / "run"))
        assert result.returncode == 1, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert "no space left on device" in result.stderr.strip().splitlines()[-1]
    finally:
        # busy if the run left a file open (the failed writer's frames held it until a garbage collection)
        subprocess.run(["umount", str(small)], check=True)


# -- the command line ------------------------------------------------------------------------------
def test_a_closed_or_full_stdout_is_handled_like_unix_tools() -> None:
    for _ in range(3):
        piped = subprocess.run(f"{' '.join(KDFORGE)} plugins --json | head -c 10", shell=True, capture_output=True,
                               text=True, cwd=ROOT, timeout=120)
        assert "Traceback" not in piped.stderr and "Error" not in piped.stderr, piped.stderr
    with open("/dev/full", "w") as full:
        result = subprocess.run([*KDFORGE, "plugins"], stdout=full, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "kdforge: error: cannot write to standard output: No space left on device"


def test_compare_survives_a_deeply_nested_or_non_finite_summary(tmp_path: Path) -> None:
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "summary.json").write_text("[" * 100_000 + "]" * 100_000)
    one_error_line(run_cli("compare", str(deep)), "nested too deeply")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "summary.json").write_text('{"name": "odd", "student/accuracy": NaN, "wall_seconds": Infinity}')
    result = run_cli("compare", "--json", str(odd))
    assert result.returncode == 0
    assert json.loads(result.stdout)[0]["student/accuracy"] is None  # strict JSON: no NaN
    assert "NaN" not in result.stdout and "Infinity" not in result.stdout


@pytest.mark.parametrize("kind", ["directory", "dev-zero", "fifo", "loop"])
def test_a_weights_path_that_is_not_a_file_says_what_it_is(kind: str, tmp_path: Path) -> None:
    import kdforge

    target = {"directory": tmp_path, "dev-zero": Path("/dev/zero"), "fifo": tmp_path / "w.pt", "loop": tmp_path / "loop.pt"}[kind]
    if kind == "fifo":
        os.mkfifo(target)
    if kind == "loop":
        target.symlink_to(target)
    expected = {"directory": "is a directory", "dev-zero": "is a device", "fifo": "is a FIFO", "loop": "symlink loop"}[kind]
    with pytest.raises(kdforge.RecipeError, match=expected):
        kdforge.load_state_dict(target)


def test_an_infinite_learning_rate_is_a_plain_message(finished) -> None:
    path, _ = finished
    line = one_error_line(run_cli("validate", str(path), "--set", "optimizer.params.lr=1e309"), "optimizer.params.lr")
    assert "input should be a finite number" in line and "Tensor" not in line and ".float" not in line


def test_a_wandb_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "wandb-file").write_text("not a folder")
    recipe = base_recipe(tmp_path, tracking={"wandb": {"project": "p", "dir": str(tmp_path / "wandb-file")}},
                         trainer={"epochs": 1, "progress_bar": False})
    one_error_line(run_cli("run", str(write(tmp_path, recipe))), "tracking.wandb.dir", "is a file")
    assert not (tmp_path / "run").exists()


# -- schedules ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("where", "value"), [("weight", -50.0), ("temperature", -4.0), ("lr", -1.0)])
def test_a_bad_stage_between_the_probes_is_found_before_training(where: str, value: float, tmp_path: Path,
                                                                 digits_teacher: Path) -> None:
    # 30 epochs of 10 steps: the stage from 0.501 to 0.504 holds one step (step 151), between 0.5% probes
    stage = {"schedule": "progressive", "params": {"values": [1.0, value, 1.0], "boundaries": [0.501, 0.504]}}
    kd = {"name": "kd", "weight": 1.0, "params": {"temperature": 2.0}}
    optimizer = {"name": "sgd", "params": {"lr": 0.1}}
    if where == "weight":
        kd["weight"] = stage
    elif where == "temperature":
        kd["params"]["temperature"] = stage
    else:
        optimizer["params"]["lr"] = stage
    recipe = base_recipe(tmp_path, teacher={"name": "checkpoint", "params": {"path": str(digits_teacher)}},
                         losses=[{"name": "ce"}, kd], optimizer=optimizer,
                         trainer={"epochs": 30, "batch_size": 128, "progress_bar": False})
    line = one_error_line(run_cli("run", str(write(tmp_path, recipe))), "progressive")
    assert {"weight": "losses[1].weight", "temperature": "losses[1].params.temperature",
            "lr": "optimizer.params.lr"}[where] in line
    assert not (tmp_path / "run").exists()


# -- SIGTERM -------------------------------------------------------------------------------------------
def test_sigterm_mid_epoch_checkpoints_and_resumes_to_the_same_weights(tmp_path: Path) -> None:
    def recipe(out: Path) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        return write(out, base_recipe(out, student={"name": "small_cnn", "params": {"channels": [8, 16], "dropout": 0.2}},
                                      trainer={"epochs": 4, "batch_size": 32, "progress_bar": False, "keep_checkpoints": 10}))

    full = recipe(tmp_path / "full")
    assert run_cli("run", str(full)).returncode == 0
    cut = recipe(tmp_path / "cut")
    proc = subprocess.Popen([*KDFORGE, "run", str(cut)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    marker = tmp_path / "cut/run/checkpoints/epoch-0001"
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "SIGTERM" in stderr and "interrupted at step" in stderr and "Traceback" not in stderr
    assert [p for p in (tmp_path / "cut/run/checkpoints").iterdir() if p.name.startswith("step-")]
    assert run_cli("run", str(cut), "--resume").returncode == 0
    a = load_file(str(tmp_path / "full/run/student.safetensors"))
    b = load_file(str(tmp_path / "cut/run/student.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0


def test_an_interrupted_pruning_is_finished_at_the_next_checkpoint(tmp_path: Path) -> None:
    path, run_dir = _run_with_checkpoint(tmp_path, epochs=3)
    checkpoints = run_dir / "checkpoints"
    # a pruning cut short: a checkpoint folder whose state file is already gone, and a trashed one
    half = checkpoints / "epoch-0001"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    (checkpoints / ".trash-epoch-0000").mkdir()
    assert run_cli("run", str(path), "--set", "trainer.epochs=4", "--resume").returncode == 0
    names = sorted(p.name for p in checkpoints.iterdir())
    assert names == ["epoch-0003", "epoch-0004"], names


def test_mid_epoch_resume_is_exact_with_workers_and_random_augmentation(tmp_path: Path) -> None:
    # every item is drawn under its own stream (seed, epoch, index): the worker that loads it and a
    # resume in the middle of an epoch change nothing
    def recipe(out: Path) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        return write(out, base_recipe(out, data={"name": "digits", "params": {"shift": 1}},
                                      student={"name": "small_cnn", "params": {"channels": [8, 16], "dropout": 0.2}},
                                      trainer={"epochs": 3, "batch_size": 32, "progress_bar": False, "num_workers": 2,
                                               "keep_checkpoints": 10}))

    full = recipe(tmp_path / "full")
    assert run_cli("run", str(full)).returncode == 0
    cut = recipe(tmp_path / "cut")
    proc = subprocess.Popen([*KDFORGE, "run", str(cut)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    marker = tmp_path / "cut/run/checkpoints/epoch-0001"
    deadline = time.time() + 180
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.005)
    time.sleep(0.3)  # into epoch 2
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, stderr
    step_checkpoints = [p for p in (tmp_path / "cut/run/checkpoints").iterdir() if p.name.startswith("step-")]
    assert step_checkpoints, "stopped mid-epoch"
    assert run_cli("run", str(cut), "--resume").returncode == 0
    a = load_file(str(tmp_path / "full/run/student.safetensors"))
    b = load_file(str(tmp_path / "cut/run/student.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0


def test_compare_keeps_trailing_zeros_so_a_column_lines_up(tmp_path: Path) -> None:
    for name, value in (("round", 79.00299567245172), ("other", 76.85226950630998)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(
            {"name": name, "headline": {"metric": "perplexity", "higher_is_better": False},
             "student/perplexity": value}))
    result = run_cli("compare", str(tmp_path / "round"), str(tmp_path / "other"))
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()[2:]}
    assert rows == {"round": "79.00", "other": "76.85"}


def test_metric_text_shows_a_diverged_value_and_whole_numbers_as_they_are() -> None:
    from kdforge.console import metric_text

    assert metric_text("perplexity", float("nan")) == "nan" and metric_text("perplexity", float("inf")) == "inf"
    assert metric_text("mse", 5) == "5" and metric_text("mse", 10**400) == str(10**400)  # no OverflowError
    assert metric_text("accuracy", 0.9519) == "95.19%" and metric_text("mse", None, missing="-") == "-"
