"""What a run shows in the terminal: one bar for the run, a nested bar per epoch, one summary at the end.

Everything here goes to stderr (stdout is for what a command outputs) on the local main
process, and nothing at all under ``--quiet`` (``set_quiet``).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence notes and progress bars (``kdforge run --quiet``)."""
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    """Whether ``--quiet`` is on."""
    return _quiet


def note(message: str) -> None:
    """A one-line notice on stderr (not under ``--quiet``)."""
    if not _quiet:
        print(f"kdforge: note: {message}", file=sys.stderr, flush=True)


def metric_text(name: str, value: Any, missing: str = "n/a") -> str:
    """A metric for people: accuracies in percent, other numbers with 4 significant digits.

    Trailing zeros are kept (perplexity 79.00, not 79), so a column of values lines up; whole
    numbers print as they are, and a diverged value as ``nan`` or ``inf``. ``missing`` stands
    in for a value that is absent or not a number.
    """
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return missing
    if isinstance(value, int):
        return f"{100 * value}%" if "accuracy" in name else str(value)
    if not math.isfinite(value):
        return str(value)
    return f"{100 * value:.2f}%" if "accuracy" in name else f"{value:#.4g}"


class RunBars:
    """A bar over the run's epochs with the latest evaluation in it, and a nested bar over each epoch's steps."""

    def __init__(self, name: str, epochs: int, start_epoch: int, enabled: bool) -> None:
        self.enabled = enabled and not _quiet
        self.run = self.epoch = None
        if self.enabled:
            from tqdm.auto import tqdm

            self._tqdm = tqdm
            self.run = tqdm(total=epochs, initial=start_epoch, desc=name, unit="epoch", position=0,
                            dynamic_ncols=True, file=sys.stderr)

    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        """A fresh bar for this epoch's optimizer steps (``done`` of them already taken on resume)."""
        if self.enabled:
            self.epoch = self._tqdm(total=steps, initial=done, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                                    position=1, leave=False, dynamic_ncols=True, file=sys.stderr)

    def step(self) -> None:
        """One optimizer step done."""
        if self.epoch is not None:
            self.epoch.update(1)

    def training(self, loss: float, samples_per_second: float) -> None:
        """The latest training record, in the epoch's bar."""
        if self.epoch is not None:
            self.epoch.set_postfix_str(f"loss {loss:.4g}, {samples_per_second:.0f} samples/s")

    def end_epoch(self, metrics: dict[str, Any]) -> None:
        """Close the epoch's bar; show its evaluation in the run's bar."""
        if self.epoch is not None:
            self.epoch.close()
            self.epoch = None
        if self.run is not None:
            from .extensions import EXTRA_HEADS_GROUP  # imported here: the console loads before torch

            shown = {k.removeprefix("student/"): v for k, v in metrics.items()
                     if k.startswith(("student/", "teacher/")) and f"/{EXTRA_HEADS_GROUP}/" not in k and "top5" not in k}
            self.run.set_postfix_str(", ".join(f"{k} {metric_text(k, v)}" for k, v in shown.items()))
            self.run.update(1)

    def close(self) -> None:
        """Close every bar."""
        for bar in (self.epoch, self.run):
            if bar is not None:
                bar.close()
        self.epoch = self.run = None


def summary_lines(summary: dict[str, Any], run_dir: Path | str) -> list[str]:
    """A short account of a finished run, for people."""
    headline = summary.get("headline") if isinstance(summary.get("headline"), dict) else {"metric": "accuracy"}
    metric = headline.get("metric", "accuracy")
    student = metric_text(metric, summary.get(f"student/{metric}"))
    line = f"{summary.get('name', 'run')}: student {metric} {student}"
    if f"teacher/{metric}" in summary:
        line += f" (teacher {metric_text(metric, summary.get(f'teacher/{metric}'))})"
    params = summary.get("student/params")
    size = summary.get("student/size_bytes")
    details = []
    if isinstance(params, int):
        details.append(f"{params:,} parameters")
    if isinstance(size, (int, float)):
        details.append(f"{size / 1024:.1f} KiB")
    details.append(f"{summary.get('epochs', '?')} epochs in {summary.get('wall_seconds', 0):.1f} s")
    if summary.get("num_processes", 1) != 1:
        details.append(f"{summary['num_processes']} processes")
    cache = summary.get("teacher/cache")
    if isinstance(cache, dict):
        details.append(f"teacher cache {cache.get('status')}")
    return [line, f"  {', '.join(details)}; run directory: {run_dir}"]
