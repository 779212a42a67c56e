"""Reading and writing weights safely: safetensors, or ``torch.load(weights_only=True)``.

Loading a file never runs code from it: a ``.pt`` carrying a pickled object other
than tensors and plain containers is refused.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from .errors import RecipeError
from .io import atomic_path

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "student")


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``.pt``/``.pth``/``.bin`` file, safely."""
    from .checkpoint import describe_file_error

    path = Path(path)
    problem = describe_file_error(path)
    if problem is not None:
        raise RecipeError(f"weights file {str(path)!r} {problem}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:
            raise RecipeError(f"{str(path)!r} is not a readable safetensors file ({exc})") from None
    try:
        data: Any = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise RecipeError(
            f"refusing to load {str(path)!r}: it carries pickled Python objects, not just tensors, "
            f"and loading it could run code ({first[:160]}). Re-save it as a plain state dict "
            f"or as .safetensors"
        ) from None
    except Exception as exc:
        raise RecipeError(f"cannot read weights file {str(path)!r}: {type(exc).__name__}: {exc}") from None
    return _unwrap(data, path)


def _unwrap(data: Any, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(data, Mapping) and not _is_state_dict(data):
        inner = next((data[k] for k in _WRAPPER_KEYS if k in data and isinstance(data[k], Mapping)), None)
        if inner is None:
            break
        data = inner
    if not isinstance(data, Mapping) or not _is_state_dict(data):
        raise RecipeError(f"{str(path)!r} does not hold a state dict (a mapping of names to tensors)")
    prefix = "module."
    if all(k.startswith(prefix) for k in data):
        data = {k[len(prefix):]: v for k, v in data.items()}
    return dict(data)


def _is_state_dict(data: Mapping[Any, Any]) -> bool:
    return bool(data) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items())


def load_weights(model: torch.nn.Module, path: str | os.PathLike[str]) -> None:
    """Load ``path`` into ``model`` strictly, with a short report of mismatched keys."""
    state = load_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        if wrong:
            k = wrong[0]
            parts.append(f"shape of {k!r} is {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model")
        raise RecipeError(f"weights in {str(path)!r} do not fit the model: " + "; ".join(parts))
    model.load_state_dict(state)


def save_weights(model_or_state: torch.nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """Write a state dict as safetensors, atomically (a temporary name, then a rename)."""
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    # safetensors refuses shared storage and non-contiguous tensors: store plain copies.
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(plain, str(tmp))


def fingerprint(model_or_state: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """A SHA-256 of a model's state dict (names, dtypes, shapes and values): equal weights, equal print."""
    import hashlib

    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy
    return digest.hexdigest()
