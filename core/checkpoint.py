"""The run directory and its checkpoints.

A checkpoint is ``accelerator.save_state`` into ``checkpoints/.tmp-<tag>``, plus
``kdforge_state.json``; only when complete is it renamed to ``checkpoints/<tag>``, so a
half-written checkpoint is never picked up by ``--resume``. Old checkpoints are renamed to
``.trash-<tag>`` before they are deleted, so an interrupted deletion is finished next time.

A run holds an exclusive lock on its directory (``.kdforge.lock``, an ``flock`` that the
kernel releases when the process dies, so a crashed run leaves no stale lock), and records
which entries were there before it started (``.kdforge-run.json``): ``--overwrite`` removes
everything an earlier run wrote, and only that.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import RecipeError
from .io import write_json_atomic

STATE_FILE = "kdforge_state.json"
LOCK_FILE = ".kdforge.lock"
RUN_FILE = ".kdforge-run.json"
_CHECKPOINT = re.compile(r"^(epoch|step)-(\d+)$")
#: what a run of kdforge 0.1 wrote (it kept no record of its files)
_KNOWN_OUTPUTS = ("summary.json", "metrics.jsonl", "student.safetensors", "teacher.safetensors", "recipe.yaml",
                  "checkpoints", "wandb", "early_exits")  # kept from kdforge 0.1
_RUN_MARKERS = ("summary.json", "checkpoints", "metrics.jsonl", "student.safetensors", RUN_FILE)


def checkpoint_dir(run_dir: Path) -> Path:
    """Where a run keeps its checkpoints."""
    return run_dir / "checkpoints"


def _checkpoint_key(child: Path) -> tuple[int, bool] | None:
    """(step, at an epoch boundary) of a complete checkpoint, or ``None`` when it is not one."""
    try:
        state = read_state(child)
        step, batch = state["step"], state.get("batch_in_epoch", 0)
    except (ValueError, KeyError, TypeError, OSError):
        return None
    if not (isinstance(step, int) and isinstance(batch, int)) or isinstance(step, bool):
        return None
    return step, batch == 0


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if _CHECKPOINT.match(child.name) and child.is_dir() and (child / STATE_FILE).is_file():
            key = _checkpoint_key(child)
            if key is not None:
                found.append((*key, child.name, child))
    return [entry[-1] for entry in sorted(found)]


def damaged_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders that are not complete (no state file, or one that does not parse)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    complete = set(list_checkpoints(run_dir))
    return sorted(c for c in root.iterdir() if _CHECKPOINT.match(c.name) and c.is_dir() and c not in complete)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, or ``None``."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def holds_a_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` already holds (part of) a kdforge run."""
    return any((run_dir / name).exists() for name in _RUN_MARKERS)


def can_restart(run_dir: Path) -> bool:
    """A run that ended before it finished or saved a checkpoint: nothing in it to keep or resume."""
    return not (run_dir / "summary.json").exists() and latest_checkpoint(run_dir) is None


# -- checks before anything is written -----------------------------------------------------
def check_output_dir(run_dir: Path) -> None:
    """The run directory is a directory kdforge can create and write in; checked without writing there.

    Refused, with the key ``output_dir``: a path below a regular file, a dangling symlink, an
    existing non-directory, and a location where no file can be created (read-only,
    immutable, no permission: probed with a temporary file in the nearest existing folder).
    """
    if run_dir.is_symlink() and not run_dir.exists():
        raise RecipeError(f"{str(run_dir)!r} is a symlink to {os.readlink(run_dir)!r}, which does not exist",
                          key="output_dir")
    existing = run_dir
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "exists and is not a directory" if existing == run_dir else f"is below {str(existing)!r}, a regular file"
        raise RecipeError(f"{str(run_dir)!r} {where}; choose another --output-dir", key="output_dir")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".kdforge-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise RecipeError(f"cannot write in {str(existing)!r} ({exc.strerror or exc}), so no run can be kept in "
                          f"{str(run_dir)!r}; choose another --output-dir", key="output_dir") from None


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber an earlier run unless asked; called before anything is written."""
    check_output_dir(run_dir)
    if resume:
        if latest_checkpoint(run_dir) is None:
            if holds_a_run(run_dir):
                raise RecipeError(f"--resume: the run in {str(run_dir)!r} saved no complete checkpoint to resume "
                                  f"from; run it without --resume to start it over", key="output_dir")
            raise RecipeError(f"--resume: {str(run_dir)!r} holds no run to resume", key="output_dir")
        return
    if holds_a_run(run_dir) and not overwrite and not can_restart(run_dir):
        raise RecipeError(
            f"{str(run_dir)!r} already holds a run; pass --resume to continue it, --overwrite to replace it, "
            f"or choose another --output-dir",
            key="output_dir",
        )


def _preexisting(run_dir: Path) -> set[str] | None:
    try:
        data = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
        return {str(name) for name in data.get("preexisting", [])}
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def clear_run_dir(run_dir: Path) -> None:
    """Remove everything an earlier run wrote here (``--overwrite``, or a restart); keep what was there before it.

    Then record what the directory holds now, so the next overwrite spares it too.
    """
    keep = _preexisting(run_dir)
    for entry in list(run_dir.iterdir()):
        if entry.name == LOCK_FILE:
            continue
        if keep is not None and entry.name in keep:
            continue
        if keep is None and entry.name not in (*_KNOWN_OUTPUTS, RUN_FILE):
            continue  # a run of kdforge 0.1 kept no record: remove only what it is known to write
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    preexisting = sorted(e.name for e in run_dir.iterdir() if e.name != LOCK_FILE)
    write_json_atomic(run_dir / RUN_FILE, {"preexisting": preexisting})


class RunLock:
    """An exclusive lock on a run directory, held for the whole run (main process)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or a ``RecipeError`` naming the directory and the holder's pid."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RecipeError(f"{str(self.path.parent)!r} is in use by another kdforge run (pid {holder}); wait for it "
                              f"to end or choose another --output-dir", key="output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        """Let go of the lock (the kernel also does when the process ends)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# -- writing and reading checkpoints -------------------------------------------------------
def _sweep(root: Path) -> None:
    """Finish what an interrupted save or pruning left: temporary and trashed folders."""
    for leftover in root.glob(".trash-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _discard(checkpoint: Path) -> None:
    """Delete a checkpoint: renamed first, so a half-deleted one is never taken for a checkpoint."""
    trash = checkpoint.with_name(f".trash-{checkpoint.name}")
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(checkpoint, trash)
    shutil.rmtree(trash, ignore_errors=True)


class _TiedWeightsNotice(logging.Filter):
    """Drops Accelerate's notice that a tied weight (GPT-2's ``lm_head``) is stored once.

    It is printed at every checkpoint of such a model, and is harmless: safetensors' loader
    restores the tie (tested by resuming a tied-weight LM to the same weights).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


@contextlib.contextmanager
def _quiet_tied_weights() -> Any:
    logger, notice = logging.getLogger("accelerate.utils.other"), _TiedWeightsNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def save_checkpoint(accelerator: Any, run_dir: Path, tag: str, state: dict[str, Any], keep: int,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Write a complete checkpoint atomically; keep only the newest ``keep``. All processes call this."""
    root = checkpoint_dir(run_dir)
    tmp, final = root / f".tmp-{tag}", root / tag
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        _sweep(root)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    with _quiet_tied_weights():
        accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if extra is not None:
            extra(tmp)
        write_json_atomic(tmp / STATE_FILE, state)
        if final.exists():
            _discard(final)
        os.replace(tmp, final)
        complete = list_checkpoints(run_dir)
        for old in complete[:-keep] + [d for d in damaged_checkpoints(run_dir) if d != final]:
            _discard(old)
    accelerator.wait_for_everyone()
    return final


def read_state(checkpoint: Path) -> dict[str, Any]:
    """The engine state stored beside a checkpoint."""
    data = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{STATE_FILE} holds {type(data).__name__}, not a mapping")
    return data


def verify_checkpoint(checkpoint: Path) -> None:
    """Refuse a checkpoint whose files are not plain tensors and containers, before loading it.

    Accelerate reads optimizer, scheduler, sampler and RNG files with
    ``torch.load(weights_only=True)`` but skips an RNG file it cannot read without a word;
    checking every file first turns a tampered or corrupt checkpoint into a clear refusal.
    """
    import pickle

    from accelerate.utils.other import load as safe_load
    from safetensors.torch import load_file

    for path in sorted(checkpoint.iterdir()):
        try:
            if path.suffix == ".safetensors":
                load_file(str(path))
            elif path.suffix in (".bin", ".pkl", ".pt"):
                safe_load(str(path), map_location="cpu")
        except pickle.UnpicklingError as exc:
            first = " ".join(str(exc).split())[:160]
            raise RecipeError(f"refusing to resume from {str(checkpoint)!r}: {path.name} carries pickled Python "
                              f"objects, not just tensors ({first})", key="--resume") from None
        except Exception as exc:  # noqa: BLE001 - corrupt or truncated file
            raise RecipeError(f"cannot resume from {str(checkpoint)!r}: {path.name} is unreadable "
                              f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); delete that checkpoint "
                              f"to resume from an older one, or start over with --overwrite", key="--resume") from None


def describe_file_error(path: Path) -> str | None:
    """Why ``path`` cannot be read as a data file (missing, a directory, a FIFO, a loop ...), or ``None``."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "does not exist" if not os.path.islink(path) else f"is a symlink to {os.readlink(path)!r}, which does not exist"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symlink loop"
        return f"cannot be read ({exc.strerror})"
    if stat.S_ISDIR(info.st_mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(info.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device" if stat.S_ISCHR(info.st_mode) or \
            stat.S_ISBLK(info.st_mode) else "not a regular file"
        return f"is {kind}, not a regular file"
    return None

