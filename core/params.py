"""Check a plugin's ``params`` against its factory's signature, with pydantic.

A factory's annotations are its schema: ``temperature: Annotated[float, Field(gt=0)]``
makes ``temperature: -1`` a recipe error. Unannotated params accept any value.
"""

from __future__ import annotations

import inspect
import re
import typing
from typing import Any, Callable, Mapping

import pydantic
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import RecipeError, did_you_mean


def _parameters(factory: Callable[..., Any]) -> tuple[list[inspect.Parameter], bool, dict[str, Any]]:
    """The factory's named params, whether it takes ``**kwargs``, and its resolved hints."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return [], True, {}
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        hints = typing.get_type_hints(target, include_extras=True)
    except Exception:  # unresolvable forward references: fall back to no annotations
        hints = {}
    named = [
        p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    return named, takes_kwargs, hints


def param_names(factory: Callable[..., Any]) -> list[str]:
    """Names of the keyword params a factory accepts."""
    return [p.name for p in _parameters(factory)[0]]


def accepts(factory: Callable[..., Any], name: str) -> bool:
    """Whether ``factory`` can take a keyword param ``name``."""
    named, takes_kwargs, _ = _parameters(factory)
    return takes_kwargs or any(p.name == name for p in named)


def required_names(factory: Callable[..., Any]) -> list[str]:
    """Params without a default."""
    return [p.name for p in _parameters(factory)[0] if p.default is inspect.Parameter.empty]


def _schema(factory: Callable[..., Any]) -> type[BaseModel]:
    named, takes_kwargs, hints = _parameters(factory)
    fields: dict[str, Any] = {}
    for p in named:
        annotation = hints.get(p.name, Any)
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[p.name] = (annotation, default)
    config = ConfigDict(
        extra="allow" if takes_kwargs else "forbid",
        arbitrary_types_allowed=True,
        protected_namespaces=(),
        validate_default=False,
        allow_inf_nan=False,
    )
    try:
        return pydantic.create_model("Params", __config__=config, **fields)
    except Exception:  # an annotation pydantic cannot handle: check names only
        loose = {name: (Any, default) for name, (_, default) in fields.items()}
        return pydantic.create_model("Params", __config__=config, **loose)


def loc_to_key(prefix: str | None, loc: tuple[Any, ...]) -> str:
    """Join a recipe key prefix and a pydantic location into ``a.b[2].c`` form."""
    key = prefix or ""
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        elif not _PLAIN_KEY.fullmatch(str(part)):
            key += f"[{str(part)!r}]"  # odd keys (spaces, newlines, ...) shown quoted
        else:
            key += f".{part}" if key else str(part)
    return key


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_error(err: Mapping[str, Any], valid_names: list[str] | None = None) -> str:
    """One human sentence for one pydantic error."""
    kind = err.get("type")
    if kind == "missing":
        return "is required but missing"
    if kind == "extra_forbidden":
        name = str(err["loc"][-1]) if err.get("loc") else "?"
        hint = did_you_mean(name, valid_names or [])
        valid = f" Valid keys here: {', '.join(valid_names)}." if valid_names else ""
        return f"unknown key.{hint}{valid}"
    msg = re.sub(r" or instance of \w+", "", str(err.get("msg", "invalid value")))
    msg = msg.removeprefix("Value error, ")  # a validator's own sentence
    return f"{msg[0].lower()}{msg[1:]} (got {_short(err.get('input'))})"


_SCALAR_TAGS = {"float", "int", "str", "bool", "none", "list", "dict", "tuple", "set", "bytes"}


def _is_union_tag(part: Any) -> bool:
    """A location part pydantic adds for a member of a union (``float``, ``is-instance[Tensor]``)."""
    return isinstance(part, str) and (part in _SCALAR_TAGS or "[" in part or "-" in part)


def union_errors(errors: list[Mapping[str, Any]]) -> list[tuple[tuple[Any, ...], Mapping[str, Any]]]:
    """One error per place: union members' tags stripped from the locations, the most telling error kept.

    ``lr: float | Tensor`` given ``inf`` fails as a float and as a Tensor; the user needs
    only "input should be a finite number", not pydantic's union internals.
    """
    chosen: dict[tuple[Any, ...], Mapping[str, Any]] = {}
    for err in errors:
        loc = tuple(err["loc"][:1]) + tuple(p for p in err["loc"][1:] if not _is_union_tag(p))
        if loc not in chosen or chosen[loc].get("type") in ("is_instance_of", "is_subclass_of"):
            chosen[loc] = err
    return list(chosen.items())


def check_params(
    factory: Callable[..., Any],
    params: Mapping[str, Any] | None,
    *,
    key: str,
    provided_context: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Validate ``params`` against ``factory``'s signature; return the params to call it with.

    ``provided_context`` are values the engine can fill in (``num_classes`` ...): they
    are used for params the factory accepts and the recipe left out.
    Raises ``RecipeError`` naming ``key`` plus the offending param.
    """
    params = dict(params or {})
    named, takes_kwargs, _ = _parameters(factory)
    names = [p.name for p in named]
    for ctx_name, ctx_value in (provided_context or {}).items():
        if ctx_name in names and ctx_name not in params:
            params[ctx_name] = ctx_value
    schema = _schema(factory)
    try:
        validated = schema.model_validate(params)
    except ValidationError as exc:
        errors = union_errors(exc.errors())
        parts = [f"{loc_to_key(key, loc)}: {describe_error(err, names)}" for loc, err in errors]
        error = RecipeError("; ".join(parts))
        error.key = loc_to_key(key, errors[0][0])
        raise error from None
    out = {name: getattr(validated, name) for name in names if name in params}
    if takes_kwargs and validated.model_extra:
        out.update(validated.model_extra)
    return out
