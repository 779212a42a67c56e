"""The run directory and its checkpoints.

A checkpoint is ``accelerator.save_state`` into ``checkpoints/.tmp-<tag>``, plus
``kdforge_state.json``; only when complete is it renamed to ``checkpoints/<tag>``, so a
half-written checkpoint is never picked up by ``--resume``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from .errors import RecipeError
from .io import write_json_atomic

STATE_FILE = "kdforge_state.json"
_CHECKPOINT = re.compile(r"^(epoch|step)-(\d+)$")


def checkpoint_dir(run_dir: Path) -> Path:
    """Where a run keeps its checkpoints."""
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if _CHECKPOINT.match(child.name) and child.is_dir() and (child / STATE_FILE).is_file():
            try:
                state = read_state(child)
                found.append((int(state["step"]), int(state.get("batch_in_epoch", 0)) == 0, child.name, child))
            except (ValueError, KeyError, TypeError, OSError):
                continue  # unreadable state: not a complete checkpoint
    return [entry[-1] for entry in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, or ``None``."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def holds_a_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` already holds (part of) a kdforge run."""
    return any((run_dir / name).exists() for name in ("summary.json", "checkpoints", "metrics.jsonl", "student.safetensors"))


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber an earlier run unless asked; called before anything is written."""
    if resume:
        if latest_checkpoint(run_dir) is None:
            raise RecipeError(f"--resume: no complete checkpoint under {str(run_dir)!r} to resume from", key="output_dir")
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise RecipeError(f"{str(run_dir)!r} exists and is not a directory", key="output_dir")
    if holds_a_run(run_dir) and not overwrite:
        raise RecipeError(
            f"{str(run_dir)!r} already holds a run; pass --resume to continue it, --overwrite to replace it, "
            f"or choose another --output-dir",
            key="output_dir",
        )


def clear_run_dir(run_dir: Path) -> None:
    """Remove an earlier run's files (``--overwrite``), keeping the directory."""
    for name in ("summary.json", "metrics.jsonl", "student.safetensors", "recipe.yaml", "checkpoints", "wandb"):
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def save_checkpoint(accelerator: Any, run_dir: Path, tag: str, state: dict[str, Any], keep: int,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Write a complete checkpoint atomically; keep only the newest ``keep``. All processes call this."""
    root = checkpoint_dir(run_dir)
    tmp, final = root / f".tmp-{tag}", root / tag
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if extra is not None:
            extra(tmp)
        write_json_atomic(tmp / STATE_FILE, state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_state(checkpoint: Path) -> dict[str, Any]:
    """The engine state stored beside a checkpoint."""
    return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))


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
                              f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]})", key="--resume") from None
