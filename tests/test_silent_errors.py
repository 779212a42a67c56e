"""Fixes for numbers that used to come out wrong without a word. Each test fails on kdforge 0.1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import kdforge
from conftest import base_recipe, run_cli
from test_faults import FAULTY, write_recipe


# -- loss math stays float32 under autocast ----------------------------------------------
def _outputs(dtype: torch.dtype) -> kdforge.StepOutputs:
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=gen) * 3, torch.randn(16, 10, generator=gen) * 3
    fs, ft = torch.randn(16, 8, 4, 4, generator=gen), torch.randn(16, 8, 4, 4, generator=gen)
    return kdforge.StepOutputs(student=kdforge.ModelOutputs(s.to(dtype), {"f": fs.to(dtype)}),
                               teacher=kdforge.ModelOutputs(t.to(dtype), {"f": ft.to(dtype)}),
                               targets=torch.arange(16) % 10)


@pytest.mark.parametrize(("name", "params"), [
    ("relational", {}),
    ("relational", {"student_tap": "f", "teacher_tap": "f"}),
    ("attention", {"student_taps": ["f"], "teacher_taps": ["f"]}),
    ("kd", {}),
    ("ce", {}),
])
def test_loss_math_stays_float32_under_bf16_autocast(name: str, params: dict) -> None:
    loss = kdforge.create("loss", name, **params)
    exact = loss(_outputs(torch.float32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # float32 inputs: autocast would run the losses' matmuls in bf16 without the fix
        under_autocast = loss(_outputs(torch.float32))
    assert under_autocast.dtype == torch.float32
    assert torch.allclose(under_autocast, exact, rtol=1e-6, atol=1e-7), (under_autocast.item(), exact.item())


# -- resume keeps the schedules' length -------------------------------------------------
def _lr_recipe(tmp_path: Path, epochs: int) -> dict:
    return base_recipe(tmp_path, optimizer={"name": "sgd", "params": {
        "lr": {"schedule": "linear", "params": {"start": 0.1, "end": 0.01}}}},
        trainer={"epochs": epochs, "batch_size": 256, "progress_bar": False, "log_every": 1})


def test_resume_with_more_epochs_does_not_restretch_the_schedules(tmp_path: Path) -> None:
    kdforge.run(_lr_recipe(tmp_path, 2))
    summary = kdforge.run(_lr_recipe(tmp_path, 4), resume=True)
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    lrs = [(r["step"], r["train/lr"]) for r in records if "train/lr" in r]
    per_epoch = 5  # 1,257 samples at batch 256
    after = [lr for step, lr in lrs if step > 2 * per_epoch]
    assert after and all(lr == pytest.approx(0.01) for lr in after), lrs  # the schedule's end holds
    before = [lr for step, lr in lrs if step <= 2 * per_epoch]
    assert before[0] == pytest.approx(0.1) and before == sorted(before, reverse=True)
    assert summary["train/total_steps"] == 2 * per_epoch  # the run's length as it started


# -- Ctrl-C after a non-finite step writes no checkpoint --------------------------------------
def test_an_interrupt_right_after_a_nonfinite_step_writes_no_checkpoint(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, "nan_interrupt", at=0.55, log_every=100)
    result = run_cli("run", str(path), env=FAULTY)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "became nan or inf" in result.stderr.strip().splitlines()[-1]
    names = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert not [n for n in names if n.startswith("step-")], names  # no checkpoint of NaN weights
    for name in names:
        weights = load_file(str(tmp_path / "run/checkpoints" / name / "model.safetensors"))
        assert all(torch.isfinite(t).all() for t in weights.values())


# -- a step the grad scaler skipped is not counted ----------------------------------------------
class _InfGradient(torch.autograd.Function):
    """Identity forward; backward returns inf once ``armed`` (the overflow fp16 can produce)."""

    armed = False

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad * float("inf") if _InfGradient.armed else grad


class OverflowingLoss(torch.nn.Module):
    """CE on logits whose gradient overflows while ``_InfGradient.armed``."""

    def forward(self, out: kdforge.StepOutputs) -> torch.Tensor:
        logits = _InfGradient.apply(out.student.logits.float())
        return torch.nn.functional.cross_entropy(logits, out.targets.clamp_min(0))


class StepCounter(torch.nn.Module):
    """Counts on_step_end calls (what an EMA teacher's update rides on)."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    def forward(self, out: kdforge.StepOutputs) -> torch.Tensor:
        return out.student.logits.sum() * 0.0

    def on_step_end(self, run: kdforge.RunContext) -> None:
        self.steps += 1


class _Plugin:
    @kdforge.hookimpl
    def register_losses(self, register):
        register("overflowing", OverflowingLoss)
        register("step_counter", StepCounter)


@pytest.fixture
def overflow_plugin():
    plugin = _Plugin()
    kdforge.register_plugin(plugin, name="overflow-test")
    yield
    kdforge.unregister_plugin(plugin)
    _InfGradient.armed = False


def test_a_step_the_grad_scaler_skipped_is_not_counted(tmp_path: Path, overflow_plugin) -> None:
    from accelerate.optimizer import AcceleratedOptimizer

    from kdforge.build import build_run
    from kdforge.loop import prepare_session, train_step, windows
    from kdforge.recipe import load_recipe
    from kdforge.runner import install_taps, make_accelerator

    recipe = load_recipe(base_recipe(tmp_path, losses=[{"name": "overflowing"}, {"name": "step_counter"}],
                                     optimizer={"name": "sgd", "params": {"lr": {"schedule": "linear",
                                                                                  "params": {"start": 0.1, "end": 0.0}}}},
                                     trainer={"epochs": 1, "batch_size": 64, "progress_bar": False}))
    built = build_run(recipe)
    accelerator = make_accelerator(recipe, tmp_path / "run")
    session = prepare_session(built, accelerator, tmp_path / "run", *install_taps(built), None)
    # fp16's loss scaling, on the CPU: a real torch GradScaler inside Accelerate's optimizer wrapper
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    accelerator.scaler = scaler
    session.optimizer = AcceleratedOptimizer(session.optimizer.optimizer, scaler=scaler)
    from kdforge.stats import LossStats

    session.stats = LossStats(len(session.terms), "cpu")
    session.step_tensor = torch.ones(())
    batches = windows(iter(session.train_loader), built.task, 1)
    before = {k: v.clone() for k, v in built.student.state_dict().items()}
    _InfGradient.armed = True
    train_step(session, next(batches))
    counter = accelerator.unwrap_model(session.loss_modules[1])
    assert session.optimizer.step_was_skipped
    assert session.state.step == 0 and session.state.scaler_skipped_steps == 1
    assert counter.steps == 0  # no callback for a step that did not happen
    assert session.scheduler.scheduler.last_epoch == 0  # the lr schedule did not move on
    assert all(torch.equal(before[k], v) for k, v in built.student.state_dict().items())
    _InfGradient.armed = False
    train_step(session, next(batches))
    assert not session.optimizer.step_was_skipped
    assert session.state.step == 1 and counter.steps == 1 and session.scheduler.scheduler.last_epoch == 1


# -- the dry run wants a 0-d loss ---------------------------------------------------------------
class VectorLoss(torch.nn.Module):
    """Returns shape (1,): a loss that forgot to reduce."""

    def forward(self, out: kdforge.StepOutputs) -> torch.Tensor:
        return out.student.logits.float().pow(2).mean().reshape(1)


class _VectorPlugin:
    @kdforge.hookimpl
    def register_losses(self, register):
        register("vector", VectorLoss)


def test_the_dry_run_refuses_a_loss_of_shape_one(tmp_path: Path) -> None:
    plugin = _VectorPlugin()
    kdforge.register_plugin(plugin, name="vector-test")
    try:
        with pytest.raises(kdforge.RecipeError, match=r"losses\[0\].*0-d tensor.*shape \(1,\)"):
            kdforge.validate(base_recipe(tmp_path, losses=[{"name": "vector"}]), dry_run=True)
    finally:
        kdforge.unregister_plugin(plugin)
    assert not (tmp_path / "run").exists()


# -- gradient accumulation weighs every sample the same ----------------------------------------
def _accumulation_recipe(tmp_path: Path, batch: int, accumulate: int) -> dict:
    return base_recipe(
        tmp_path,
        data={"name": "synthetic", "params": {"shape": [12], "num_classes": 3, "train_size": 76, "eval_size": 8}},
        student={"name": "mlp", "params": {"hidden": [16]}},  # no batch statistics, no dropout
        optimizer={"name": "sgd", "params": {"lr": 0.5}},
        trainer={"epochs": 2, "batch_size": batch, "gradient_accumulation_steps": accumulate,
                 "progress_bar": False})


def test_accumulating_two_batches_equals_one_batch_twice_as_big(tmp_path: Path) -> None:
    # 76 samples: batches of 24 are 24, 24, 24, 4, so the second window is (24, 4), and must weigh
    # its samples as one batch of 28 does (24/28 and 4/28, not 1/2 each)
    small = kdforge.run(_accumulation_recipe(tmp_path / "a", 24, 2))
    big = kdforge.run(_accumulation_recipe(tmp_path / "b", 48, 1))
    assert small["train/steps"] == big["train/steps"] == 4
    a = load_file(str(tmp_path / "a/run/student.safetensors"))
    b = load_file(str(tmp_path / "b/run/student.safetensors"))
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-6), key


# -- max_grad_norm really clips --------------------------------------------------------------------
def test_max_grad_norm_clips_the_update(tmp_path: Path) -> None:
    def one_step(out: Path, clip: float | None) -> float:
        recipe = base_recipe(out, data={"name": "synthetic", "params": {"shape": [12], "num_classes": 3, "train_size": 32,
                                                                        "eval_size": 8}},
                             student={"name": "mlp", "params": {"hidden": [16]}},
                             optimizer={"name": "sgd", "params": {"lr": 1.0}},
                             trainer={"epochs": 1, "batch_size": 32, "progress_bar": False, "max_grad_norm": clip})
        from kdforge.build import build_run
        from kdforge.recipe import load_recipe

        initial = build_run(load_recipe(recipe)).student.state_dict()  # what the run starts from
        kdforge.run(recipe)
        final = load_file(str(out / "run/student.safetensors"))
        return float(torch.sqrt(sum(((final[k] - initial[k]) ** 2).sum() for k in final)))

    unclipped = one_step(tmp_path / "free", None)
    clipped = one_step(tmp_path / "clip", 0.01)
    assert unclipped > 0.05
    assert clipped == pytest.approx(0.01, rel=1e-4)  # SGD, lr 1: the step is the clipped gradient


def test_process_wide_torch_settings_come_back_after_a_run(tmp_path: Path) -> None:
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    kdforge.run(base_recipe(tmp_path, trainer={"epochs": 1, "progress_bar": False}))
    assert (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) == before


def test_another_precision_in_the_same_process_is_a_clear_recipe_error(tmp_path: Path) -> None:
    # Accelerate fixes the precision once per process: kdforge says so instead of resetting its private state
    script = (
        "import kdforge, sys\n"
        "from conftest import base_recipe\n"
        "from pathlib import Path\n"
        "t = Path(sys.argv[1])\n"
        "kdforge.run(base_recipe(t / 'a', trainer={'epochs': 1, 'progress_bar': False}))\n"
        "try:\n"
        "    kdforge.run(base_recipe(t / 'b', trainer={'epochs': 1, 'progress_bar': False, 'mixed_precision': 'bf16'}))\n"
        "except kdforge.RecipeError as exc:\n"
        "    print('REFUSED', exc)\n"
    )
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                            cwd=Path(__file__).parent, timeout=300)
    assert "REFUSED trainer.mixed_precision:" in result.stdout, result.stderr[-2000:]
    assert not (tmp_path / "b/run").exists()
    assert yaml.safe_load((tmp_path / "a/run/recipe.yaml").read_text())["trainer"]["epochs"] == 1


def test_resuming_a_0_1_checkpoint_with_more_epochs_keeps_its_schedules(tmp_path: Path) -> None:
    # a state of kdforge 0.1 records no total_steps: the run's length comes from its own recipe
    kdforge.run(_lr_recipe(tmp_path, 2))
    for state_file in (tmp_path / "run/checkpoints").glob("*/kdforge_state.json"):
        state = json.loads(state_file.read_text())
        del state["total_steps"]
        state_file.write_text(json.dumps(state))
    kdforge.run(_lr_recipe(tmp_path, 4), resume=True)
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    after = [r["train/lr"] for r in records if "train/lr" in r and r["step"] > 10]
    assert after and all(lr == pytest.approx(0.01) for lr in after)


def test_a_nonfinite_gradient_with_finite_losses_stops_the_run(tmp_path: Path, overflow_plugin) -> None:
    _InfGradient.armed = True
    recipe = base_recipe(tmp_path, losses=[{"name": "overflowing"}],
                         trainer={"epochs": 1, "batch_size": 256, "progress_bar": False, "max_grad_norm": 1.0})
    from kdforge.errors import TrainingStopped

    with pytest.raises(TrainingStopped, match=r"the gradient \(with finite losses\) became nan or inf at step 1 "):
        kdforge.run(recipe)
