"""Reading a run directory for reports, profiles and exports: metrics, summary, recipe, sample inputs.

Nothing here writes to the run directory. A run that is still training (no ``summary.json``
yet) can be read too: its records so far are plotted, and what needs the finished run
(the trained weights) is left out.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RecipeError

#: the first line of ``metrics.jsonl`` records larger than this is not a kdforge record
MAX_RECORD_CHARS = 1 << 20


@dataclass
class RunData:
    """What a run directory holds, read once: records, summary, recipe and the headline metric."""

    path: Path
    name: str
    summary: dict[str, Any]
    recipe: dict[str, Any]
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    headline: str = "accuracy"
    higher_is_better: bool = True

    @property
    def finished(self) -> bool:
        """Whether the run wrote its summary (training completed)."""
        return bool(self.summary)

    @property
    def has_teacher(self) -> bool:
        """Whether the run distilled from a teacher."""
        return bool(self.recipe.get("teacher"))

    def steps_per_epoch(self) -> float | None:
        """Optimizer steps per epoch, from the first evaluation record (or the summary)."""
        for record in self.evals:
            step, epoch = record.get("step"), record.get("epoch")
            if _number(step) and _number(epoch) and epoch > 0 and step > 0:
                return step / epoch
        steps, epochs = self.summary.get("train/total_steps"), (self.recipe.get("trainer") or {}).get("epochs")
        if _number(steps) and _number(epochs) and epochs > 0:
            return steps / epochs
        return None

    def train_series(self, key: str) -> tuple[list[float], list[float]]:
        """``(epochs, values)`` of a training key; x is the fractional epoch (steps / steps per epoch)."""
        per_epoch = self.steps_per_epoch()
        xs, ys = [], []
        for record in self.train:
            value = record.get(key)
            if not _number(value):
                continue
            step = record.get("step")
            if per_epoch and _number(step):
                xs.append(step / per_epoch)
            elif _number(record.get("epoch")):
                xs.append(float(record["epoch"]))
            else:
                continue
            ys.append(float(value))
        return xs, ys

    def eval_series(self, key: str) -> tuple[list[float], list[float]]:
        """``(epochs, values)`` of an evaluation key (one point per epoch)."""
        xs, ys = [], []
        for record in self.evals:
            value = record.get(key)
            if _number(value) and _number(record.get("epoch")):
                xs.append(float(record["epoch"]))
                ys.append(float(value))
        return xs, ys

    def train_keys(self) -> list[str]:
        """Every numeric training key, in first-seen order."""
        return _keys(self.train)

    def eval_keys(self) -> list[str]:
        """Every numeric evaluation key, in first-seen order."""
        return _keys(self.evals)

    def loss_terms(self) -> list[str]:
        """Labels of the loss terms logged as ``train/loss/<label>``."""
        return [k[len("train/loss/"):] for k in self.train_keys() if k.startswith("train/loss/")]

    def final(self, key: str) -> Any:
        """A summary value, else the last evaluation record's."""
        if key in self.summary:
            return self.summary[key]
        for record in reversed(self.evals):
            if key in record:
                return record[key]
        return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _keys(records: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if key not in ("step", "epoch") and _number(value):
                seen.setdefault(key, None)
    return list(seen)


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``metrics.jsonl`` split into training and evaluation records (damaged lines skipped).

    A record with any ``train/`` key is a training record; the others are evaluations.
    """
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    if not path.is_file():
        return train, evals
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if len(line) > MAX_RECORD_CHARS:
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                continue  # a line cut short by a crash
            if not isinstance(record, dict):
                continue
            (train if any(str(k).startswith("train/") for k in record) else evals).append(record)
    return train, evals


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory (``RecipeError`` when it is not one)."""
    from .cli import headline_of, load_summary
    from .recipe import load_yaml_file

    path = Path(run_dir)
    if not path.is_dir():
        raise RecipeError(f"no run directory at {str(run_dir)!r}")
    has_metrics = (path / "metrics.jsonl").is_file()
    summary = load_summary(str(path)) if (path / "summary.json").exists() else {}
    if not summary and not has_metrics:
        raise RecipeError(f"{str(run_dir)!r} is not a kdforge run directory (no summary.json, no metrics.jsonl)")
    recipe = load_yaml_file(path / "recipe.yaml") if (path / "recipe.yaml").is_file() else {}
    train, evals = read_metrics(path / "metrics.jsonl")
    headline, higher = headline_of(summary) if summary else ("accuracy", True)
    name = summary.get("name") or recipe.get("name") or path.name
    return RunData(path, str(name), summary, recipe, train, evals, headline, higher)


# -- sample inputs --------------------------------------------------------------------------
@dataclass
class SampleData:
    """A batch of real inputs of a run's dataset, the run's task, and where the batch came from."""

    task: Any
    batch: Any  # kdforge.Batch
    source: str  # "eval split", "train split", or "random inputs of shape ..."

    def take(self, size: int) -> Any:
        """The first ``size`` samples of the batch (repeated if it is shorter) as a ``Batch``."""
        return _take(self.batch, size)


def sample_batch(recipe_data: dict[str, Any], size: int) -> SampleData:
    """``size`` samples of a run's own dataset (eval split first), collated as in training.

    Samples are repeated when the split is smaller than ``size``. The dataset is built from
    the run's recipe (``recipe.yaml``), so it is the data the run saw.
    """
    from torch.utils.data import default_collate

    from .build import build_data, build_task, private_rng
    from .recipe import validate_recipe

    recipe = validate_recipe(recipe_data)
    with private_rng(recipe.seed):
        splits = build_data(recipe)
    task, _, _ = build_task(recipe, splits)
    dataset, source = (splits.eval, "eval split") if splits.eval is not None and len(splits.eval) else (splits.train, "train split")
    count = len(dataset)
    items = [dataset[i % count] for i in range(size)]
    collate = splits.collate_fn or default_collate
    return SampleData(task, task.to_batch(collate(items)), source)


def _take(batch: Any, size: int) -> Any:
    import torch

    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.ndim >= 1:
            n = value.shape[0]
            index = torch.arange(size) % n
            return value[index]
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        return value

    return batch.replace(inputs=cut(batch.inputs), targets=cut(batch.targets),
                         **{k: cut(v) for k, v in batch.extras.items()})


def batch_size(batch: Any) -> int:
    """Samples in a batch (the first dimension of its inputs)."""
    import torch

    inputs = batch.inputs
    if isinstance(inputs, dict):
        inputs = next(iter(inputs.values()))
    return int(inputs.shape[0]) if isinstance(inputs, torch.Tensor) and inputs.ndim else 1
