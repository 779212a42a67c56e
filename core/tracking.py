"""Metrics: ``metrics.jsonl`` on the main process, and Accelerate's trackers (W&B)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .recipe import WandbSpec


class MetricsFile:
    """Append-only JSON lines, one record per log event (main process only)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop records logged after optimizer step ``step`` (used when resuming)."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if int(record.get("step", 0)) <= step:
                kept.append(line)
        self.path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Append one record."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(clean, sort_keys=True) + "\n")


def wandb_mode(spec: WandbSpec) -> str:
    """offline, unless the recipe or the user's WANDB_MODE asks for something else."""
    if spec.mode is not None:
        return spec.mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    return env if env in ("online", "offline", "disabled", "dryrun") else "offline"


def wandb_init_kwargs(spec: WandbSpec, run_name: str, run_dir: Path) -> dict[str, Any]:
    """Keyword arguments for ``wandb.init`` (through ``accelerator.init_trackers``)."""
    kwargs: dict[str, Any] = {
        "name": spec.name or run_name,
        "tags": list(spec.tags),
        "mode": wandb_mode(spec),
        # the recipe's dir, else the user's WANDB_DIR, else inside the run directory
        "dir": spec.dir or os.environ.get("WANDB_DIR") or str(run_dir),
    }
    for key in ("entity", "group", "notes"):
        value = getattr(spec, key)
        if value is not None:
            kwargs[key] = value
    return kwargs
