"""Recipes: YAML files validated by pydantic models (extra keys forbidden) before any compute.

A recipe names plugins (``{name, params}``); a numeric value in loss params, a loss
weight or the learning rate may instead be a schedule: ``{schedule: NAME, params: {...}}``.
"""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from .errors import RecipeError
from .params import describe_error, loc_to_key

NonNegFloat = Annotated[float, Field(ge=0.0)]
PosInt = Annotated[int, Field(strict=True, ge=1)]
NonNegInt = Annotated[int, Field(strict=True, ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, protected_namespaces=())


class ScheduledValue(_Strict):
    """A numeric value that follows a schedule plugin over the run's progress."""

    schedule: str
    params: dict[str, Any] = Field(default_factory=dict)


Number = Union[float, ScheduledValue]


class PluginRef(_Strict):
    """``{name: ..., params: {...}}``: a plugin and the params for its factory."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class CacheSpec(_Strict):
    """``teacher.cache``: compute the teacher's outputs once and reuse them (see docs/recipes.md)."""

    views: PosInt = 1
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    top_k: PosInt | None = None
    dir: str | None = None


class TeacherRef(PluginRef):
    """The teacher: a plugin reference, and optionally a cache of its outputs."""

    cache: CacheSpec | None = None


class LossRef(PluginRef):
    """A loss term: plugin, params and weight (a number >= 0 or a schedule)."""

    weight: Union[NonNegFloat, ScheduledValue] = 1.0


class OptimizerSpec(_Strict):
    """A ``torch.optim`` optimizer by name, with its params (``lr`` may be a schedule)."""

    name: str = "adamw"
    params: dict[str, Any] = Field(default_factory=lambda: {"lr": 1e-3})
    decay_norm_and_bias: bool = False


class CompileSpec(_Strict):
    """``trainer.compile``: ``torch.compile`` the student (in place, so its weights keep their names)."""

    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    backend: str = "inductor"
    fullgraph: bool = False
    dynamic: bool | None = None


class TrainerSpec(_Strict):
    """How to train: epochs, batches, precision, logging, checkpointing and throughput options."""

    epochs: PosInt
    batch_size: PosInt = 64
    eval_batch_size: PosInt | None = None
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_accumulation_steps: PosInt = 1
    max_grad_norm: Annotated[float, Field(gt=0.0)] | None = None
    log_every: PosInt = 20
    keep_checkpoints: PosInt = 2
    checkpoint_every: PosInt = 1
    num_workers: NonNegInt = 0
    drop_last: bool = False
    progress_bar: bool = True
    nonfinite: Literal["stop", "skip"] = "stop"
    channels_last: bool = False
    compile: CompileSpec | None = None
    pin_memory: bool | None = None
    persistent_workers: bool = False
    prefetch_factor: PosInt | None = None

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_true(cls, value: Any) -> Any:
        # `compile: true` is the default mode, `compile: false` none
        if value is True:
            return {}
        return None if value is False else value

    @field_validator("persistent_workers", "prefetch_factor")
    @classmethod
    def _workers_only(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in (None, False) and info.data.get("num_workers", 0) == 0:
            raise ValueError("needs worker processes: set trainer.num_workers >= 1 too")
        return value

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted `no` as false
        return "no" if value is False else value


class WandbSpec(_Strict):
    """Weights & Biases settings; offline unless ``mode: online`` (or WANDB_MODE) says otherwise."""

    project: str = "kdforge"
    name: str | None = None
    entity: str | None = None
    group: str | None = None
    tags: list[str] = Field(default_factory=list)
    notes: str | None = None
    mode: Literal["offline", "online", "disabled"] | None = None
    dir: str | None = None


class TrackingSpec(_Strict):
    """Experiment trackers (metrics.jsonl is always written)."""

    wandb: WandbSpec | None = None


class Recipe(_Strict):
    """A whole kdforge recipe."""

    name: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^/\\\x00]+$")] = "kdforge-run"
    seed: Annotated[int, Field(strict=True, ge=0, lt=2**32)] = 0
    task: PluginRef | None = None
    data: PluginRef
    teacher: TeacherRef | None = None
    student: PluginRef
    losses: Annotated[list[LossRef], Field(min_length=1)]
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    trainer: TrainerSpec
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    output_dir: str | None = None

    @field_validator("name")
    @classmethod
    def _not_a_directory_alias(cls, value: str) -> str:
        if value.strip(".") == "":
            raise ValueError("a run name cannot be '.' or '..' (it names runs/<name>)")
        return value

    def run_dir(self) -> Path:
        """Where this recipe's run directory is (``runs/<name>`` unless ``output_dir`` says)."""
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.name


_MODELS = (ScheduledValue, PluginRef, CacheSpec, TeacherRef, CompileSpec, LossRef, OptimizerSpec, TrainerSpec, WandbSpec, TrackingSpec, Recipe)


# -- YAML -----------------------------------------------------------------------------------
class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML (no tags that build Python objects) that also refuses duplicated keys."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)  # YAML merge keys (<<: *defaults)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, f"unhashable key {key!r}", key_node.start_mark
            ) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicated key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


MAX_RECIPE_NODES = 100_000


def _expanded_size(value: Any, memo: dict[int, int], stack: set[int]) -> int:
    """Nodes in ``value`` once YAML aliases are expanded (shared objects counted each time)."""
    if not isinstance(value, (dict, list)):
        return 1
    key = id(value)
    if key in stack:
        raise RecipeError("recipe contains a YAML alias that refers to itself")
    if key not in memo:
        stack.add(key)
        children = list(value.items()) if isinstance(value, dict) else [(None, v) for v in value]
        total = 1
        for child_key, child in children:
            total += _expanded_size(child, memo, stack) + (child_key is not None)
            if total > MAX_RECIPE_NODES:
                break
        stack.discard(key)
        memo[key] = total
    return memo[key]


def parse_yaml(text: str, source: str = "recipe") -> Any:
    """Parse YAML safely; errors become one-line ``RecipeError``s with the line number.

    Aliases that expand to a huge document ("billion laughs") or refer to themselves are refused.
    """
    data = _parse(text, source)
    if _expanded_size(data, {}, set()) > MAX_RECIPE_NODES:
        raise RecipeError(f"{source} expands to more than {MAX_RECIPE_NODES:,} values (YAML aliases?)")
    return data


def _parse(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{source} is not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise RecipeError(f"{source} is nested too deeply") from None


MAX_RECIPE_BYTES = 1 << 20


def load_yaml_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping from a file (``RecipeError`` if missing, not a regular file, too big, or not a mapping).

    The file is checked with ``stat`` before it is opened, so a FIFO, ``/dev/zero`` or a
    directory is refused instead of blocking or reading forever.
    """
    import stat

    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise RecipeError(f"recipe file {str(path)!r} does not exist") from None
    except (OSError, ValueError) as exc:
        raise RecipeError(f"cannot read recipe file {str(path)!r}: {getattr(exc, 'strerror', None) or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device or socket"
        raise RecipeError(f"recipe file {str(path)!r} is {kind}, not a regular file")
    if info.st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe file {str(path)!r} is {info.st_size / 2**20:.1f} MiB; a recipe is at most "
                          f"{MAX_RECIPE_BYTES // 2**20} MiB of YAML (is it really a recipe?)")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file {str(path)!r} does not exist") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError, OSError, ValueError) as exc:
        raise RecipeError(f"cannot read recipe file {str(path)!r}: {type(exc).__name__}: {exc}") from None
    data = parse_yaml(text, f"recipe file {str(path)!r}")
    if not isinstance(data, dict):
        raise RecipeError(f"recipe file {str(path)!r} must hold a mapping of keys, not {type(data).__name__}")
    return data


# -- overrides ------------------------------------------------------------------------------
def _split_path(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for chunk in path.replace("]", "").replace("[", ".").split("."):
        if chunk == "":
            raise RecipeError(f"override key {path!r} is malformed (empty part)")
        parts.append(int(chunk) if chunk.isdigit() else chunk)
    return parts


class _Delete:
    """The value of ``--set key=`` (nothing after ``=``): remove the key."""

    def __repr__(self) -> str:
        return "<delete>"


DELETE = _Delete()


def set_by_path(data: dict[str, Any], path: str, value: Any) -> None:
    """Set ``data[a][b][2] = value`` for ``path == "a.b.2"`` (or ``a.b[2]``), creating mappings.

    ``value`` ``DELETE`` removes the key (or list item) instead; a missing key is an error then.
    """
    parts = _split_path(path)
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = loc_to_key(None, tuple(parts[: i + 1]))
        if isinstance(node, list):
            if not isinstance(part, int) or not -len(node) <= part < len(node):
                raise RecipeError(f"no list item {part!r} here (the list has {len(node)} items)", key=where)
        elif isinstance(node, dict):
            if isinstance(part, int) and part not in node:
                part = str(part)
            if not last and (part not in node or node[part] is None):
                if value is DELETE:
                    raise RecipeError("no such key to delete", key=where)
                node[part] = {}
        else:
            raise RecipeError(f"cannot set a key inside a {type(node).__name__} value", key=where)
        if last and value is DELETE:
            if isinstance(node, dict) and part not in node:
                raise RecipeError("no such key to delete", key=where)
            del node[part]
        elif last:
            node[part] = value
        else:
            node = node[part]


def normalize_overrides(overrides: Any) -> list[tuple[str, Any]]:
    """Turn ``["a.b=1", ...]`` or ``{"a.b": 1}`` into ``[("a.b", 1), ...]`` (values parsed as YAML).

    ``"a.b="`` (nothing after ``=``) deletes the key: its value is ``DELETE``; ``a.b=null`` sets null.
    """
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [(str(k), v) for k, v in overrides.items()]
    if isinstance(overrides, str):
        overrides = [overrides]
    pairs = []
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise RecipeError(f"override {item!r} must look like key.path=value")
        key, _, raw = item.partition("=")
        key = key.strip()
        if not key:
            raise RecipeError(f"override {item!r} has no key before '='")
        pairs.append((key, parse_yaml(raw, f"value of override {key!r}") if raw.strip() else DELETE))
    return pairs


# -- validation -----------------------------------------------------------------------------
def _model_at(model: Any, loc: Sequence[Any]) -> Any:
    """The pydantic model class reached by walking ``loc`` from ``model`` (or ``None``)."""
    current: Any = model
    for part in loc:
        current = _unwrap_annotation(current)
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = field.annotation
    return _unwrap_annotation(current)


def _unwrap_annotation(annotation: Any) -> Any:
    for _ in range(5):
        origin = typing.get_origin(annotation)
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if origin is Annotated:
            annotation = args[0]
        elif origin in (Union, list, typing.types.UnionType) and args:  # type: ignore[attr-defined]
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            annotation = models[0] if models else args[0]
        else:
            break
    return annotation


def validate_recipe(data: Any) -> Recipe:
    """Validate a recipe mapping; raise one ``RecipeError`` naming every bad key."""
    if not isinstance(data, Mapping):
        raise RecipeError(f"a recipe must be a mapping of keys, not {type(data).__name__}")
    try:
        return Recipe.model_validate(dict(data))
    except ValidationError as exc:
        # Union members each report on the same value: strip their tags from the locations,
        # prefer the member that got deepest (the one the user meant), one error per place.
        seen: dict[tuple[Any, ...], dict[str, Any]] = {}
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not _is_union_tag(p))
            seen.setdefault(loc, err)
        deepest = {
            loc: err for loc, err in seen.items()
            if not any(other[: len(loc)] == loc and len(other) > len(loc) for other in seen)
        }
        parts = []
        for loc, err in deepest.items():
            parent = _model_at(Recipe, loc[:-1]) if err["type"] == "extra_forbidden" else None
            fields = list(parent.model_fields) if isinstance(parent, type) and issubclass(parent, BaseModel) else None
            parts.append(f"{loc_to_key(None, loc) or 'recipe'}: {describe_error(err, fields)}")
        error = RecipeError("; ".join(parts))
        error.key = loc_to_key(None, next(iter(deepest))) or None
        raise error from None


_SCALAR_TAGS = {"float", "int", "str", "bool", "none", "list", "dict"}


def _is_union_tag(part: Any) -> bool:
    if not isinstance(part, str):
        return False
    return "-" in part or part in _SCALAR_TAGS or part in {m.__name__ for m in _MODELS}


def load_recipe(source: str | os.PathLike[str] | Mapping[str, Any], overrides: Any = None) -> Recipe:
    """Load, override and validate a recipe."""
    if isinstance(source, Mapping):
        import copy

        data = copy.deepcopy(dict(source))
    elif isinstance(source, (str, os.PathLike)):
        data = load_yaml_file(source)
    else:
        raise RecipeError(f"a recipe is a YAML file path or a mapping, not {type(source).__name__}")
    for key, value in normalize_overrides(overrides):
        set_by_path(data, key, value)
    return validate_recipe(data)
