"""Extra models a run leaves behind, beside its student: a manifest that report, profile and export read.

A plugin that writes a standalone model into the run directory (an ``ExportsFiles`` loss,
say) records it with ``record_extra_model``: the plugin that rebuilds it and that plugin's
params. ``kdforge profile`` and ``kdforge export`` then treat it as they treat the student,
without knowing what it is. The manifest is ``extra_models.json`` in the run directory.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import RecipeError

MANIFEST = "extra_models.json"
RUN_DIR = "{run_dir}"
"""A param value of an ``ExtraModel`` that stands for the run directory (so a moved or copied run still loads)."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class ExtraModel:
    """One extra model of a run: built as ``create(kind, plugin, **params)``.

    ``head``, when set, names the ``ExtraOutputs`` head whose evaluation this model
    reproduces, so its metrics are read from ``student/<group>/<metric>[head]`` of the summary.
    """

    name: str
    plugin: str
    params: dict[str, Any] = field(default_factory=dict)
    kind: str = "student"
    head: str | None = None

    def build(self, run_dir: str | Path) -> Any:
        """The model, built by its plugin (``RUN_DIR`` params replaced by ``run_dir``)."""
        from .registry import create

        params = {k: str(run_dir) if v == RUN_DIR else v for k, v in self.params.items()}
        return create(self.kind, self.plugin, **params)


def record_extra_model(run_dir: str | Path, model: ExtraModel) -> None:
    """Add (or replace, by name) ``model`` in the run directory's manifest; main process only."""
    if not _NAME.fullmatch(model.name):
        raise ValueError(f"extra model name {model.name!r}: use letters, digits, '.', '_' and '-'")
    json.dumps(model.params)  # params must be JSON: fail in the plugin, not when the manifest is read
    path = Path(run_dir) / MANIFEST
    entries = {m.name: m for m in extra_models(run_dir)}
    entries[model.name] = model
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps([asdict(m) for m in entries.values()], indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def extra_models(run_dir: str | Path) -> list[ExtraModel]:
    """The extra models recorded in a run directory (none when there is no manifest)."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        models = [ExtraModel(**entry) for entry in entries]
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise RecipeError(f"{str(path)!r} is not a kdforge extra-model manifest ({exc}); delete it or rerun") from None
    return sorted(models, key=lambda m: m.name)


def extra_model_metric(summary: dict[str, Any], model: ExtraModel, metric: str) -> float | None:
    """``model``'s value of ``metric`` in a run's summary (``None`` when it was not evaluated)."""
    from .extensions import EXTRA_HEADS_GROUP

    if model.head is None:
        return None
    values = summary.get(f"student/{EXTRA_HEADS_GROUP}/{metric}")
    value = values.get(model.head) if isinstance(values, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
