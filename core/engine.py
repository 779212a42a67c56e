"""The training loop on Hugging Face Accelerate: build -> prepare -> train/eval epochs -> save.

The engine knows no distillation method: it runs the teacher(s) and the student, hands
``StepOutputs`` to each loss plugin, and sums weight x loss.
"""

from __future__ import annotations

import errno
import itertools
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from . import checkpoint as ckpt
from .build import (
    LossTerm,
    build_data,
    build_losses,
    build_model,
    build_optimizer,
    check_recipe,
    data_context,
)
from .errors import RecipeError, TrainingStopped
from .io import write_json_atomic, write_text_atomic
from .outputs import DataSplits, ModelOutputs, StepOutputs
from .recipe import Recipe, load_recipe
from .taps import FeatureTaps, resolve_tap
from .tracking import MetricsFile, wandb_init_kwargs
from .weights import load_weights, save_weights

TEACHER_STATE = "teacher.safetensors"

#: recipe keys that may change between a run and its --resume
RESUMABLE_CHANGES = (
    "trainer.epochs", "trainer.log_every", "trainer.keep_checkpoints", "trainer.num_workers",
    "trainer.progress_bar", "trainer.eval_batch_size", "trainer.checkpoint_every", "tracking", "output_dir",
    "name",
)


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not) in a model."""
    return sum(p.numel() for p in model.parameters())


def split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """A collated batch as (inputs, targets); ``targets`` is ``None`` for an unlabeled split."""
    if isinstance(batch, (list, tuple)):
        if len(batch) == 1:
            return batch[0], None
        if len(batch) >= 2:
            return batch[0], batch[1]
    if isinstance(batch, Mapping) and "inputs" in batch:
        return batch["inputs"], batch.get("targets")
    return batch, None


def batch_size_of(inputs: Any) -> int:
    """Samples in a batch of inputs (a tensor, or a structure of tensors)."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0])
    if isinstance(inputs, Mapping):
        return batch_size_of(next(iter(inputs.values())))
    if isinstance(inputs, (list, tuple)) and inputs:
        return batch_size_of(inputs[0])
    return 0


def _first_batch(dataset: Any, size: int = 2) -> Any:
    loader = DataLoader(dataset, batch_size=size, shuffle=False)
    return next(iter(loader))


@dataclass
class Models:
    """What the recipe built, before Accelerate prepares it."""

    splits: DataSplits
    student: nn.Module
    teacher: nn.Module | None
    losses: list[LossTerm]
    resolved: dict[str, Any]


def build_all(recipe: Recipe) -> Models:
    """Build data, models and losses from a checked recipe (no training yet)."""
    splits = build_data(recipe)
    context = data_context(splits)
    student, student_params = build_model("student", recipe.student, "student", context)
    teacher = None
    resolved = recipe.model_dump(mode="json")
    resolved["student"]["params"] = _jsonable({**recipe.student.params, **student_params})
    if recipe.teacher is not None:
        teacher, teacher_params = build_model("teacher", recipe.teacher, "teacher", context)
        resolved["teacher"]["params"] = _jsonable({**recipe.teacher.params, **teacher_params})
    if teacher is not None and callable(getattr(teacher, "bind", None)):
        teacher.bind(student)  # a teacher that follows the student (ema) starts as its copy
    losses = build_losses(recipe)
    return Models(splits, student, teacher, losses, resolved)


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(yaml.safe_dump(_plain(params)))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def collect_taps(losses: list[LossTerm]) -> tuple[list[str], list[str]]:
    """The union of the student and teacher taps every loss declares."""
    student, teacher = [], []
    for term in losses:
        student += [t for t in getattr(term.module, "student_taps", []) or [] if t not in student]
        teacher += [t for t in getattr(term.module, "teacher_taps", []) or [] if t not in teacher]
    return student, teacher


def _shapes(features: dict[str, Any]) -> str:
    return ", ".join(f"{k} {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}"
                     for k, v in features.items()) or "none"


def _forward_checked(kind: str, model: nn.Module, inputs: Any, splits: DataSplits, key: str | None = None) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(inputs)
    except Exception as exc:  # noqa: BLE001 - any failure here is a mismatch to report
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise RecipeError(
            f"{kind} {type(model).__name__} cannot take the dataset's inputs of shape {shape} "
            f"(dataset input_shape {tuple(splits.input_shape)}): {type(exc).__name__}: {detail[:200]}",
            key=key or kind,
        ) from None
    finally:
        model.train(was_training)
    expected = splits.num_classes
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[1] != expected:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise RecipeError(
            f"{kind} {type(model).__name__} gives logits of shape {got}; the dataset has {expected} "
            f"classes, so (batch, {expected}) was expected",
            key=key or kind,
        )
    return logits


def ensemble_members(teacher: nn.Module | None) -> list[nn.Module]:
    """The members of a teacher ensemble (a module with ``members`` and ``combine``), else []."""
    members = getattr(teacher, "members", None)
    if members is not None and callable(getattr(teacher, "combine", None)):
        return list(members)
    return []


def teacher_forward(teacher: nn.Module, inputs: Any, targets: torch.Tensor | None,
                    taps: FeatureTaps | None) -> tuple[ModelOutputs, list[ModelOutputs]]:
    """Run the teacher (an ensemble: its members one after another); return the view and each member's.

    Call under ``no_grad``. Only the logits and tapped features are kept.
    """
    members = ensemble_members(teacher)
    if not members:
        out = ModelOutputs(teacher(inputs), taps.take() if taps is not None else {})
        return out, [out]
    outputs = []
    for i, member in enumerate(members):
        logits = member(inputs)
        prefix = f"members.{i}."
        captured = taps.take() if taps is not None else {}
        outputs.append(ModelOutputs(logits, {k[len(prefix):]: v for k, v in captured.items() if k.startswith(prefix)}))
    return teacher.combine(outputs, targets), outputs


def dry_run(models: Models, taps: list[FeatureTaps], device: torch.device | str = "cpu") -> None:
    """Push one small batch through teacher, student and every loss, before any training.

    Shape problems become recipe errors naming the models, taps and shapes. Losses that
    build parameters from the tapped shapes (connectors) build them here, so they exist
    before the optimizer and Accelerate's ``prepare`` see them.
    """
    inputs, targets = split_batch(_first_batch(models.splits.train, size=4))
    inputs, targets = _to_device(inputs, device), _to_device(targets, device)
    teacher_out, teachers = None, []
    if models.teacher is not None:
        for i, member in enumerate(ensemble_members(models.teacher)):
            _forward_checked(f"teacher member {i}", member, inputs, models.splits, key=f"teacher.params.teachers[{i}]")
        _forward_checked("teacher", models.teacher, inputs, models.splits)
        if len(taps) > 1:
            taps[1].take()  # drop what the checks captured
        models.teacher.eval()
        with torch.no_grad():
            teacher_out, teachers = teacher_forward(models.teacher, inputs, targets, taps[1] if len(taps) > 1 else None)
    s_logits = _forward_checked("student", models.student, inputs, models.splits)
    out = StepOutputs(
        student=ModelOutputs(s_logits, taps[0].take()), teacher=teacher_out,
        teachers=teachers, targets=targets, inputs=inputs, progress=0.0,
    )
    for i, term in enumerate(models.losses):
        try:
            with torch.no_grad():
                value = term.module(out)
        except RecipeError:
            raise
        except Exception as exc:  # noqa: BLE001 - report which loss, taps and shapes
            detail = " ".join(str(exc).split())[:300]
            teacher_feats = _shapes(out.teacher.features) if out.teacher is not None else "no teacher"
            raise RecipeError(
                f"loss {term.label!r} failed on one batch: {type(exc).__name__}: {detail} "
                f"(student features: {_shapes(out.student.features)}; teacher features: {teacher_feats}; "
                f"logits {tuple(s_logits.shape)})",
                key=f"losses[{i}]",
            ) from None
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise RecipeError(f"loss {term.label!r} must return a scalar tensor, got {got}", key=f"losses[{i}]")
        # Connectors built in the dry run start from fresh statistics, as if built at step 0.
        for module in term.module.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()


def _to_device(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def validate(recipe_source: Any, overrides: Any = None, *, dry: bool = False) -> Recipe:
    """Check a recipe without training: static checks, and with ``dry`` one batch through the models."""
    recipe = load_recipe(recipe_source, overrides)
    check_recipe(recipe)
    if dry:
        models = build_all(recipe)
        taps = _check_taps(models)
        try:
            dry_run(models, taps)
        finally:
            for tap in taps:
                tap.remove()
    return recipe


def _check_taps(models: Models) -> list[FeatureTaps]:
    """Check every loss's taps against the models (naming the loss), then install the hooks."""
    for i, term in enumerate(models.losses):
        for side, model in (("student", models.student), ("teacher", models.teacher)):
            names = list(getattr(term.module, f"{side}_taps", []) or [])
            if names and model is None:
                raise RecipeError(f"loss {term.label!r} taps teacher features, and the recipe has no teacher",
                                  key="teacher")
            param = f"{side}_taps" if f"{side}_taps" in _loss_params(models, i) else f"{side}_tap"
            for name in names:
                resolve_tap(model, name, owner=f"{side} {type(model).__name__}", key=f"losses[{i}].params.{param}")
    student_taps, teacher_taps = collect_taps(models.losses)
    taps = [FeatureTaps(models.student, student_taps)]
    if teacher_taps:
        taps.append(FeatureTaps(models.teacher, teacher_taps))
    return taps


def _loss_params(models: Models, index: int) -> dict[str, Any]:
    return dict(models.resolved["losses"][index].get("params") or {})


def _resume_differences(saved: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(saved) | set(new)):
        path = f"{prefix}.{key}" if prefix else key
        if any(path == k or path.startswith(k + ".") for k in RESUMABLE_CHANGES):
            continue
        a, b = saved.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _resume_differences(a, b, path)
        elif a != b:
            keys.append(path)
    return keys


def _make_accelerator(recipe: Recipe, run_dir: Path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration

    # Several runs in one process (notebooks, tests) must not inherit the last run's settings.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    trainer = recipe.trainer
    use_cpu = not torch.cuda.is_available()
    if trainer.mixed_precision == "fp16" and use_cpu:
        raise RecipeError("fp16 needs a GPU; use bf16 (or no) on the CPU", key="trainer.mixed_precision")
    wandb_spec = recipe.tracking.wandb
    log_with = ["wandb"] if wandb_spec is not None and wandb_spec.mode != "disabled" else None
    return Accelerator(
        # Without cpu=True, processes started by `accelerate launch --multi_gpu` on a machine
        # without a GPU would each train alone, silently, instead of forming a gloo group.
        cpu=use_cpu,
        mixed_precision=trainer.mixed_precision,
        gradient_accumulation_steps=trainer.gradient_accumulation_steps,
        log_with=log_with,
        project_dir=str(run_dir),
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=recipe.seed),
    )


class Trainer:
    """One run of one recipe: owns the Accelerator, the prepared objects and the loop state."""

    def __init__(self, recipe: Recipe, run_dir: Path, *, resume: bool, overwrite: bool) -> None:
        from accelerate.utils import set_seed

        self.recipe, self.run_dir, self.resume = recipe, run_dir, resume
        self.started = time.perf_counter()
        ckpt.prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
        self.accelerator = _make_accelerator(recipe, run_dir)
        set_seed(recipe.seed, deterministic=False)
        torch.use_deterministic_algorithms(not torch.cuda.is_available(), warn_only=True)
        self.models = build_all(recipe)
        self.taps = _check_taps(self.models)
        device = self.accelerator.device
        self.models.student.to(device)
        if self.models.teacher is not None:
            self.models.teacher.to(device)
        for term in self.models.losses:
            term.module.to(device)
        dry_run(self.models, self.taps, device)
        if resume:
            saved = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8")) or {}
            changed = _resume_differences(saved, self.models.resolved)
            if changed:
                raise RecipeError(
                    f"--resume: the recipe differs from the run's own in {', '.join(changed[:8])}; "
                    f"only {', '.join(RESUMABLE_CHANGES)} may change",
                    key=changed[0],
                )
        self.is_main = self.accelerator.is_main_process
        self.metrics = MetricsFile(run_dir / "metrics.jsonl", self.is_main)
        self._interrupted = False

    def request_stop(self, *_: Any) -> None:
        """SIGINT handler: stop at the next step boundary with a checkpoint (a second Ctrl-C aborts)."""
        if self._interrupted:
            raise KeyboardInterrupt
        self._interrupted = True
        if self.is_main:
            print("\nkdforge: stopping at the next step boundary and saving a checkpoint "
                  "(Ctrl-C again to abort without one)", file=sys.stderr, flush=True)

    # -- setup ----------------------------------------------------------------------------
    def setup(self) -> None:
        """Write the run directory's first files, build loaders and optimizer, prepare all."""
        acc, recipe, models = self.accelerator, self.recipe, self.models
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not self.resume:
                ckpt.clear_run_dir(self.run_dir)
            write_text_atomic(self.run_dir / "recipe.yaml", yaml.safe_dump(models.resolved, sort_keys=False))
        acc.wait_for_everyone()
        trainer = recipe.trainer
        self.train_loader = DataLoader(
            models.splits.train, batch_size=trainer.batch_size, shuffle=True,
            num_workers=trainer.num_workers, drop_last=trainer.drop_last,
        )
        self.eval_loader = None
        if models.splits.eval is not None:
            self.eval_loader = DataLoader(
                models.splits.eval, batch_size=trainer.eval_batch_size or trainer.batch_size,
                shuffle=False, num_workers=trainer.num_workers,
            )
        self.trainable_losses = [t for t in models.losses if t.trainable]
        student = models.student
        prepared = acc.prepare(student, *[t.module for t in self.trainable_losses], self.train_loader)
        self.student, self.train_loader = prepared[0], prepared[-1]
        for term, wrapped in zip(self.trainable_losses, prepared[1:-1]):
            term.module = wrapped
        if self.eval_loader is not None:
            self.eval_loader = acc.prepare(self.eval_loader)
        accum = trainer.gradient_accumulation_steps
        if len(self.train_loader) == 0:
            raise RecipeError(f"no training batch: the train split has {len(models.splits.train)} samples per "
                              f"{acc.num_processes} process(es), fewer than batch_size {trainer.batch_size} with "
                              f"drop_last", key="trainer.batch_size")
        self.steps_per_epoch = max(math.ceil(len(self.train_loader) / accum), 1)
        self.total_steps = self.steps_per_epoch * trainer.epochs
        modules = [acc.unwrap_model(self.student)] + [acc.unwrap_model(t.module) for t in self.trainable_losses]
        optimizer, scheduler = build_optimizer(recipe.optimizer, modules, self.total_steps)
        self.optimizer, self.scheduler = acc.prepare(optimizer, scheduler)
        self.teacher = models.teacher
        self.follows_student = callable(getattr(self.teacher, "update", None)) and hasattr(self.teacher, "bind")
        if self.teacher is not None:
            self.teacher.to(acc.device).eval().requires_grad_(False)
        self.state: dict[str, Any] = {"epoch": 0, "step": 0, "history": [], "teacher_accuracy": None,
                                      "wall_seconds": 0.0, "samples_seen": 0}
        if self.resume:
            latest = ckpt.latest_checkpoint(self.run_dir)
            ckpt.verify_checkpoint(latest)
            acc.load_state(str(latest))
            self.state = ckpt.read_state(latest)
            if self.follows_student:
                load_weights(self.teacher, latest / TEACHER_STATE)
            self.metrics.truncate_after(self.state["step"])
        if recipe.tracking.wandb is not None and recipe.tracking.wandb.mode != "disabled":
            spec = recipe.tracking.wandb
            acc.init_trackers(
                spec.project, config=models.resolved,
                init_kwargs={"wandb": wandb_init_kwargs(spec, recipe.name, self.run_dir)},
            )

    # -- steps ----------------------------------------------------------------------------
    def _teacher_outputs(self, inputs: Any, targets: torch.Tensor | None) -> tuple[ModelOutputs | None, list[ModelOutputs]]:
        if self.teacher is None:
            return None, []
        with torch.no_grad(), self.accelerator.autocast():
            return teacher_forward(self.teacher, inputs, targets, self.taps[1] if len(self.taps) > 1 else None)

    def train_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """One pass over the training data (after ``skip_batches`` when resuming mid-epoch)."""
        acc, trainer = self.accelerator, self.recipe.trainer
        self.student.train()
        for term in self.trainable_losses:
            term.module.train()
        self.train_loader.set_epoch(epoch)
        loader = self.train_loader
        if skip_batches:
            loader = acc.skip_first_batches(self.train_loader, skip_batches)
            loader.set_epoch(epoch)  # a fresh loader would otherwise shuffle as in epoch 0
        self.state["batch_in_epoch"] = skip_batches
        labels = [t.label for t in self.models.losses]
        sums = torch.zeros(len(labels) + 1, device=acc.device)
        # first non-finite step and which terms (kept on the device: checked at log intervals)
        self._bad_step = torch.full((), -1.0, device=acc.device)
        self._bad_terms = torch.zeros(len(labels) + 1, device=acc.device)
        # the number of the step being computed, kept on the device (a per-step host-to-device
        # copy would synchronize a CUDA stream)
        next_step = torch.full((), float(self.state["step"] + 1), device=acc.device)
        window_batches, window_samples, window_start = 0, 0, time.perf_counter()
        bar = self._progress_bar(epoch, skip_batches)
        batches: Any = iter(loader)
        if skip_batches:
            # The uninterrupted run drew the loader's seed (and any main-process augmentation of
            # the skipped batches) before the checkpointed RNG state: don't draw them again. Exact
            # when the data pipeline draws no random numbers in the main process.
            rng = torch.get_rng_state()
            first = next(batches, None)
            torch.set_rng_state(rng)
            batches = itertools.chain([] if first is None else [first], batches)
        for batch in batches:
            inputs, targets = split_batch(batch)
            progress = min(self.state["step"] / self.total_steps, 1.0)
            with acc.accumulate(self.student, *[t.module for t in self.trainable_losses]):
                teacher_out, teachers = self._teacher_outputs(inputs, targets)
                with acc.autocast():
                    logits = self.student(inputs)
                    out = StepOutputs(
                        student=ModelOutputs(logits, self.taps[0].take()),
                        teacher=teacher_out, teachers=teachers, targets=targets,
                        inputs=inputs, progress=progress,
                    )
                    values = []
                    total = None
                    for term in self.models.losses:
                        term.update(acc.unwrap_model(term.module), progress)
                        value = term.module(out)
                        values.append(value.detach().float())
                        weighted = value * term.weight_at(progress)
                        total = weighted if total is None else total + weighted
                if trainer.nonfinite == "skip" and not self._all_finite(total):
                    # opt-in: one host sync per step (and a collective across processes)
                    self.state["skipped_steps"] = self.state.get("skipped_steps", 0) + 1
                    self.optimizer.zero_grad(set_to_none=True)
                    self.state["batch_in_epoch"] += 1
                    continue
                acc.backward(total)
                if acc.sync_gradients and trainer.max_grad_norm is not None:
                    acc.clip_grad_norm_(self.optimizer.param_groups[0]["params"] + self._other_params(), trainer.max_grad_norm)
                self.optimizer.step()
                if acc.sync_gradients:
                    # what this step used, for the log (plain Python floats: no device sync)
                    self._used = (progress, self.optimizer.param_groups[0]["lr"])
                    self.scheduler.step()
                    if self.follows_student:
                        self.teacher.update(acc.unwrap_model(self.student))
                self.optimizer.zero_grad(set_to_none=True)
            step_values = torch.stack([total.detach().float(), *values])
            sums += step_values
            bad = ~torch.isfinite(step_values)
            first = bad.any() & (self._bad_step < 0)
            self._bad_step = torch.where(first, next_step, self._bad_step)
            self._bad_terms = torch.where(first, bad.float(), self._bad_terms)
            self.state["batch_in_epoch"] += 1
            window_batches += 1
            n = batch_size_of(inputs)
            window_samples += n
            self.state["samples_seen"] += n
            if acc.sync_gradients:
                self.state["step"] += 1
                next_step += 1
                if bar is not None:
                    bar.update(1)
                at_log = self.state["step"] % trainer.log_every == 0 or self.state["step"] % self.steps_per_epoch == 0
                if self._interrupted and acc.num_processes == 1 and not at_log:
                    self._stop_for_interrupt()
                if at_log:
                    record = self._log_train(epoch, labels, sums / max(window_batches, 1), window_samples, window_start)
                    if bar is not None:
                        bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in record.items()
                                         if k.startswith("train/loss")} | {"samples/s": f"{record['train/samples_per_second']:.0f}"})
                    sums.zero_()
                    window_batches, window_samples, window_start = 0, 0, time.perf_counter()
        if bar is not None:
            bar.close()
        self.state["batch_in_epoch"] = 0

    def _all_finite(self, total: torch.Tensor) -> bool:
        finite = torch.isfinite(total.detach()).float().reshape(1)
        if self.accelerator.num_processes > 1:
            finite = self.accelerator.reduce(finite, reduction="sum") / self.accelerator.num_processes
        return bool(finite.item() == 1.0)

    def _stop_for_interrupt(self) -> None:
        """Ctrl-C: checkpoint at this step boundary, then stop (resumable with --resume)."""
        path = ckpt.save_checkpoint(self.accelerator, self.run_dir, f"step-{self.state['step']:08d}", self.state,
                                    self.recipe.trainer.keep_checkpoints, extra=self._save_extra)
        raise TrainingStopped(
            f"interrupted at step {self.state['step']} (epoch {self.state['epoch'] + 1}); saved {path}; "
            f"continue with --resume", exit_code=130)

    def _unwrapped(self, module: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(module)

    def _save_extra(self, directory: Path) -> None:
        """State kdforge keeps beside Accelerate's (main process): a teacher that follows the student."""
        if self.follows_student:
            save_weights(self.teacher, directory / TEACHER_STATE)

    def _other_params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups[1:] for p in g["params"]]

    def _progress_bar(self, epoch: int, done: int = 0):
        if not (self.recipe.trainer.progress_bar and self.accelerator.is_local_main_process):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.recipe.trainer.epochs}",
                    leave=False, dynamic_ncols=True)

    def _log_train(self, epoch: int, labels: list[str], means: torch.Tensor, samples: int, start: float) -> dict[str, Any]:
        acc = self.accelerator
        # The one host sync of a logging interval: loss means, the first non-finite step and
        # its terms, and whether any process was interrupted.
        flags = torch.cat([means, self._bad_step.reshape(1), self._bad_terms,
                           torch.tensor([float(self._interrupted)], device=acc.device)])
        rows = acc.gather(flags.reshape(1, -1)).tolist()
        n = len(labels) + 1
        values = [sum(r[i] for r in rows) / len(rows) for i in range(n)]
        bad_steps = [(r[n], r[n + 1: 2 * n + 1]) for r in rows if r[n] >= 0]
        if bad_steps:
            step, terms = min(bad_steps, key=lambda item: item[0])
            self._stop_for_nonfinite(int(step), epoch, [name for name, hit in zip(["total", *labels], terms) if hit])
        interrupted = any(r[-1] > 0 for r in rows)
        elapsed = max(time.perf_counter() - start, 1e-9)
        progress, lr = self._used
        record: dict[str, Any] = {"step": self.state["step"], "epoch": epoch + 1, "train/loss": values[0]}
        for label, value, term in zip(labels, values[1:], self.models.losses):
            record[f"train/loss/{label}"] = value
            if callable(term.weight):
                record[f"train/weight/{label}"] = term.weight_at(progress)
            for name, schedule in term.param_schedules.items():
                record[f"train/{label}/{name}"] = schedule(progress)
        record["train/lr"] = lr
        record["train/samples_per_second"] = samples * acc.num_processes / elapsed
        self._log(record)
        if interrupted:
            self._stop_for_interrupt()
        return record

    def _stop_for_nonfinite(self, step: int, epoch: int, terms: list[str]) -> None:
        named = [t for t in terms if t != "total"] or ["total"]
        latest = ckpt.latest_checkpoint(self.run_dir)
        kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written yet"
        raise TrainingStopped(
            f"loss term {', '.join(repr(t) for t in named)} became nan or inf at step {step} (epoch {epoch + 1}); "
            f"stopped, {kept}. Lower the learning rate, clip with trainer.max_grad_norm, or set "
            f"trainer.nonfinite: skip to skip such steps")

    def _log(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        if self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in record.items() if k != "step" and v is not None},
                                 step=int(record["step"]))

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self, model: nn.Module) -> float | None:
        """Top-1 accuracy of ``model`` on the eval split (labeled samples only), over all processes."""
        return self.evaluate_exits(model, [])[0]

    @torch.no_grad()
    def evaluate_exits(self, model: nn.Module, exit_losses: list[nn.Module]) -> tuple[float | None, dict[str, float | None]]:
        """Accuracy of ``model`` and of every extra exit the losses report through ``eval_logits``."""
        if self.eval_loader is None:
            return None, {}
        acc = self.accelerator
        modes = [(m, m.training) for m in (model, *exit_losses)]
        for module, _ in modes:
            module.eval()  # exit heads too: their BatchNorm must use running statistics
        counts: dict[str, torch.Tensor] = {}

        def count(name: str, logits: torch.Tensor, targets: torch.Tensor) -> None:
            preds, labels = acc.gather_for_metrics((logits.argmax(dim=-1), targets))
            labeled = labels >= 0
            pair = torch.stack([(preds.eq(labels) & labeled).sum(), labeled.sum()])
            counts[name] = counts[name] + pair if name in counts else pair

        for batch in self.eval_loader:
            inputs, targets = split_batch(batch)
            with acc.autocast():
                logits = model(inputs)
                features = self.taps[0].take() if model is self.student else {}
                if targets is None:
                    continue
                count("", logits, targets)
                if exit_losses:
                    out = StepOutputs(student=ModelOutputs(logits, features), targets=targets, inputs=inputs)
                    for loss in exit_losses:
                        for name, exit_logits in acc.unwrap_model(loss).eval_logits(out).items():
                            count(name, exit_logits, targets)
        for tap in self.taps:
            tap.take()
        for module, mode in modes:
            module.train(mode)
        # The one host sync of an evaluation.
        results = {name: (int(c[0]) / int(c[1]) if int(c[1]) else None) for name, c in
                   ((name, pair.tolist()) for name, pair in counts.items())}
        return results.pop("", None), results

    # -- the run --------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs, evaluate, checkpoint; return the summary."""
        acc, recipe = self.accelerator, self.recipe
        start_epoch = int(self.state["epoch"])
        skip = int(self.state.get("batch_in_epoch", 0))  # resuming from a mid-epoch (Ctrl-C) checkpoint
        wall_before = float(self.state.get("wall_seconds", 0.0))
        epoch_start = time.perf_counter()
        if self.teacher is not None and self.state.get("teacher_accuracy") is None and start_epoch == 0:
            self.state["teacher_accuracy"] = self.evaluate(self.teacher)
            members = ensemble_members(self.teacher)
            if members:
                self.state["teacher_member_accuracy"] = [self.evaluate(m) for m in members]
        for epoch in range(start_epoch, recipe.trainer.epochs):
            self.train_epoch(epoch, skip)
            skip = 0
            exit_losses = [t.module for t in self.models.losses if callable(getattr(self._unwrapped(t.module), "eval_logits", None))]
            accuracy, exits = self.evaluate_exits(self.student, exit_losses)
            record = {"step": self.state["step"], "epoch": epoch + 1, "student/accuracy": accuracy}
            record.update({f"student/exits/{name}/accuracy": value for name, value in exits.items()})
            self.state["exit_accuracy"] = exits
            if self.follows_student:  # a teacher that changes is evaluated every epoch
                self.state["teacher_accuracy"] = record["teacher/accuracy"] = self.evaluate(self.teacher)
            self.state["history"].append({"epoch": epoch + 1, "student/accuracy": accuracy})
            self.state["epoch"] = epoch + 1
            self.state["wall_seconds"] = wall_before + (time.perf_counter() - epoch_start)
            self._log(record)
            if self.is_main and recipe.trainer.progress_bar:
                acc_text = "n/a" if accuracy is None else f"{accuracy:.4f}"
                print(f"epoch {epoch + 1}/{recipe.trainer.epochs}: student accuracy {acc_text}", flush=True)
            last = epoch + 1 == recipe.trainer.epochs
            if last or (epoch + 1) % recipe.trainer.checkpoint_every == 0:
                ckpt.save_checkpoint(acc, self.run_dir, f"epoch-{epoch + 1:04d}", self.state,
                                     recipe.trainer.keep_checkpoints, extra=self._save_extra)
        return self.finish(wall_before + (time.perf_counter() - epoch_start))

    def finish(self, wall_seconds: float) -> dict[str, Any]:
        """Export the student, write summary.json, close trackers and taps."""
        acc = self.accelerator
        student = acc.unwrap_model(self.student)
        samples = torch.tensor([self.state["samples_seen"]], device=acc.device)
        per_process = acc.gather(samples).tolist()
        history = self.state["history"]
        final_accuracy = history[-1]["student/accuracy"] if history else None
        summary: dict[str, Any] = {
            "name": self.recipe.name,
            "student/accuracy": final_accuracy,
            "student/params": count_params(student),
            "epochs": int(self.state["epoch"]),
            "wall_seconds": round(wall_seconds, 3),
            "num_processes": acc.num_processes,
            "train/samples_seen_per_process": per_process,
            "train/steps": int(self.state["step"]),
            "train/skipped_steps": int(self.state.get("skipped_steps", 0)),
            "mixed_precision": self.recipe.trainer.mixed_precision,
            "device": str(acc.device),
        }
        if self.teacher is not None:
            summary["teacher/accuracy"] = self.state.get("teacher_accuracy")
            summary["teacher/params"] = count_params(self.teacher)
            if self.state.get("teacher_member_accuracy") is not None:
                summary["teacher/members/accuracy"] = self.state["teacher_member_accuracy"]
        if self.state.get("exit_accuracy"):
            summary["student/exits/accuracy"] = self.state["exit_accuracy"]
        if self.is_main:
            weights = self.run_dir / "student.safetensors"
            save_weights(student, weights)
            for term in self.models.losses:
                export = getattr(self._unwrapped(term.module), "export", None)
                if callable(export):
                    export(student, self.run_dir)
            summary["student/size_bytes"] = weights.stat().st_size
            write_json_atomic(self.run_dir / "summary.json", summary)
        acc.wait_for_everyone()
        self.close()
        return summary

    def close(self) -> None:
        """Remove hooks and end trackers."""
        for taps in getattr(self, "taps", []):
            taps.remove()
        if getattr(self, "accelerator", None) is not None:
            # Not end_training(): that also destroys the process group, which a later run in
            # the same process (a chain of recipes under one launch) still needs.
            used_wandb = any(t.name == "wandb" for t in self.accelerator.trackers)
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers.clear()
            if used_wandb:
                import wandb

                wandb.teardown()  # waits for wandb's service to flush the run file, then stops it


def run_recipe(
    recipe_source: Any,
    overrides: Any = None,
    *,
    output_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Validate a recipe, train it, and return its summary (``kdforge.run``)."""
    recipe = load_recipe(recipe_source, overrides)
    if output_dir is not None:
        recipe = recipe.model_copy(update={"output_dir": str(output_dir)})
    check_recipe(recipe)
    trainer = Trainer(recipe, recipe.run_dir(), resume=resume, overwrite=overwrite)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, trainer.request_stop)
    try:
        trainer.setup()
        return trainer.fit()
    except BaseException as exc:
        trainer.close()
        clear = _actionable(exc, recipe)
        if clear is exc:
            raise
        raise clear from exc
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _actionable(exc: BaseException, recipe: Recipe) -> BaseException:
    """Out of memory and a full disk become one clear message with what to change."""
    trainer = recipe.trainer
    if isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()):
        return TrainingStopped(
            f"out of memory (batch_size {trainer.batch_size}, mixed_precision {trainer.mixed_precision}): lower "
            f"trainer.batch_size, raise trainer.gradient_accumulation_steps to keep the effective batch, or use "
            f"trainer.mixed_precision: bf16; the last complete checkpoint is kept")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return TrainingStopped(
            f"no space left on device writing {exc.filename or recipe.run_dir()}: free space or set output_dir on "
            f"another disk (fewer trainer.keep_checkpoints helps); the last complete checkpoint is kept, "
            f"continue with --resume")
    return exc

