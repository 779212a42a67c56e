"""kdforge: a plugin-based knowledge-distillation engine for PyTorch.

Everything a plugin needs is a top-level name here (``__all__``); the modules behind
them are private and may move. Names are imported when first used, so that a command
which needs no torch (``kdforge --help``) does not pay for importing it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and editors: the names as they are defined
    from .artifacts import RUN_DIR, ExtraModel, extra_model_metric, extra_models, record_extra_model
    from .augment import (
        Augmentation,
        Chain,
        HorizontalFlip,
        RandomCrop,
        RandomResizedCrop,
        RandomShift,
        ReplayableDataset,
    )
    from .compose import (
        BuildContext,
        build_plugin,
        build_teacher,
        check_plugin,
        load_student,
        load_teacher,
    )
    from .data import PartiallyLabeled, TensorPairs, balanced_subset, stratified_split, with_labeled
    from .errors import PluginError, RecipeError, did_you_mean
    from .extensions import (
        BindsStudent,
        Callback,
        CompositeTeacher,
        EstimatesMemory,
        ExportsFiles,
        ExtraOutputs,
        FollowsStudent,
        Generator,
        NeedsTeacher,
        RenamesTaps,
        ReplaysAugmentation,
        ReportsScalars,
        RunContext,
        TapsFeatures,
        Task,
        TeacherWrapper,
        Traceable,
        TransformsBatch,
        all_gather,
        full_precision,
    )
    from .hookspecs import hookimpl, hookspec
    from .outputs import UNLABELED, Batch, DataSplits, ModelOutputs, StepOutputs
    from .registry import create, list_plugins, register_plugin, unavailable, unregister_plugin
    from .tasks import TaskBase
    from .weights import load_state_dict, load_weights, save_weights

#: public name -> the module that defines it (imported on first use: `kdforge --help` needs no torch)
_EXPORTS: dict[str, str] = {
    "Augmentation": ".augment",
    "Batch": ".outputs",
    "BindsStudent": ".extensions",
    "BuildContext": ".compose",
    "Callback": ".extensions",
    "Chain": ".augment",
    "CompositeTeacher": ".extensions",
    "DataSplits": ".outputs",
    "EstimatesMemory": ".extensions",
    "ExportsFiles": ".extensions",
    "ExtraModel": ".artifacts",
    "ExtraOutputs": ".extensions",
    "FollowsStudent": ".extensions",
    "Generator": ".extensions",
    "HorizontalFlip": ".augment",
    "ModelOutputs": ".outputs",
    "NeedsTeacher": ".extensions",
    "PartiallyLabeled": ".data",
    "PluginError": ".errors",
    "RUN_DIR": ".artifacts",
    "RandomCrop": ".augment",
    "RandomResizedCrop": ".augment",
    "RandomShift": ".augment",
    "RecipeError": ".errors",
    "RenamesTaps": ".extensions",
    "ReplayableDataset": ".augment",
    "ReplaysAugmentation": ".extensions",
    "ReportsScalars": ".extensions",
    "RunContext": ".extensions",
    "StepOutputs": ".outputs",
    "TapsFeatures": ".extensions",
    "Task": ".extensions",
    "TaskBase": ".tasks",
    "TeacherWrapper": ".extensions",
    "TensorPairs": ".data",
    "Traceable": ".extensions",
    "TransformsBatch": ".extensions",
    "UNLABELED": ".outputs",
    "all_gather": ".extensions",
    "balanced_subset": ".data",
    "build_plugin": ".compose",
    "build_teacher": ".compose",
    "check_plugin": ".compose",
    "create": ".registry",
    "did_you_mean": ".errors",
    "extra_model_metric": ".artifacts",
    "extra_models": ".artifacts",
    "full_precision": ".extensions",
    "hookimpl": ".hookspecs",
    "hookspec": ".hookspecs",
    "list_plugins": ".registry",
    "load_state_dict": ".weights",
    "load_student": ".compose",
    "load_teacher": ".compose",
    "load_weights": ".weights",
    "record_extra_model": ".artifacts",
    "register_plugin": ".registry",
    "save_weights": ".weights",
    "stratified_split": ".data",
    "unavailable": ".registry",
    "unregister_plugin": ".registry",
    "with_labeled": ".data",
}

__version__ = "0.2.0"

__all__ = [
    "Augmentation",
    "Batch",
    "BindsStudent",
    "BuildContext",
    "Callback",
    "Chain",
    "CompositeTeacher",
    "DataSplits",
    "EstimatesMemory",
    "ExportsFiles",
    "ExtraModel",
    "ExtraOutputs",
    "FollowsStudent",
    "Generator",
    "HorizontalFlip",
    "ModelOutputs",
    "NeedsTeacher",
    "PartiallyLabeled",
    "PluginError",
    "RUN_DIR",
    "RandomCrop",
    "RandomResizedCrop",
    "RandomShift",
    "RecipeError",
    "RenamesTaps",
    "ReplayableDataset",
    "ReplaysAugmentation",
    "ReportsScalars",
    "RunContext",
    "StepOutputs",
    "TapsFeatures",
    "Task",
    "TaskBase",
    "TeacherWrapper",
    "TensorPairs",
    "Traceable",
    "TransformsBatch",
    "UNLABELED",
    "__version__",
    "all_gather",
    "balanced_subset",
    "build_plugin",
    "build_teacher",
    "check_plugin",
    "create",
    "did_you_mean",
    "extra_model_metric",
    "extra_models",
    "full_precision",
    "hookimpl",
    "hookspec",
    "list_plugins",
    "load_state_dict",
    "load_student",
    "load_teacher",
    "load_weights",
    "record_extra_model",
    "register_plugin",
    "run",
    "save_weights",
    "stratified_split",
    "unavailable",
    "unregister_plugin",
    "validate",
    "with_labeled",
]


def __getattr__(name: str) -> Any:
    """Import a public name on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kdforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


def run(recipe: Any, overrides: Any = None, **options: Any) -> dict:
    """Run a recipe (a path or a mapping) and return its summary (as in ``summary.json``).

    ``overrides`` is a list of ``"key.path=value"`` strings or a mapping of key paths
    to values. Keyword options: ``output_dir``, ``resume``, ``overwrite``, and ``callbacks``
    (objects with lifecycle methods such as ``on_epoch_end(run)``, for this run only; an
    exception one raises ends the run and reaches the caller).
    """
    from .runner import run_recipe

    return run_recipe(recipe, overrides, **options)


def validate(recipe: Any, overrides: Any = None, *, dry_run: bool = False) -> Any:
    """Check a recipe without training (``kdforge validate``); with ``dry_run``, push one batch through.

    Returns the validated recipe; raises ``RecipeError`` naming the key of the first problem.
    """
    from .runner import validate_recipe_source

    return validate_recipe_source(recipe, overrides, dry=dry_run)
