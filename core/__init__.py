"""kdforge: a plugin-based knowledge-distillation engine for PyTorch."""

from __future__ import annotations

from typing import Any

from .errors import PluginError, RecipeError
from .hookspecs import hookimpl, hookspec
from .outputs import UNLABELED, DataSplits, ModelOutputs, StepOutputs
from .registry import create, list_plugins, register_plugin, unregister_plugin

__version__ = "0.1.0"

__all__ = [
    "DataSplits",
    "ModelOutputs",
    "PluginError",
    "RecipeError",
    "StepOutputs",
    "UNLABELED",
    "__version__",
    "create",
    "hookimpl",
    "hookspec",
    "list_plugins",
    "register_plugin",
    "run",
    "unregister_plugin",
]


def run(recipe: Any, overrides: Any = None, **options: Any) -> dict:
    """Run a recipe (a path or a mapping) and return its summary (as in ``summary.json``).

    ``overrides`` is a list of ``"key.path=value"`` strings or a mapping of key paths
    to values. Keyword options: ``output_dir``, ``resume``, ``overwrite``.
    """
    from .engine import run_recipe

    return run_recipe(recipe, overrides, **options)
