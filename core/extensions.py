"""Typed extension points: the optional capabilities a plugin object may implement.

Each capability is a ``typing.Protocol``. When a plugin object is built,
``check_extension_points`` matches it against every protocol (a half-implemented one is an
error naming the missing method); when a run is prepared, the engine collects what each
object implements once (callback lists, extra heads, batch transforms, stateful objects),
and its loop only calls those lists. ``docs/extension-points.md`` documents each of them.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, TypeVar, runtime_checkable

import torch
from torch import nn

from .errors import PluginError, did_you_mean
from .outputs import Batch, DataSplits, ModelOutputs, StepOutputs


# -- the task ---------------------------------------------------------------------------
@runtime_checkable
class Task(Protocol):
    """What a run is trained and judged on: the batch contract, the output check, the metrics.

    ``headline`` names the metric ``summary.json`` and ``kdforge compare`` lead with
    (``student/<headline>``), and ``higher_is_better`` which way it improves. Metrics are
    accumulated as sums: ``eval_batch`` returns tensors that the engine adds up over
    batches and processes (one host sync per evaluation), and ``eval_result`` turns the
    totals into metrics. Subclass ``kdforge.TaskBase`` for the usual batch handling.
    """

    headline: str
    higher_is_better: bool

    def to_batch(self, item: Any) -> Batch:
        """A collated item of the data loader as a ``Batch`` (``index`` is added by the engine)."""
        ...

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Run ``model`` on the batch; return its logits."""
        ...

    def check_outputs(self, logits: torch.Tensor, batch: Batch, splits: DataSplits) -> None:
        """Raise ``ValueError`` (one sentence) when ``logits`` do not fit this task and data."""
        ...

    def batch_weight(self, batch: Batch) -> int | torch.Tensor:
        """How much the batch counts in a gradient-accumulation window (samples, tokens, ...)."""
        ...

    def has_labels(self, batch: Batch) -> bool:
        """Whether any sample of the batch carries a label (not called in the training loop)."""
        ...

    def eval_batch(self, logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """Sums for one eval batch (e.g. ``{"correct": ..., "count": ...}``), kept on the device."""
        ...

    def eval_result(self, sums: Mapping[str, float]) -> dict[str, float | None]:
        """Metrics from the sums over the whole eval split (``None`` where undefined)."""
        ...


# -- teachers ---------------------------------------------------------------------------
@runtime_checkable
class CompositeTeacher(Protocol):
    """A teacher made of member teachers, run one after another and combined.

    The engine calls each of ``members`` under ``no_grad`` and passes their outputs to
    ``combine``; losses get the combined view as ``out.teacher`` and the members' outputs
    as ``out.teachers``. Taps inside member ``i`` are named ``members.<i>.<module>``.
    """

    members: Sequence[nn.Module]

    def combine(self, outputs: list[ModelOutputs], targets: torch.Tensor | None) -> ModelOutputs:
        """The combined view of the members' outputs for one batch."""
        ...


@runtime_checkable
class BindsStudent(Protocol):
    """A teacher that needs the student once, before training (``bind`` gets it as built)."""

    def bind(self, student: nn.Module) -> None:
        """Called once with the student, before the taps are checked and the dry run."""
        ...


@runtime_checkable
class FollowsStudent(BindsStudent, Protocol):
    """A teacher that changes with the student: updated after every optimizer step.

    Such a teacher is evaluated after every epoch, its ``state_dict`` is checkpointed and
    restored by ``--resume``, written to ``teacher.safetensors`` in the run directory, and
    it cannot be cached.
    """

    def update(self, student: nn.Module) -> None:
        """Follow the student (unwrapped) after an optimizer step; decorate with ``torch.no_grad``."""
        ...


@runtime_checkable
class RenamesTaps(Protocol):
    """A model whose tap names are not its own module names (a wrapper, a moving average).

    ``get_submodule`` resolves a tap name; ``tap_names`` lists the names it accepts, for
    the closest-name hints of a misspelt tap.
    """

    def get_submodule(self, target: str) -> nn.Module:
        """The module a tap name refers to."""
        ...

    def tap_names(self) -> Iterable[str]:
        """Every tap name this model accepts."""
        ...


# -- losses -----------------------------------------------------------------------------
@runtime_checkable
class NeedsTeacher(Protocol):
    """A loss that only makes sense with a teacher (``teacher_required = True``)."""

    teacher_required: bool


@runtime_checkable
class TapsFeatures(Protocol):
    """A loss that reads intermediate features: the module names it taps on each side."""

    student_taps: list[str]
    teacher_taps: list[str]


#: where ``ExtraOutputs`` heads are logged: ``student/exits/<name>/<metric>`` (the keys of kdforge 0.1)
EXTRA_HEADS_GROUP = "exits"  # kept from kdforge 0.1


@runtime_checkable
class ExtraOutputs(Protocol):
    """A loss that owns extra heads (e.g. early exits) whose outputs are evaluated too.

    ``eval_logits`` is called per eval batch of the student; each returned tensor is judged
    by the task's metrics, logged as ``student/exits/<name>/<metric>`` per evaluation, and
    the last values are mappings ``student/exits/<metric>`` (name -> value) in the summary.
    """

    def eval_logits(self, out: StepOutputs) -> Mapping[str, torch.Tensor]:
        """Extra logits for one eval batch, by name."""
        ...


@runtime_checkable
class ReportsScalars(Protocol):
    """A loss that reports values of its own (a learned temperature, a running margin) in the training log."""

    def scalars(self) -> Mapping[str, float | torch.Tensor]:
        """Current values by name, logged as ``train/<loss label>/<name>`` at every log interval."""
        ...


@runtime_checkable
class EstimatesMemory(Protocol):
    """A loss that knows the memory it allocates beyond the logits (chunks, buffers), for the dry run's estimate.

    ``kdforge validate --dry-run`` calls it once, after the dry run, with the dry run's
    outputs (a few samples) and the trainer's ``batch_size``; each returned line is printed
    with the parameters, optimizer state and logits, and counted in the total.
    """

    def memory_estimate(self, out: StepOutputs, batch_size: int) -> Mapping[str, int]:
        """Bytes by label of this loss's largest transients on a training batch of ``batch_size`` samples."""
        ...


@runtime_checkable
class ExportsFiles(Protocol):
    """A loss that writes what it learned into the run directory when the run ends."""

    def export(self, student: nn.Module, run_dir: Path) -> None:
        """Write files under ``run_dir`` (main process only, after ``student.safetensors``)."""
        ...


@runtime_checkable
class Traceable(Protocol):
    """A model that exporters cannot trace as it is (it stops early by raising, say) but can give one they can.

    ``kdforge export`` exports ``traceable()`` instead of the model and checks it against the model.
    """

    def traceable(self) -> nn.Module:
        """An equivalent module (same outputs) that ``torch.export``, TorchScript and fx can trace."""
        ...


@runtime_checkable
class TransformsBatch(Protocol):
    """A plugin object (a loss, the task) that rewrites each training batch before the models see it.

    Called once per micro-batch, under ``no_grad``, before the teacher and the student run
    (on-policy distillation replaces completions by the student's own samples here).
    """

    def transform_batch(self, batch: Batch, run: "RunContext") -> Batch:
        """The batch the models and losses get instead of ``batch``."""
        ...


@runtime_checkable
class ReplaysAugmentation(Protocol):
    """A dataset (a train split) whose random augmentation can be drawn, stored and replayed exactly.

    The teacher cache needs it for augmented data: it stores a few views per sample with
    their parameters and replays one each epoch (``kdforge.ReplayableDataset`` implements it).
    """

    def augmentation_spec(self) -> Mapping[str, Any]:
        """What the augmentation is, as JSON: a different spec is a different cache."""
        ...

    def draw_augmented(self, index: int, generator: torch.Generator) -> tuple[Any, torch.Tensor]:
        """The item at ``index`` augmented with parameters drawn from ``generator``, and those parameters
        (a 1-D float tensor, the same length for every sample)."""
        ...

    def replay_augmented(self, index: int, params: torch.Tensor) -> Any:
        """The item at ``index`` augmented with exactly ``params``."""
        ...


@runtime_checkable
class Generator(Protocol):
    """A ``generator`` plugin: produces new samples from a model (``register_generators``).

    What ``generate`` fills in is up to the task: a language-model generator appends
    sampled tokens to the prompts of ``batch``. A faster generator is a plugin of its own.
    """

    def generate(self, model: nn.Module, batch: Batch) -> Batch:
        """A batch with the model's samples in it (no gradient flows through generation)."""
        ...


# -- lifecycle callbacks ----------------------------------------------------------------
@dataclass
class RunContext:
    """What a lifecycle callback sees: where the run is and its (unwrapped) models.

    One object per run, updated in place: ``step`` (optimizer steps taken), ``epoch``
    (0-based), ``metrics`` (the latest evaluation), ``summary`` (filled at the end).
    """

    run_dir: Path
    student: nn.Module
    teacher: nn.Module | None
    accelerator: Any
    epochs: int
    steps_per_epoch: int
    total_steps: int
    step: int = 0
    epoch: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def is_main_process(self) -> bool:
        """Whether this is the process that writes files."""
        return bool(self.accelerator.is_main_process)

    @property
    def progress(self) -> float:
        """``step / total_steps``, in [0, 1]."""
        return min(self.step / max(self.total_steps, 1), 1.0)


CALLBACK_EVENTS = ("on_fit_start", "on_step_end", "on_epoch_end", "on_fit_end")


@runtime_checkable
class Callback(Protocol):
    """Code to run at a moment of the run; any plugin object may implement any of these.

    Called on every process, outside autocast, with the same ``RunContext``.
    ``on_fit_end`` may return a mapping that is merged into ``summary.json``.
    """

    def on_fit_start(self, run: RunContext) -> None:
        """Before the first training step (also when resuming)."""
        ...

    def on_step_end(self, run: RunContext) -> None:
        """After every optimizer step that was taken (not after skipped ones)."""
        ...

    def on_epoch_end(self, run: RunContext) -> None:
        """After every epoch's evaluation, before its checkpoint."""
        ...

    def on_fit_end(self, run: RunContext) -> Mapping[str, Any] | None:
        """After the last epoch, before ``summary.json`` is written."""
        ...


# -- checking plugin objects against the protocols --------------------------------------
#: protocol -> the attributes that make it up (methods must be callable)
_PARTS: dict[type, tuple[tuple[str, bool], ...]] = {
    CompositeTeacher: (("members", False), ("combine", True)),
    FollowsStudent: (("bind", True), ("update", True)),
    RenamesTaps: (("tap_names", True),),
    ExtraOutputs: (("eval_logits", True),),
    ExportsFiles: (("export", True),),
    ReportsScalars: (("scalars", True),),
    EstimatesMemory: (("memory_estimate", True),),
    TransformsBatch: (("transform_batch", True),),
    Generator: (("generate", True),),
    ReplaysAugmentation: (("augmentation_spec", True), ("draw_augmented", True), ("replay_augmented", True)),
}
_ROLES: dict[str, tuple[type, ...]] = {
    "teacher": (CompositeTeacher, FollowsStudent, RenamesTaps),
    "student": (RenamesTaps,),
    "loss": (ExtraOutputs, ExportsFiles, ReportsScalars, TransformsBatch, EstimatesMemory),
    "task": (TransformsBatch,),
    "generator": (Generator,),
}


def _has(obj: Any, name: str) -> bool:
    try:
        return getattr(obj, name, None) is not None
    except Exception:  # noqa: BLE001 - a property that raises counts as absent
        return False


def check_extension_points(obj: Any, role: str, label: str, key: str | None = None) -> None:
    """Check ``obj`` (a built plugin object in ``role``) against every protocol it touches.

    A protocol implemented in part (``update`` without ``bind``), a method that is not
    callable, a misspelt callback (``on_step_ends``) or taps that are not lists of names
    are a ``PluginError`` that names the missing or wrong attribute.
    """
    for protocol in _ROLES.get(role, ()):
        parts = _PARTS[protocol]
        present = [name for name, _ in parts if _has(obj, name)]
        if protocol is FollowsStudent and present == ["bind"]:
            continue  # BindsStudent alone is a protocol of its own
        if protocol is CompositeTeacher and isinstance(obj, TeacherWrapper) and not teacher_members(obj.inner):
            continue  # a wrapper's combine is for when it wraps a composite; around a plain teacher it is unused
        if present and len(present) < len(parts):
            missing = [name for name, _ in parts if name not in present]
            raise PluginError(f"{label} implements {', '.join(present)} of the {protocol.__name__} extension point "
                              f"but not {', '.join(missing)} (see docs/extension-points.md)", key=key)
        for name, is_method in parts:
            if name in present and is_method and not callable(getattr(obj, name)):
                raise PluginError(f"{label}: {name} must be a method ({protocol.__name__} extension point)", key=key)
    if role == "teacher" and _has(obj, "members"):
        members = getattr(obj, "members")
        if not all(isinstance(m, nn.Module) for m in members):
            raise PluginError(f"{label}: members must be torch.nn.Modules (CompositeTeacher extension point)", key=key)
        if isinstance(obj, TeacherWrapper) and _overrides(obj, "forward") and not _overrides(obj, "combine"):
            raise PluginError(f"{label} wraps a CompositeTeacher and overrides forward but not combine: in training the "
                              f"engine runs the members and combine, so the wrapper's forward would be skipped; "
                              f"override combine too", key=key)
    if role == "loss":
        for side in ("student_taps", "teacher_taps"):
            taps = getattr(obj, side, None)
            if taps is not None and (isinstance(taps, str) or not all(isinstance(t, str) and t for t in taps)):
                raise PluginError(f"{label}: {side} must be a list of module names, got {taps!r}", key=key)
        required = getattr(obj, "teacher_required", False)
        if not isinstance(required, bool):
            raise PluginError(f"{label}: teacher_required must be True or False, got {required!r}", key=key)
    for name in _callback_names(obj):
        if name not in CALLBACK_EVENTS:
            hint = did_you_mean(name, CALLBACK_EVENTS)
            if hint:
                raise PluginError(f"{label} has a method {name!r}, which is not a lifecycle callback.{hint}", key=key)
        elif not callable(getattr(obj, name)):
            raise PluginError(f"{label}: {name} must be a method (Callback extension point)", key=key)


def _overrides(obj: Any, name: str) -> bool:
    """Whether a ``TeacherWrapper`` subclass defines ``name`` itself."""
    return any(name in vars(cls) for cls in type(obj).__mro__ if cls not in (TeacherWrapper, nn.Module, object))


def _callback_names(obj: Any) -> list[str]:
    names = {n for n in dir(type(obj)) if n.startswith("on_")}
    names |= {n for n in getattr(obj, "__dict__", {}) if n.startswith("on_")}
    return sorted(names)


def teacher_members(teacher: nn.Module | None) -> list[nn.Module]:
    """The members of a ``CompositeTeacher``, else ``[]``."""
    if teacher is not None and _has(teacher, "members") and callable(getattr(teacher, "combine", None)):
        return list(teacher.members)
    return []


def estimates_memory(obj: Any) -> bool:
    """Whether ``obj`` implements ``EstimatesMemory``."""
    return callable(getattr(obj, "memory_estimate", None))


def follows_student(teacher: nn.Module | None) -> bool:
    """Whether ``teacher`` implements ``FollowsStudent`` (its weights change during training)."""
    return teacher is not None and callable(getattr(teacher, "bind", None)) and callable(getattr(teacher, "update", None))


def callbacks_of(obj: Any, event: str) -> Callable[[RunContext], Any] | None:
    """``obj``'s callback for ``event`` (a ``Callback`` method), or ``None``."""
    method = getattr(obj, event, None)
    return method if callable(method) else None


# -- helpers for plugin authors ---------------------------------------------------------
F = TypeVar("F", bound=Callable[..., Any])


def full_precision(fn: F) -> F:
    """Decorator: run ``fn`` (a loss's ``forward``) with autocast disabled.

    Under mixed precision, matmuls and convolutions inside autocast run in half precision
    even on float32 inputs; loss math that must stay float32 (softmax, KL, Gram matrices,
    distances) runs inside this decorator. Inputs keep their dtype: cast them with
    ``.float()``.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        devices = [d for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
        if not devices:
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for device in devices:
                stack.enter_context(torch.autocast(device, enabled=False))
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


#: extension-point attributes a ``TeacherWrapper`` passes on from the teacher it wraps
WRAPPED_CAPABILITIES = ("members", "combine", "bind", "update", *CALLBACK_EVENTS)


class TeacherWrapper(nn.Module):
    """Base class for a teacher that wraps another teacher and keeps its extension points.

    ``inner`` is the wrapped teacher (build it with ``kdforge.build_teacher``). The
    wrapper's ``forward`` calls it; override ``forward`` to change the logits (and
    ``combine`` too when the inner teacher is a ``CompositeTeacher``, whose members the
    engine runs itself). The inner teacher's ``members``/``combine``, ``bind``/``update``
    and lifecycle callbacks are passed on, and tap names are the inner teacher's.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, inputs: Any) -> Any:
        return self.inner(inputs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in WRAPPED_CAPABILITIES:
                inner = self._modules.get("inner")
                if inner is not None:
                    return getattr(inner, name)
            raise

    def get_submodule(self, target: str) -> nn.Module:
        """Tap names are the inner teacher's (``inner.`` prefixes are accepted too)."""
        if target.startswith("inner."):
            target = target[len("inner."):]
        return resolve_module(self.inner, target) if target else self

    def tap_names(self) -> list[str]:
        """The inner teacher's tap names."""
        return module_names(self.inner)


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """The module a dotted ``name`` refers to, honouring ``get_submodule`` overrides at every level.

    ``nn.Module.get_submodule`` walks child attributes and ignores an override inside a
    child (a member that renames its taps); this walk hands the rest of the name to the
    first module on the path that overrides ``get_submodule``.
    """
    if not name:
        return model
    if type(model).get_submodule is not nn.Module.get_submodule:
        return model.get_submodule(name)
    head, _, rest = name.partition(".")
    child = dict(model.named_children()).get(head)
    if child is None:
        raise AttributeError(f"{type(model).__name__} has no submodule {head!r}")
    return resolve_module(child, rest)


def module_names(model: nn.Module) -> list[str]:
    """Every tap name ``model`` accepts, following ``tap_names`` of modules that rename theirs."""
    names_fn = getattr(model, "tap_names", None)
    if callable(names_fn):
        return [str(n) for n in names_fn() if n]
    names: list[str] = []
    for child_name, child in model.named_children():
        names.append(child_name)
        names += [f"{child_name}.{n}" for n in module_names(child)]
    return names


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (dim 0) from every process, keeping the gradient of this process's part.

    For losses over relations between samples (distances, Gram matrices, contrastive
    negatives): under DDP each process sees only its share of the batch. With one process
    it returns ``tensor`` itself. Every process must call it with the same shape.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather as gather_with_grad

    return torch.cat(list(gather_with_grad(tensor.contiguous())), dim=0)
