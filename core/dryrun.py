"""The dry run: one small batch through the teacher, the student and every loss, before training.

Shape and batch problems become recipe errors naming the models, taps and shapes. Losses
that build parameters from what they see (connectors, heads) build them here, so they
exist before the optimizer and Accelerate's ``prepare``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .build import BuiltRun, private_rng
from .errors import RecipeError
from .extensions import teacher_members
from .forward import step_outputs, teacher_outputs
from .outputs import Batch, StepOutputs
from .taps import FeatureTaps
from .tasks import BatchError, IndexedCollate, IndexedDataset, read_batch

DRY_BATCH = 4
_SCAN_FOR_LABELS = 256


def sample_batch(built: BuiltRun, dataset: Dataset, size: int = DRY_BATCH, split: str = "train") -> Batch:
    """A batch of the first ``size`` samples, with a labeled one swapped in when the first are all unlabeled.

    A label-dependent loss thus sees a label in the dry run whenever the split has one
    within its first samples. Unreadable items are a recipe error naming the dataset.
    """
    collate = IndexedCollate(built.splits.collate_fn)
    indexed = IndexedDataset(dataset)
    n = len(indexed)
    chosen = list(range(min(size, n)))

    def load(indices: list[int]) -> Batch:
        try:
            return read_batch(built.task, collate([indexed[i] for i in indices]))
        except BatchError as exc:
            where = "" if split == "train" else f" ({split} split)"
            raise RecipeError(f"dataset {built.recipe.data.name!r}{where}: {exc}", key="data") from None
        except (TypeError, RuntimeError) as exc:
            detail = " ".join(str(exc).split())[:200]
            raise RecipeError(f"dataset {built.recipe.data.name!r}: its {split} items cannot be batched "
                              f"({type(exc).__name__}: {detail})", key="data") from None

    batch = load(chosen)
    if built.task.has_labels(batch) or n <= len(chosen):
        return batch
    for i in range(len(chosen), min(n, _SCAN_FOR_LABELS)):
        if built.task.has_labels(load([i])):
            return load(chosen[:-1] + [i])
    return batch


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _shapes(features: dict[str, Any]) -> str:
    return ", ".join(f"{k} {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}"
                     for k, v in features.items()) or "none"


def check_model(built: BuiltRun, who: str, model: nn.Module, batch: Batch, key: str) -> None:
    """Run ``model`` once in eval mode and let the task judge its outputs."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = built.task.forward(model, batch)
    except Exception as exc:  # noqa: BLE001 - any failure here is a mismatch to report
        inputs = batch.inputs
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise RecipeError(f"{who} {type(model).__name__} cannot take the dataset's inputs of shape {shape} "
                          f"(dataset input_shape {tuple(built.splits.input_shape)}): {_first_line(exc)[:240]}",
                          key=key) from None
    finally:
        model.train(was_training)
    try:
        built.task.check_outputs(logits, batch, built.splits)
    except ValueError as exc:
        raise RecipeError(f"{who} {type(model).__name__} {exc}", key=key) from None


def dry_run(built: BuiltRun, student_taps: FeatureTaps, teacher_taps: FeatureTaps | None,
            device: torch.device | str = "cpu") -> StepOutputs:
    """Push one small batch through teacher, student and every loss; raise ``RecipeError`` on a mismatch.

    Runs under the recipe's private seed, so what it builds (connectors) is the same in every run.
    Returns what the losses saw (for the memory estimate).
    """
    with private_rng(built.recipe.seed):
        return _dry_run(built, student_taps, teacher_taps, device)


def _dry_run(built: BuiltRun, student_taps: FeatureTaps, teacher_taps: FeatureTaps | None,
             device: torch.device | str) -> StepOutputs:
    batch = sample_batch(built, built.splits.train).to(device)
    teacher_out, teachers = None, []
    if built.teacher is not None:
        for i, member in enumerate(teacher_members(built.teacher)):
            check_model(built, f"teacher member {i}", member, batch, key="teacher")
        check_model(built, "teacher", built.teacher, batch, key="teacher")
        if teacher_taps is not None:
            teacher_taps.take()  # drop what the checks captured
        built.teacher.eval()
        with torch.no_grad():
            teacher_out, teachers = teacher_outputs(built.task, built.teacher, batch, teacher_taps)
    check_model(built, "student", built.student, batch, key="student")
    student_taps.take()
    was_training = built.student.training
    built.student.eval()  # no batch statistics are updated by the dry run
    try:
        student_out = _student_outputs(built, batch, student_taps)
        out = step_outputs(student_out, teacher_out, teachers, batch, progress=0.0, step=0, epoch=0,
                           epochs=built.recipe.trainer.epochs, steps_per_epoch=1, total_steps=1)
        total = None
        for i, term in enumerate(built.losses):
            buffers = {name: b.detach().clone() for name, b in term.module.named_buffers()}
            value = _loss_value(term, out, i, student_out, teacher_out)
            total = value if total is None else total + value
            _restore(term.module, buffers)
    finally:
        built.student.train(was_training)
    if total is not None and not total.requires_grad:
        raise RecipeError("no loss term depends on the student's outputs, so nothing would be trained "
                          "(a loss must return a tensor connected to out.student)", key="losses")
    if built.splits.eval is not None and len(built.splits.eval):  # type: ignore[arg-type]
        _check_eval(built, student_taps, device)
    return out


def _check_eval(built: BuiltRun, student_taps: FeatureTaps, device: torch.device | str) -> None:
    """The eval split reads, the student takes it, the task's metrics and the losses' extra heads work on it."""
    from .outputs import ModelOutputs

    batch = sample_batch(built, built.splits.eval, split="eval").to(device)
    check_model(built, "student", built.student, batch, key="data")
    was_training = built.student.training
    built.student.eval()
    try:
        with torch.no_grad():
            student_taps.take()
            out = ModelOutputs(built.task.forward(built.student, batch), student_taps.take())
            try:
                built.task.eval_batch(out.logits, batch)
            except Exception as exc:  # noqa: BLE001 - a task's metrics failing on the data is a mismatch
                raise RecipeError(f"the task cannot evaluate the eval split: {_first_line(exc)}", key="data") from None
            view = step_outputs(out, None, [], batch, training=False)
            for i, term in enumerate(built.losses):
                if not callable(getattr(term.module, "eval_logits", None)):
                    continue
                for name, logits in term.module.eval_logits(view).items():
                    try:
                        built.task.check_outputs(logits, batch, built.splits)
                    except ValueError as exc:
                        raise RecipeError(f"loss {term.label!r}'s extra head {name!r} {exc}", key=f"losses[{i}]") from None
    finally:
        built.student.train(was_training)


def _student_outputs(built: BuiltRun, batch: Batch, taps: FeatureTaps):
    from .outputs import ModelOutputs

    return ModelOutputs(built.task.forward(built.student, batch), taps.take())


def _loss_value(term: Any, out: Any, i: int, student_out: Any, teacher_out: Any) -> torch.Tensor:
    key = f"losses[{i}]"
    try:
        value = term.module(out)
    except RecipeError:
        raise
    except Exception as exc:  # noqa: BLE001 - report which loss, taps and shapes
        teacher_feats = _shapes(teacher_out.features) if teacher_out is not None else "no teacher"
        raise RecipeError(
            f"loss {term.label!r} failed on one batch: {_first_line(exc)} (student features: "
            f"{_shapes(student_out.features)}; teacher features: {teacher_feats}; "
            f"logits {tuple(student_out.logits.shape)})", key=key) from None
    if not isinstance(value, torch.Tensor) or value.ndim != 0:
        got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise RecipeError(f"loss {term.label!r} must return a 0-d tensor (a scalar), got {got}; "
                          f"reduce it with .mean() or .sum()", key=key)
    if not value.dtype.is_floating_point:
        raise RecipeError(f"loss {term.label!r} returned a {value.dtype} tensor; a loss must be floating point", key=key)
    return value.float() * term.weight_at(0.0)


def _restore(module: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    """Leave no trace of the dry run: buffers as they were (memory banks, counters), and fresh
    statistics for modules the dry run built (connectors start as if built at step 0)."""
    with torch.no_grad():
        for name, value in module.named_buffers():
            if name in buffers:
                value.copy_(buffers[name])
    for name, sub in module.named_modules():
        stats = f"{name}.running_mean" if name else "running_mean"
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and stats not in buffers:
            sub.reset_running_stats()
