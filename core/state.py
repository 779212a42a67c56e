"""The loop's state that a checkpoint carries beside Accelerate's (``kdforge_state.json``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class RunState:
    """Where a run is: epochs done, optimizer steps taken, and what it measured so far.

    ``total_steps`` is the run's length in optimizer steps, fixed when the run starts:
    schedules use it, so a resumed run with a different ``trainer.epochs`` is not stretched.
    """

    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    total_steps: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0
    scaler_skipped_steps: int = 0
    wall_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    teacher_metrics: dict[str, Any] | None = None
    teacher_member_metrics: list[dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        """The state as JSON-ready data."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunState":
        """Read a saved state; keys a state of kdforge 0.1 named differently are carried over."""
        known = {f.name for f in fields(cls)}
        for name, value in data.items():
            if name in known and value is not None and not _fits(name, value):
                raise ValueError(f"{name!r} is {value!r}")
        for name in ("epoch", "step"):
            if name not in data:
                raise ValueError(f"it has no {name!r}")
        state = cls(**{k: v for k, v in data.items() if k in known})
        if state.teacher_metrics is None and data.get("teacher_accuracy") is not None:
            state.teacher_metrics = {"accuracy": data["teacher_accuracy"]}
        if state.teacher_member_metrics is None and data.get("teacher_member_accuracy") is not None:
            state.teacher_member_metrics = [{"accuracy": a} for a in data["teacher_member_accuracy"]]
        return state


_KINDS: dict[str, Any] = {"wall_seconds": (int, float), "history": list, "teacher_member_metrics": list,
                          "teacher_metrics": dict}


def _fits(name: str, value: Any) -> bool:
    """Whether a saved value has its field's type: counters are non-negative ints (not bools)."""
    if isinstance(value, bool):
        return False
    kind = _KINDS.get(name)
    if kind is None:
        return isinstance(value, int) and value >= 0
    return isinstance(value, kind)
