"""Error types that the command line turns into exit code 2, and did-you-mean help."""

from __future__ import annotations

import difflib
from typing import Iterable


class RecipeError(Exception):
    """A recipe, override or usage problem: reported in one line, exit code 2.

    ``key`` is the dotted recipe key the problem is at (``"losses[1].params.temperature"``),
    or ``None`` when the problem is not tied to one key.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        self.key = key
        self.detail = message
        super().__init__(f"{key}: {message}" if key else message)


class PluginError(RecipeError):
    """A plugin is unknown, failed to load, collides with another, or cannot be built."""


def did_you_mean(word: str, choices: Iterable[str], *, limit: int = 3) -> str:
    """Return ``" Did you mean 'x'?"`` (or ``""``) for the choices closest to ``word``."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(str(word), choices, n=limit, cutoff=0.5)
    if not close:
        lowered = {c.lower(): c for c in choices}
        if str(word).lower() in lowered:
            close = [lowered[str(word).lower()]]
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


def valid_list(choices: Iterable[str], *, limit: int = 25) -> str:
    """Format a short list of valid choices for an error message."""
    choices = sorted(set(choices))
    shown = ", ".join(choices[:limit])
    more = f", ... ({len(choices) - limit} more)" if len(choices) > limit else ""
    return f"valid: {shown}{more}" if choices else "none are registered"


class TrainingStopped(RuntimeError):
    """A run stopped for a reason the user can act on (non-finite loss, out of memory, disk full,
    interrupted): reported in one message without a traceback, exit code 1 (130 when interrupted)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
