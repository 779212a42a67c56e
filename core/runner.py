"""Running a recipe end to end: check, build, dry run, prepare, then (only then) touch the run directory.

``run_recipe`` is ``kdforge.run``; ``validate_recipe_source`` is ``kdforge validate``.
Every check that can fail runs before anything is written, so a late recipe error never
costs an earlier run's files.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from . import checkpoint as ckpt
from .build import BuiltRun, build_run, check_recipe
from .dryrun import dry_run
from .errors import RecipeError, TrainingStopped
from .io import write_text_atomic
from .console import is_quiet, note
from .loop import Session, fit, load_checkpoint, prepare_session
from .memory import MemoryLine, estimate_memory
from .recipe import Recipe, load_recipe
from .state import RunState
from .taps import FeatureTaps, resolve_tap
from .tracking import MetricsFile, wandb_init_kwargs

#: recipe keys that may change between a run and its --resume
RESUMABLE_CHANGES = (
    "trainer.epochs", "trainer.log_every", "trainer.keep_checkpoints", "trainer.num_workers",
    "trainer.progress_bar", "trainer.eval_batch_size", "trainer.checkpoint_every", "tracking", "output_dir",
    "name", "trainer.channels_last", "trainer.compile", "trainer.pin_memory", "trainer.persistent_workers",
    "trainer.prefetch_factor",
)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


# -- taps ---------------------------------------------------------------------------------
def install_taps(built: BuiltRun) -> tuple[FeatureTaps, FeatureTaps | None]:
    """Check every loss's taps against the models (naming the loss and its param), then hook them."""
    student_names: list[str] = []
    teacher_names: list[str] = []
    for i, term in enumerate(built.losses):
        params = dict(built.resolved["losses"][i].get("params") or {})
        for side, model, names in (("student", built.student, student_names), ("teacher", built.teacher, teacher_names)):
            wanted = list(getattr(term.module, f"{side}_taps", None) or [])
            if wanted and model is None:
                raise RecipeError(f"loss {term.label!r} taps teacher features, and the recipe has no teacher", key="teacher")
            param = f"{side}_taps" if f"{side}_taps" in params else f"{side}_tap"
            for name in wanted:
                resolve_tap(model, name, owner=f"{side} {type(model).__name__}", key=f"losses[{i}].params.{param}")
                if name not in names:
                    names.append(name)
    student_taps = FeatureTaps(built.student, student_names)
    teacher_taps = FeatureTaps(built.teacher, teacher_names) if teacher_names else None
    return student_taps, teacher_taps


def remove_taps(*taps: FeatureTaps | None) -> None:
    """Remove the hooks of every tap set given."""
    for tap in taps:
        if tap is not None:
            tap.remove()


# -- validate -----------------------------------------------------------------------------
def validate_recipe_source(recipe_source: Any, overrides: Any = None, *, dry: bool = False) -> Recipe:
    """Check a recipe without training: static checks, and with ``dry`` one batch through the models."""
    if dry:
        return dry_run_recipe(recipe_source, overrides)[0]
    recipe = load_recipe(recipe_source, overrides)
    check_recipe(recipe)
    return recipe


def dry_run_recipe(recipe_source: Any, overrides: Any = None) -> tuple[Recipe, list[MemoryLine]]:
    """Static checks and one batch through the models; with the memory estimate of a training batch."""
    recipe = load_recipe(recipe_source, overrides)
    check_recipe(recipe)
    built = build_run(recipe)
    student_taps, teacher_taps = install_taps(built)
    try:
        out = dry_run(built, student_taps, teacher_taps)
    finally:
        remove_taps(student_taps, teacher_taps)
    return recipe, estimate_memory(built, out, recipe.trainer.batch_size)


# -- process-wide settings, scoped to the run ---------------------------------------------
@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms`` for the run; the previous setting comes back after."""
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


@contextlib.contextmanager
def stop_signals(handler: Any) -> Iterator[None]:
    """Ctrl-C (SIGINT) and SIGTERM call ``handler`` during the run (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def make_accelerator(recipe: Recipe, run_dir: Path) -> Any:
    """The run's ``Accelerator``: CPU processes form a gloo group when there is no GPU."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    trainer = recipe.trainer
    use_cpu = not torch.cuda.is_available()
    if trainer.mixed_precision == "fp16" and use_cpu:
        raise RecipeError("fp16 needs a GPU; use bf16 (or no) on the CPU", key="trainer.mixed_precision")
    wandb_spec = recipe.tracking.wandb
    log_with = ["wandb"] if wandb_spec is not None and wandb_spec.mode != "disabled" else None
    try:
        accelerator = Accelerator(
            # Without cpu=True, processes started by `accelerate launch --multi_gpu` on a machine
            # without a GPU would each train alone, silently, instead of forming a gloo group.
            cpu=use_cpu,
            mixed_precision=trainer.mixed_precision,
            gradient_accumulation_steps=1,  # kdforge weighs the micro-batches of a window itself
            log_with=log_with,
            project_dir=str(run_dir),
            step_scheduler_with_optimizer=False,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=recipe.seed),
        )
    except ValueError as exc:
        if "already been initialized" not in str(exc):
            raise
        raise RecipeError(
            f"this Python process already trained with another mixed precision, and Accelerate fixes it once per "
            f"process; run this recipe in its own `kdforge run` (or a fresh Python process) "
            f"({trainer.mixed_precision!r} asked)", key="trainer.mixed_precision") from None
    warn_unsharded(accelerator)
    return accelerator


def warn_unsharded(accelerator: Any) -> None:
    """Say so when ``accelerate launch --use_fsdp`` asked for FSDP and Accelerate did not shard.

    Without a GPU, Accelerate runs plain DDP (or one process alone) and ignores the FSDP
    flags without a word: every process then holds the whole student.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() not in ("1", "true", "yes", "on"):
        return
    kind = str(getattr(accelerator, "distributed_type", ""))
    if "FSDP" not in kind and accelerator.is_main_process:
        note(f"FSDP was asked for (accelerate launch --use_fsdp), but Accelerate runs {kind.split('.')[-1]} here "
             f"(no GPU): the student is not sharded, every process holds all of it")


# -- run ----------------------------------------------------------------------------------
class StopRequest:
    """Set by SIGINT/SIGTERM: the loop checkpoints at the next step boundary (a second signal aborts)."""

    def __init__(self) -> None:
        self.session: Session | None = None
        self.requested = False

    def __call__(self, signum: int, _frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.session is not None:
            self.session.interrupted = True
            if self.session.is_main and not is_quiet():
                name = signal.Signals(signum).name
                print(f"\nkdforge: {name}: stopping at the next step boundary and saving a checkpoint "
                      f"(again to abort without one)", file=sys.stderr, flush=True)


def run_recipe(
    recipe_source: Any,
    overrides: Any = None,
    *,
    output_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: Any = (),
) -> dict[str, Any]:
    """Validate a recipe, train it, and return its summary (``kdforge.run``).

    ``callbacks``: extra objects with lifecycle methods (``on_epoch_end(run)`` ...) for this
    run, e.g. a sweep's pruner; an exception they raise ends the run and propagates.
    """
    from accelerate.utils import set_seed

    if resume and overwrite:
        raise RecipeError("--resume and --overwrite contradict each other: pass one of them")
    recipe = load_recipe(recipe_source, overrides)
    if output_dir is not None:
        recipe = recipe.model_copy(update={"output_dir": str(output_dir)})
    check_recipe(recipe)
    run_dir = recipe.run_dir()
    ckpt.prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)  # read-only check
    stop = StopRequest()
    session: Session | None = None
    student_taps = teacher_taps = None
    lock = ckpt.RunLock(run_dir)
    with deterministic_algorithms(not torch.cuda.is_available()), stop_signals(stop):
        try:
            accelerator = make_accelerator(recipe, run_dir)
            built = build_run(recipe)
            student_taps, teacher_taps = install_taps(built)
            device = accelerator.device
            for module in (built.student, built.teacher, *[t.module for t in built.losses]):
                if module is not None:
                    module.to(device)
            dry_run(built, student_taps, teacher_taps, device)
            state, latest, original_epochs = None, None, None
            if resume:
                latest = ckpt.latest_checkpoint(run_dir)
                ckpt.verify_checkpoint(latest)
                original_epochs = check_resumable(run_dir, built)
                state = read_run_state(latest)
            check_tracking(recipe, run_dir)
            cache, cache_info = teacher_cache(built, accelerator, run_dir, teacher_taps)
            set_seed(recipe.seed, deterministic=False)
            session = prepare_session(built, accelerator, run_dir, student_taps, teacher_taps, state, original_epochs,
                                      callbacks=list(callbacks), cache=cache)
            session.cache_info = cache_info
            stop.session = session
            if stop.requested:
                raise TrainingStopped("interrupted before training started; nothing was written", exit_code=130)
            # every check has passed: from here on the run directory is this run's
            if accelerator.is_main_process:
                lock.acquire()
            start_run_dir(session, resume=resume, overwrite=overwrite)
            if latest is not None:
                load_checkpoint(session, latest)
                session.metrics.truncate_after(session.state.step)
            start_trackers(session)
            return fit(session)
        except BaseException as exc:
            clear = actionable(exc, recipe)
            if clear is exc:
                raise
            raise clear from exc
        finally:
            if session is not None:
                session.bars.close()
                end_trackers(session)
            remove_taps(student_taps, teacher_taps)
            lock.release()


def check_resumable(run_dir: Path, built: BuiltRun) -> int | None:
    """``--resume`` refuses a recipe that changed anything but what may change; notes a new length.

    Returns the epochs the run's own recipe had.
    """
    from .recipe import load_yaml_file

    try:
        saved = load_yaml_file(run_dir / "recipe.yaml")
    except RecipeError as exc:
        raise RecipeError(f"--resume: {exc.detail}; the run's own recipe is needed to resume it: restore the file, "
                          f"or start over with --overwrite", key="--resume") from None
    changed = resume_differences(saved, built.resolved)
    if changed:
        raise RecipeError(f"--resume: the recipe differs from the run's own in {', '.join(changed[:8])}; "
                          f"only {', '.join(RESUMABLE_CHANGES)} may change", key=changed[0])
    trainer = saved.get("trainer") if isinstance(saved.get("trainer"), dict) else {}
    before = trainer.get("epochs") if isinstance(trainer.get("epochs"), int) else None
    if before is not None and before != built.recipe.trainer.epochs:
        note(f"trainer.epochs is {built.recipe.trainer.epochs} now, {before} when the run started: schedules keep "
             f"the run's original length (steps past it hold their final values)")
    return before


def resume_differences(saved: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Recipe keys whose values differ, ignoring the ones ``--resume`` allows to change."""
    keys = []
    for key in sorted(set(saved) | set(new)):
        path = f"{prefix}.{key}" if prefix else key
        if any(path == k or path.startswith(k + ".") for k in RESUMABLE_CHANGES):
            continue
        a, b = saved.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += resume_differences(a, b, path)
        elif a != b:
            keys.append(path)
    return keys


def teacher_cache(built: BuiltRun, accelerator: Any, run_dir: Path, teacher_taps: FeatureTaps | None) -> tuple[Any, dict]:
    """The teacher cache the recipe asks for (checked, then opened or built), or ``(None, {})``."""
    spec = built.recipe.teacher.cache if built.recipe.teacher is not None else None
    if spec is None:
        return None, {}
    from .cache import cache_problems, prepare_cache

    transforms = any(callable(getattr(o, "transform_batch", None)) for o in (built.task, *[t.module for t in built.losses]))
    cache_problems(built, spec, teacher_taps, transforms)
    return prepare_cache(built, spec, accelerator, run_dir)


def read_run_state(checkpoint: Path) -> RunState:
    """The loop state of a checkpoint, or a ``RecipeError`` naming the file when it is damaged."""
    try:
        return RunState.from_json(ckpt.read_state(checkpoint))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise RecipeError(f"cannot resume from {str(checkpoint)!r}: its {ckpt.STATE_FILE} is damaged ({exc}); delete "
                          f"that checkpoint to resume from an older one, or start over with --overwrite",
                          key="--resume") from None


def check_tracking(recipe: Recipe, run_dir: Path) -> None:
    """W&B's folder must be a folder: wandb would otherwise fall back to /tmp without a word."""
    spec = recipe.tracking.wandb
    if spec is None or spec.mode == "disabled":
        return
    folder = Path(spec.dir or os.environ.get("WANDB_DIR") or run_dir)
    if folder.exists() and not folder.is_dir():
        source = "tracking.wandb.dir" if spec.dir else "WANDB_DIR" if os.environ.get("WANDB_DIR") else "output_dir"
        raise RecipeError(f"{str(folder)!r} is a file, so W&B cannot write there; point {source} at a directory",
                          key="tracking.wandb.dir" if spec.dir else "tracking.wandb")


def start_run_dir(s: Session, *, resume: bool, overwrite: bool) -> None:
    """The first write of the run (under its lock): clear an earlier run, write recipe.yaml."""
    acc = s.accelerator
    if s.is_main:
        s.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.prepare_run_dir(s.run_dir, resume=resume, overwrite=overwrite)  # again, now that the run is ours
        if not resume:
            if ckpt.holds_a_run(s.run_dir) and not overwrite:
                note(f"{str(s.run_dir)!r} holds a run that ended before it saved a checkpoint; starting it over")
            ckpt.clear_run_dir(s.run_dir)
        write_text_atomic(s.run_dir / "recipe.yaml", yaml.safe_dump(s.built.resolved, sort_keys=False))
    acc.wait_for_everyone()
    s.metrics = MetricsFile(s.run_dir / "metrics.jsonl", s.is_main)


def start_trackers(s: Session) -> None:
    """W&B through Accelerate's tracker, when the recipe asks for it."""
    spec = s.recipe.tracking.wandb
    if spec is not None and spec.mode != "disabled":
        s.accelerator.init_trackers(spec.project, config=s.built.resolved,
                                    init_kwargs={"wandb": wandb_init_kwargs(spec, s.recipe.name, s.run_dir)})


def end_trackers(s: Session) -> None:
    """End trackers (not ``end_training``: that also destroys the process group a chain of runs needs)."""
    trackers = s.accelerator.trackers
    used_wandb = any(t.name == "wandb" for t in trackers)
    for tracker in trackers:
        tracker.finish()
    trackers.clear()
    if used_wandb:
        import wandb

        wandb.teardown()  # waits for wandb's service to flush the run file, then stops it


def from_worker(exc: BaseException) -> BaseException:
    """An error raised in a DataLoader worker, as it was raised there.

    torch re-raises it in the main process as the same type with its whole traceback as the
    message ("Caught RecipeError in DataLoader worker process 0. Original Traceback ...");
    the last line is the original message.
    """
    text = str(exc)
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return exc
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    name = type(exc).__name__
    for prefix in (f"kdforge.errors.{name}: ", f"{type(exc).__module__}.{name}: ", f"{name}: "):
        if last.startswith(prefix):
            last = last[len(prefix):]
            break
    try:
        return type(exc)(last)
    except Exception:  # noqa: BLE001 - a type that takes other arguments: keep it as torch gave it
        return exc


def actionable(exc: BaseException, recipe: Recipe) -> BaseException:
    """Out of memory and a full disk become one clear message with what to change; worker errors are unwrapped."""
    exc = from_worker(exc)
    trainer = recipe.trainer
    if isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()):
        return TrainingStopped(
            f"out of memory (batch_size {trainer.batch_size}, mixed_precision {trainer.mixed_precision}): lower "
            f"trainer.batch_size, raise trainer.gradient_accumulation_steps to keep the effective batch, or use "
            f"trainer.mixed_precision: bf16; the last complete checkpoint is kept")
    if disk_full(exc, recipe.run_dir()):
        where = getattr(exc, "filename", None) or recipe.run_dir()
        # the failed writer's frames hold its open file (a cycle through the traceback): close it
        # now, or the full disk stays busy until the next garbage collection (kdforge.run in a loop)
        release_frames(exc)
        return TrainingStopped(
            f"no space left on device writing {where}: free space or set output_dir on "
            f"another disk (fewer trainer.keep_checkpoints helps); the last complete checkpoint is kept, "
            f"continue with --resume")
    return exc


def release_frames(exc: BaseException | None) -> None:
    """Clear the locals of every frame in ``exc``'s tracebacks (its causes and contexts too)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


#: how torch's C++ writer and safetensors report a failed write (they raise no OSError(ENOSPC))
_WRITE_FAILURES = ("basic_ios::clear", "iostream error", "PytorchStreamWriter failed", "file write failed", "inline_container.cc",
                   "No space left on device", "StorageFull", "os error 28")
_LOW_SPACE = 64 << 20


def disk_full(exc: BaseException, run_dir: Path) -> bool:
    """Whether ``exc`` is a write that failed because the run directory's disk is full."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    if not isinstance(exc, Exception) or not any(marker in str(exc) for marker in _WRITE_FAILURES):
        return False
    if "No space left" in str(exc) or "StorageFull" in str(exc) or "os error 28" in str(exc):
        return True
    existing = run_dir
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    import shutil

    return shutil.disk_usage(existing).free < _LOW_SPACE
