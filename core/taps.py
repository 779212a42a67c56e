"""Feature taps: forward hooks that capture named submodules' outputs for losses.

A tap is a module name as ``model.get_submodule`` takes it. Each forward pass stores
the module's output under that name; a module that runs more than once in one forward
pass keeps its LAST output. Hooks are removed with ``remove()`` (the engine does so
when the run ends).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from .errors import RecipeError
from .extensions import module_names, resolve_module


def _output_tensor(output: Any) -> Any:
    # Modules such as LSTMs return tuples; the first tensor is the feature map.
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return output


class FeatureTaps:
    """Capture the outputs of ``names`` inside ``model`` on every forward pass."""

    def __init__(self, model: nn.Module, names: Iterable[str], *, owner: str = "model", key: str | None = None) -> None:
        self.features: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for name in dict.fromkeys(names):
            module = resolve_tap(model, name, owner=owner, key=key)
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def store(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self.features[name] = _output_tensor(output)

        return store

    def take(self) -> dict[str, torch.Tensor]:
        """Hand over the features captured since the last call, and forget them."""
        features, self.features = self.features, {}
        return features

    def remove(self) -> None:
        """Remove every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.features = {}


def resolve_tap(model: nn.Module, name: str, *, owner: str = "model", key: str | None = None) -> nn.Module:
    """The module a tap name refers to, or a ``RecipeError`` listing the closest tap names.

    Names are resolved level by level, so a module that renames its taps (a ``get_submodule``
    override, see ``kdforge.RenamesTaps``) is honoured wherever it sits, inside a composite
    teacher too; the hints list the names such modules expose, not their internals.
    """
    if not isinstance(name, str) or not name:
        raise RecipeError(f"tap names must be non-empty strings, got {name!r}", key=key)
    try:
        return resolve_module(model, name)
    except AttributeError:
        import difflib

        names = module_names(model)
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
        shown = close or names[:12]
        label = "closest module names" if close else "some module names"
        raise RecipeError(f"{owner} has no module {name!r} to tap; {label}: {', '.join(shown)}", key=key) from None
