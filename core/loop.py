"""The training loop on Hugging Face Accelerate: a prepared ``Session`` and its ``fit``.

``train_step`` is one optimizer step over a window of micro-batches (gradient accumulation
done here, so each micro-batch weighs what the task says: samples, or tokens). Everything
that need not happen per step (unwrapping, schedule lists, callbacks) is set up once.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import checkpoint as ckpt
from .build import BuiltRun, LossTerm
from .compose import TEACHER_WEIGHTS
from .console import RunBars, note  # noqa: F401 - note: re-exported for the runner
from .errors import TrainingStopped
from .evaluation import Evaluator, eval_loader
from .extensions import EXTRA_HEADS_GROUP, CALLBACK_EVENTS, RunContext, callbacks_of, follows_student, teacher_members
from .forward import Models, step_outputs
from .optim import build_optimizer
from .outputs import Batch
from .schedules import run_progress
from .state import RunState
from .stats import LossStats, WindowReport
from .taps import FeatureTaps
from .tasks import IndexedCollate, IndexedDataset, read_batch
from .tracking import MetricsFile
from .weights import fingerprint, load_weights, save_weights


# -- lifecycle --------------------------------------------------------------------------
class Lifecycle:
    """The callbacks of every plugin object, by event, collected once."""

    def __init__(self, objects: list[Any], teacher: nn.Module | None, exporters: list[Any]) -> None:
        self.handlers: dict[str, list[Callable[[RunContext], Any]]] = {
            event: [h for obj in objects if (h := callbacks_of(obj, event)) is not None] for event in CALLBACK_EVENTS}
        if follows_student(teacher):
            self.handlers["on_step_end"].append(lambda run: teacher.update(run.student))
        for loss in exporters:  # ExportsFiles: main process only, at the end
            self.handlers["on_fit_end"].append(
                lambda run, loss=loss: loss.export(run.student, run.run_dir) if run.is_main_process else None)

    def fire(self, event: str, run: RunContext) -> list[Any]:
        """Call every handler of ``event``; return what they returned."""
        return [handler(run) for handler in self.handlers[event]]


# -- the session ------------------------------------------------------------------------
@dataclass
class Session:
    """One run's prepared objects and loop state."""

    built: BuiltRun
    accelerator: Any
    run_dir: Path
    models: Models
    terms: list[LossTerm]
    loss_modules: list[nn.Module]  # as called (DDP-wrapped where trainable)
    trained: list[nn.Module]  # student and trainable losses, as prepared
    optimizer: Any
    scheduler: Any
    train_loader: DataLoader
    evaluator: Evaluator
    lifecycle: Lifecycle
    run: RunContext
    state: RunState
    steps_per_epoch: int
    stateful: dict[str, nn.Module] = field(default_factory=dict)
    metrics: MetricsFile | None = None
    interrupted: bool = False
    step_tensor: torch.Tensor | None = None
    stats: LossStats | None = None
    position: dict[str, Any] = field(default_factory=dict)
    weights: list[float] = field(default_factory=list)
    lr: float = 0.0
    transforms: list[Callable[[Batch, RunContext], Batch]] = field(default_factory=list)
    cache_info: dict[str, Any] = field(default_factory=dict)  # the teacher cache: built or reused, and its cost
    heads: list[nn.Module] = field(default_factory=list)  # ExtraOutputs losses, unwrapped
    reporters: list[tuple[str, nn.Module]] = field(default_factory=list)  # ReportsScalars losses, unwrapped
    epochs: int = 1  # the run's length in epochs as it started (what total_steps counts)
    scheduled_terms: list[tuple[LossTerm, nn.Module]] = field(default_factory=list)
    _plain_backend: bool = False
    bars: RunBars = field(default_factory=lambda: RunBars("", 0, 0, False))

    def __post_init__(self) -> None:
        from accelerate.utils import DistributedType

        unwrap = self.accelerator.unwrap_model
        self.scheduled_terms = [(t, unwrap(t.module)) for t in self.terms if t.param_schedules]
        self.heads = [h for h in map(unwrap, self.loss_modules) if callable(getattr(h, "eval_logits", None))]
        self.reporters = [(t.label, m) for t, m in zip(self.terms, map(unwrap, self.loss_modules))
                          if callable(getattr(m, "scalars", None))]
        self.epochs = max(self.state.total_steps // max(self.steps_per_epoch, 1), 1)
        self._plain_backend = self.accelerator.distributed_type not in (
            DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM, DistributedType.XLA)

    @property
    def recipe(self) -> Any:
        return self.built.recipe

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    # -- one optimizer step ---------------------------------------------------------
    def begin_step(self, window: list[Batch]) -> list[Batch]:
        """Values that are fixed for one optimizer step (progress, schedules, weights); the window transformed."""
        state = self.state
        progress = min(state.step / state.total_steps, 1.0)
        self.position = {"progress": progress, "step": state.step, "epoch": state.epoch, "epochs": self.epochs,
                         "steps_per_epoch": self.steps_per_epoch, "total_steps": state.total_steps}
        for term, module in self.scheduled_terms:
            term.update(module, progress)
        self.weights = [term.weight_at(progress) for term in self.terms]
        self.lr = float(self.optimizer.param_groups[0]["lr"])  # the lr this step uses
        if not self.transforms:
            return window
        with torch.no_grad():  # before the weights of the window are taken: a transform may change them
            for transform in self.transforms:
                window = [transform(batch, self.run) for batch in window]
        return window

    def losses(self, batch: Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Teacher and student forward and every loss term: the weighted total and each term's value."""
        teacher, teachers = self.models.teacher_view(batch)
        with self.accelerator.autocast():
            out = step_outputs(self.models.student_view(batch), teacher, teachers, batch, **self.position)
            values = [module(out) for module in self.loss_modules]
            total = sum(v * w for v, w in zip(values, self.weights))
        return total, [v.detach().float() for v in values]

    def window_scales(self, window: list[Batch]) -> list[Any] | None:
        """Each micro-batch's share of the window's gradient: its weight over the window's total.

        ``None`` when plain averaging is exact (one micro-batch with sample counts).
        """
        weights = [self.built.task.batch_weight(b) for b in window]
        as_tensors = any(isinstance(w, torch.Tensor) for w in weights)
        processes = self.accelerator.num_processes
        if len(window) == 1 and (not as_tensors or processes == 1):
            return None
        if not as_tensors:
            total = float(sum(weights))
            return [w / total for w in weights]
        device = self.accelerator.device
        stacked = torch.stack([torch.as_tensor(w, device=device, dtype=torch.float32).reshape(()) for w in weights])
        total = stacked.sum()
        if processes > 1:  # DDP averages over processes: weigh by the window's total over all of them
            total = self.accelerator.reduce(total, reduction="sum") / processes
        return list(stacked / total.clamp_min(1e-12))

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Gradients are all-reduced only on the window's last micro-batch."""
        if last or self.accelerator.num_processes == 1:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for module in self.trained:
            stack.enter_context(self.accelerator.no_sync(module))
        return stack

    def after_step(self) -> None:
        """An optimizer step was taken: the lr schedule, the counters, the callbacks."""
        self.scheduler.step()
        self.state.step += 1
        self.step_tensor += 1
        self.run.step, self.run.epoch = self.state.step, self.state.epoch
        self.lifecycle.fire("on_step_end", self.run)

    def all_finite(self, total: torch.Tensor) -> bool:
        """Whether the loss is finite on every process (a host sync: only with ``nonfinite: skip``)."""
        finite = torch.isfinite(total.detach()).float().reshape(1)
        if self.accelerator.num_processes > 1:
            finite = self.accelerator.reduce(finite, reduction="sum") / self.accelerator.num_processes
        return bool(finite.item() == 1.0)

    @property
    def plain(self) -> bool:
        """No loss scaler and a backend whose backward and step are torch's own (CPU, DDP, FSDP).

        Then ``backward`` and ``optimizer_step`` call torch directly: Accelerate's wrappers add
        only checks for other backends (LOMO, XLA, DeepSpeed), two of them a file-system lookup
        per step.
        """
        return (self._plain_backend and self.accelerator.scaler is None
                and getattr(self.optimizer, "scaler", None) is None)

    def backward(self, loss: torch.Tensor) -> None:
        """``accelerator.backward`` (``loss.backward`` for a plain backend)."""
        if self.plain:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def optimizer_step(self) -> None:
        """The prepared optimizer's step and ``zero_grad`` (the wrapped torch optimizer's for a plain backend)."""
        optimizer = self.optimizer.optimizer if self.plain else self.optimizer
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @property
    def clipped(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]


def train_step(s: Session, window: list[Batch]) -> None:
    """One optimizer step: forward and backward over a window of micro-batches, then step."""
    acc, trainer = s.accelerator, s.recipe.trainer
    window = s.begin_step(window)
    scales = s.window_scales(window)
    for i, batch in enumerate(window):
        with s.no_sync(last=i == len(window) - 1):
            total, values = s.losses(batch)
            if trainer.nonfinite == "skip" and not s.all_finite(total):
                s.optimizer.zero_grad(set_to_none=True)
                s.state.skipped_steps += 1
                return
            s.backward(total if scales is None else total * scales[i])
        s.stats.add(total, values, s.step_tensor, batch.size)
    if trainer.max_grad_norm is not None:
        s.stats.add_grad_norm(acc.clip_grad_norm_(s.clipped, trainer.max_grad_norm))
    s.optimizer_step()
    if s.optimizer.step_was_skipped:  # the fp16 grad scaler found inf/nan gradients
        s.state.scaler_skipped_steps += 1
    else:
        s.after_step()


# -- epochs ---------------------------------------------------------------------------------
def windows(loader: Any, task: Any, size: int, images_channels_last: bool = False) -> Iterator[list[Batch]]:
    """The loader's batches in groups of ``size`` (the last group of an epoch may be shorter)."""
    window: list[Batch] = []
    for loaded in loader:
        batch = read_batch(task, loaded)
        window.append(batch.replace(inputs=channels_last(batch.inputs)) if images_channels_last else batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def train_epoch(s: Session, epoch: int, skip_batches: int = 0) -> None:
    """One pass over the training data (after ``skip_batches`` when resuming mid-epoch)."""
    acc, trainer = s.accelerator, s.recipe.trainer
    for module in s.trained:
        module.train()
    loader = s.train_loader
    loader.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
    if skip_batches:
        loader = acc.skip_first_batches(s.train_loader, skip_batches)
        loader.set_epoch(epoch)  # a fresh loader would otherwise shuffle as in epoch 0
    s.state.batch_in_epoch = skip_batches
    s.stats = LossStats(len(s.terms), acc.device)
    s.step_tensor = torch.full((), float(s.state.step + 1), device=acc.device)
    bar = s.bars
    bar.start_epoch(epoch, trainer.epochs, s.steps_per_epoch, skip_batches // trainer.gradient_accumulation_steps)
    batches = _keep_rng(iter(loader)) if skip_batches else iter(loader)
    windows_since_log = 0
    for window in windows(batches, s.built.task, trainer.gradient_accumulation_steps, trainer.channels_last):
        train_step(s, window)
        s.state.batch_in_epoch += len(window)
        s.state.samples_seen += sum(b.size for b in window)
        windows_since_log += 1
        bar.step()
        if windows_since_log >= trainer.log_every:
            log_train(s, epoch, bar)
            windows_since_log = 0
        elif s.interrupted and acc.num_processes == 1:
            stop_for_interrupt(s, epoch)
    if s.stats.batches:
        log_train(s, epoch, bar)
    s.state.batch_in_epoch = 0


def _keep_rng(batches: Iterator[Any]) -> Iterator[Any]:
    """Draw the first batch without moving the RNG the checkpoint restored.

    The uninterrupted run drew the loader's seed (and main-process augmentation of the
    skipped batches) before the state the checkpoint holds; exact when the data pipeline
    draws no random numbers in the main process.
    """
    rng = torch.get_rng_state()
    first = next(batches, None)
    torch.set_rng_state(rng)
    if first is not None:
        yield first
    yield from batches


def log_train(s: Session, epoch: int, bar: Any = None) -> WindowReport:
    """Read the interval's statistics (the one host sync), stop on a non-finite loss, log the record."""
    report = s.stats.read(s.accelerator, s.interrupted)
    if report.bad_step is not None:
        labels = ["total", *[t.label for t in s.terms]]
        hit = [n for n, bad in zip(labels, report.bad_terms) if bad]
        stop_for_nonfinite(s, report.bad_step, epoch, hit if hit or not report.bad_gradient else ["gradient"])
    progress = s.position.get("progress", 0.0)
    record: dict[str, Any] = {"step": s.state.step, "epoch": epoch + 1, "train/loss": report.means[0]}
    for term, value, weight in zip(s.terms, report.means[1:], s.weights):
        record[f"train/loss/{term.label}"] = value
        if callable(term.weight):
            record[f"train/weight/{term.label}"] = weight
        for name, schedule in term.param_schedules.items():
            record[f"train/{term.label}/{name}"] = schedule(progress)
    record["train/lr"] = s.lr
    record.update(reported_scalars(s))
    if report.grad_norm is not None:
        record["train/grad_norm"] = report.grad_norm
    record["train/samples_per_second"] = report.samples / report.seconds
    write_record(s, record)
    if bar is not None:
        bar.training(report.means[0], record["train/samples_per_second"])
    if report.interrupted:
        stop_for_interrupt(s, epoch, checked=True)
    return report


def reported_scalars(s: Session) -> dict[str, float]:
    """What ``ReportsScalars`` losses report, as ``train/<label>/<name>`` (one host sync for all of them)."""
    names, values = [], []
    for label, module in s.reporters:
        for name, value in module.scalars().items():
            names.append(f"train/{label}/{name}")
            values.append(torch.as_tensor(value, dtype=torch.float32).detach().reshape(()).cpu()
                          if not isinstance(value, torch.Tensor) else value.detach().float().reshape(()))
    if not names:
        return {}
    return dict(zip(names, torch.stack([v.to(values[0].device) for v in values]).tolist()))


def write_record(s: Session, record: dict[str, Any]) -> None:
    """One record to metrics.jsonl and the trackers."""
    s.metrics.write(record)
    if s.accelerator.trackers:
        s.accelerator.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=int(record["step"]))


def stop_for_nonfinite(s: Session, step: int, epoch: int, terms: list[str]) -> None:
    """A loss term became nan or inf: stop, naming it; the last checkpoint is older and finite."""
    named = [t for t in terms if t != "total"] or ["total"]
    latest = ckpt.latest_checkpoint(s.run_dir)
    kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written yet"
    what = ("the gradient (with finite losses)" if named == ["gradient"]
            else f"loss term {', '.join(repr(t) for t in named)}")
    raise TrainingStopped(
        f"{what} became nan or inf at step {step} (epoch {epoch + 1}); "
        f"stopped, {kept}. Lower the learning rate, clip with trainer.max_grad_norm, or set "
        f"trainer.nonfinite: skip to skip such steps")


def stop_for_interrupt(s: Session, epoch: int, checked: bool = False) -> None:
    """Ctrl-C or SIGTERM: checkpoint at this step boundary, then stop (resumable with --resume).

    The interval's losses are read first, so a non-finite step is reported instead of saved.
    """
    if not checked:
        log_train(s, epoch)  # stops for a non-finite loss before anything is written
    path = save_checkpoint(s, f"step-{s.state.step:08d}")
    raise TrainingStopped(f"interrupted at step {s.state.step} (epoch {epoch + 1}); saved {path}; "
                          f"continue with --resume", exit_code=130)


def save_checkpoint(s: Session, tag: str) -> Path:
    """A complete checkpoint: Accelerate's state, the loop state, and the stateful plugin objects."""
    def extra(directory: Path) -> None:
        for name, module in s.stateful.items():
            save_weights(module, directory / name)

    return ckpt.save_checkpoint(s.accelerator, s.run_dir, tag, s.state.to_json(),
                                s.recipe.trainer.keep_checkpoints, extra=extra)


def load_checkpoint(s: Session, checkpoint: Path) -> None:
    """Restore Accelerate's state, the loop state and the stateful plugin objects."""
    from .errors import RecipeError

    try:
        s.accelerator.load_state(str(checkpoint))
    except (RuntimeError, KeyError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:240]
        raise RecipeError(f"cannot resume from {str(checkpoint)!r}: its files do not fit this recipe's models "
                          f"({detail}); delete that checkpoint to resume from an older one, or start over with "
                          f"--overwrite", key="--resume") from None
    total_steps = s.state.total_steps
    s.state = RunState.from_json(ckpt.read_state(checkpoint))
    s.state.total_steps = s.state.total_steps or total_steps  # a state of kdforge 0.1 has none
    for name, module in s.stateful.items():
        load_weights(module, checkpoint / name)


# -- evaluation and the whole run -----------------------------------------------------------
def evaluate_epoch(s: Session, epoch: int) -> dict[str, Any]:
    """The student's metrics (and extra heads'), the teacher's when it follows the student."""
    results = s.evaluator(s.models.student, s.models.student_taps, s.heads)
    record: dict[str, Any] = {"step": s.state.step, "epoch": epoch + 1}
    record.update({f"student/{k}": v for k, v in results.get("", {}).items()})
    for head, metrics in results.items():
        if head:
            record.update({f"student/{head}/{k}": v for k, v in metrics.items()})
    if follows_student(s.models.teacher):  # a teacher that changes is evaluated every epoch
        s.state.teacher_metrics = s.evaluator(s.models.teacher, s.models.teacher_taps).get("", {})
        record.update({f"teacher/{k}": v for k, v in s.state.teacher_metrics.items()})
    return record


def evaluate_teacher(s: Session) -> None:
    """The teacher (and each member) before training, once."""
    teacher = s.models.teacher
    if teacher is None or s.state.teacher_metrics is not None or s.state.epoch > 0:
        return
    s.state.teacher_metrics = s.evaluator(teacher, s.models.teacher_taps).get("", {})
    members = teacher_members(teacher)
    if members:
        s.state.teacher_member_metrics = [s.evaluator(m, s.models.teacher_taps).get("", {}) for m in members]


def fit(s: Session) -> dict[str, Any]:
    """Train the remaining epochs, evaluating and checkpointing after each; return the summary."""
    recipe, trainer = s.recipe, s.recipe.trainer
    start_epoch, skip = s.state.epoch, s.state.batch_in_epoch
    wall_before, started = s.state.wall_seconds, time.perf_counter()
    evaluate_teacher(s)
    s.run.step, s.run.epoch = s.state.step, s.state.epoch
    if s.state.history:  # resumed: callbacks see the last evaluation until the next one
        s.run.metrics = {"step": s.state.step, **s.state.history[-1]}
    s.lifecycle.fire("on_fit_start", s.run)
    s.bars = RunBars(recipe.name, trainer.epochs, start_epoch, trainer.progress_bar and s.accelerator.is_local_main_process)
    for epoch in range(start_epoch, trainer.epochs):
        s.run.epoch = epoch
        train_epoch(s, epoch, skip)
        skip = 0
        record = evaluate_epoch(s, epoch)
        s.state.history.append({k: v for k, v in record.items() if k != "step"})
        s.state.epoch = epoch + 1
        s.state.wall_seconds = wall_before + (time.perf_counter() - started)
        s.run.metrics = record
        write_record(s, record)
        s.lifecycle.fire("on_epoch_end", s.run)
        s.bars.end_epoch(record)
        if epoch + 1 == trainer.epochs or (epoch + 1) % trainer.checkpoint_every == 0:
            save_checkpoint(s, f"epoch-{epoch + 1:04d}")
    s.bars.close()
    return finish(s, wall_before + (time.perf_counter() - started))


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not) in a model."""
    return sum(p.numel() for p in model.parameters())


def finish(s: Session, wall_seconds: float) -> dict[str, Any]:
    """Export the student (and a teacher that followed it), run ``on_fit_end``, write summary.json."""
    from .io import write_json_atomic

    acc, task = s.accelerator, s.built.task
    student = acc.unwrap_model(s.models.student)
    per_process = acc.gather(torch.tensor([s.state.samples_seen], device=acc.device)).tolist()
    final = s.state.history[-1] if s.state.history else {}
    summary: dict[str, Any] = {
        "name": s.recipe.name, "task": s.built.task_name,
        "headline": {"metric": task.headline, "higher_is_better": bool(task.higher_is_better)},
        **{k: v for k, v in final.items() if k.startswith("student/")},
        "student/params": count_params(student), "epochs": s.state.epoch, "wall_seconds": round(wall_seconds, 3),
        "num_processes": acc.num_processes, "train/samples_seen_per_process": per_process,
        "train/steps": s.state.step, "train/total_steps": s.state.total_steps,
        "train/skipped_steps": s.state.skipped_steps, "train/scaler_skipped_steps": s.state.scaler_skipped_steps,
        "mixed_precision": s.recipe.trainer.mixed_precision, "device": str(acc.device),
    }
    summary.setdefault(f"student/{task.headline}", None)
    summary.update(head_mappings(final))
    teacher = s.models.teacher
    if teacher is not None:
        summary.update({f"teacher/{k}": v for k, v in (s.state.teacher_metrics or {}).items()})
        summary.setdefault(f"teacher/{task.headline}", None)
        summary["teacher/params"] = count_params(teacher)
        if not follows_student(teacher):
            summary["teacher/fingerprint"] = fingerprint(teacher)
        for key in sorted({k for m in s.state.teacher_member_metrics or [] for k in m}):
            summary[f"teacher/members/{key}"] = [m.get(key) for m in s.state.teacher_member_metrics]
    summary.update(data_info(s.built.splits.info))
    if s.cache_info:
        summary["teacher/cache"] = s.cache_info
    s.run.summary = summary
    if s.is_main:
        weights = s.run_dir / "student.safetensors"
        save_weights(student, weights)
        summary["student/size_bytes"] = weights.stat().st_size
        if follows_student(teacher):
            save_weights(teacher, s.run_dir / TEACHER_WEIGHTS)
    for extra in s.lifecycle.fire("on_fit_end", s.run):
        if extra:
            summary.update(extra)
    if s.is_main:
        write_json_atomic(s.run_dir / "summary.json", summary)
    acc.wait_for_everyone()
    return summary


def head_mappings(record: dict[str, Any]) -> dict[str, Any]:
    """``student/exits/<metric>`` mappings (head name -> value) from an evaluation record's flat keys."""
    prefix = f"student/{EXTRA_HEADS_GROUP}/"
    mappings: dict[str, dict[str, Any]] = {}
    for key, value in record.items():
        if key.startswith(prefix):
            name, _, metric = key[len(prefix):].rpartition("/")
            mappings.setdefault(f"{prefix}{metric}", {})[name] = value
    return mappings


def data_info(info: dict[str, Any]) -> dict[str, Any]:
    """What a dataset reported in ``DataSplits.info`` (skipped files, say), as ``data/<key>`` summary entries.

    Values that are not JSON (a tokenizer object, say) are left out.
    """
    import json

    entries = {}
    for key, value in info.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            continue
        entries[f"data/{key}"] = value
    return entries


# -- building the session -------------------------------------------------------------------
def train_loader(built: BuiltRun, cache: Any = None) -> DataLoader:
    """The training split's loader (before Accelerate shards it): shuffled, indexed (with the teacher cache's rows)."""
    trainer = built.recipe.trainer
    seed = built.recipe.seed if built.splits.random_transforms or cache is not None else None
    return DataLoader(IndexedDataset(built.splits.train, seed, cache), batch_size=trainer.batch_size, shuffle=True,
                      drop_last=trainer.drop_last, collate_fn=IndexedCollate(built.splits.collate_fn),
                      **loader_options(trainer))


def loader_options(trainer: Any) -> dict[str, Any]:
    """Worker and pinning options of ``trainer`` for a DataLoader (pinned memory by default with a GPU)."""
    options: dict[str, Any] = {"num_workers": trainer.num_workers,
                               "pin_memory": torch.cuda.is_available() if trainer.pin_memory is None else trainer.pin_memory}
    if trainer.num_workers:
        options["persistent_workers"] = trainer.persistent_workers
        if trainer.prefetch_factor is not None:
            options["prefetch_factor"] = trainer.prefetch_factor
    return options


def channels_last(value: Any) -> Any:
    """4-d tensors (images) in channels-last memory format; anything else as it is."""
    if isinstance(value, torch.Tensor) and value.ndim == 4:
        return value.contiguous(memory_format=torch.channels_last)
    return value


def apply_throughput_options(built: BuiltRun) -> None:
    """``trainer.channels_last`` (student and teacher) and ``trainer.compile`` (the student, in place)."""
    trainer = built.recipe.trainer
    if trainer.channels_last:
        for model in (built.student, built.teacher):
            if model is not None:
                model.to(memory_format=torch.channels_last)
    if trainer.compile is not None:
        spec = trainer.compile
        built.student.compile(mode=None if spec.mode == "default" else spec.mode, backend=spec.backend,
                              fullgraph=spec.fullgraph, dynamic=spec.dynamic)


def stateful_objects(built: BuiltRun) -> dict[str, nn.Module]:
    """Plugin objects whose state a checkpoint must carry beyond what Accelerate saves."""
    objects: dict[str, nn.Module] = {}
    if follows_student(built.teacher):
        objects[TEACHER_WEIGHTS] = built.teacher
    for i, term in enumerate(built.losses):
        if not term.trainable and term.module.state_dict():
            objects[f"loss-{i}.safetensors"] = term.module
    return objects


def prepare_session(built: BuiltRun, accelerator: Any, run_dir: Path, student_taps: FeatureTaps,
                    teacher_taps: FeatureTaps | None, state: RunState | None, original_epochs: int | None = None,
                    callbacks: list[Any] | None = None, cache: Any = None) -> Session:
    """Prepare models, loaders and optimizer with Accelerate; nothing is read from or written to disk.

    ``original_epochs``: for a resumed run whose state does not record its length (kdforge
    0.1), the epochs its recipe had, so its schedules are not stretched either.
    """
    from .errors import RecipeError

    acc, recipe, trainer = accelerator, built.recipe, built.recipe.trainer
    apply_throughput_options(built)
    trainable = [t for t in built.losses if t.trainable]
    prepared = acc.prepare(built.student, *[t.module for t in trainable], train_loader(built, cache))
    student, loader = prepared[0], prepared[-1]
    wrapped = dict(zip([id(t) for t in trainable], prepared[1:-1]))
    loss_modules = [wrapped.get(id(t), t.module) for t in built.losses]
    for term, module in zip(built.losses, loss_modules):
        term.module = module
    if len(loader) == 0:
        raise RecipeError(f"no training batch: the train split has {len(built.splits.train)} samples per "
                          f"{acc.num_processes} process(es), fewer than batch_size {trainer.batch_size} with "
                          f"drop_last", key="trainer.batch_size")
    steps_per_epoch = max(math.ceil(len(loader) / trainer.gradient_accumulation_steps), 1)
    state = state or RunState()
    if not state.total_steps:
        state.total_steps = steps_per_epoch * (original_epochs or trainer.epochs)
    points = run_progress(state.total_steps)
    for term in built.losses:
        term.check_schedules(points)  # exactly: every value each schedule takes in this run
    modules = [acc.unwrap_model(student)] + [acc.unwrap_model(m) for m in loss_modules if m is not None
                                             and any(p.requires_grad for p in m.parameters())]
    optimizer, scheduler = build_optimizer(recipe.optimizer, modules, state.total_steps)
    optimizer, scheduler = acc.prepare(optimizer, scheduler)
    teacher = built.teacher
    if teacher is not None:
        teacher.to(acc.device).eval().requires_grad_(False)
    evaluator = Evaluator(built.task, None if built.splits.eval is None else eval_loader(
        built.splits.eval, trainer.eval_batch_size or trainer.batch_size, trainer.num_workers,
        acc.process_index, acc.num_processes, built.splits.collate_fn), acc)
    models = Models(built.task, student, teacher, student_taps, teacher_taps, acc.autocast, built.splits.num_classes)
    objects = [built.task, built.splits, acc.unwrap_model(student), teacher, *[acc.unwrap_model(m) for m in loss_modules]]
    exporters = [acc.unwrap_model(m) for m in loss_modules if callable(getattr(acc.unwrap_model(m), "export", None))]
    lifecycle = Lifecycle([o for o in objects if o is not None] + list(callbacks or []), teacher, exporters)
    run = RunContext(run_dir, acc.unwrap_model(student), teacher, acc, trainer.epochs, steps_per_epoch,
                     state.total_steps)
    trained = [student, *[m for m in loss_modules if any(p.requires_grad for p in m.parameters())]]
    transformers = [built.task, *[acc.unwrap_model(m) for m in loss_modules]]  # TransformsBatch: the task, then losses
    transforms = [o.transform_batch for o in transformers if callable(getattr(o, "transform_batch", None))]
    return Session(built, acc, run_dir, models, built.losses, loss_modules, trained, optimizer, scheduler, loader,
                   evaluator, lifecycle, run, state, steps_per_epoch, stateful_objects(built), transforms=transforms)


