"""Plugin discovery: entry points loaded one by one, failures isolated, name tables built.

pluggy's ``load_setuptools_entrypoints`` stops at the first plugin that fails to
import, and a hook call stops at the first implementation that raises. kdforge
loads each entry point itself and calls each plugin's registration hooks on their
own, so one broken plugin is reported and every other plugin still works.
"""

from __future__ import annotations

import importlib.metadata as metadata
import inspect
import os
import sys
import types
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import pluggy

from . import hookspecs
from .errors import PluginError, RecipeError, did_you_mean, valid_list
from .params import check_params

ENTRY_POINT_GROUP = "kdforge"
BUILTIN_DISTRIBUTION = "kdforge"

#: plugin kind -> the hook that registers it
KIND_HOOKS: dict[str, str] = {
    "loss": "register_losses",
    "teacher": "register_teachers",
    "student": "register_students",
    "dataset": "register_datasets",
    "schedule": "register_schedules",
    "task": "register_tasks",
    "generator": "register_generators",
}
_KIND_ALIASES = {**{k: k for k in KIND_HOOKS}, **{k + "s": k for k in KIND_HOOKS}, "losses": "loss"}


@dataclass
class PluginRecord:
    """One row of ``kdforge.list_plugins()``: a registered (kind, name), or a failed plugin.

    Behaves as a mapping too (``record["kind"]``, ``dict(record)``).
    """

    kind: str
    name: str
    provider: str
    version: str | None
    status: str  # "ok", "failed", "conflict" or "unavailable"
    error: str | None = None
    plugin: str = ""
    summary: str = ""
    factory: Callable[..., Any] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready data (without the factory)."""
        data = asdict(self)
        data.pop("factory")
        return data

    def keys(self) -> list[str]:
        return list(self.to_dict())

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)


@dataclass
class _Source:
    """Where a plugin object came from."""

    obj: Any
    plugin: str  # entry-point name or module name
    provider: str  # distribution name, or module for non-packaged plugins
    version: str | None
    builtin: bool


def _rank0() -> bool:
    return os.environ.get("RANK", "0") in ("", "0") and os.environ.get("LOCAL_RANK", "0") in ("", "0")


def _warn(message: str) -> None:
    if _rank0():
        print(f"kdforge: warning: {message}", file=sys.stderr)


def _first_doc_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _normalize(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(".", "_")


def _allowed_plugins() -> set[str] | None:
    """Names from ``KDFORGE_LOAD_PLUGINS`` (``None`` when unset: load everything)."""
    raw = os.environ.get("KDFORGE_LOAD_PLUGINS")
    if raw is None:
        return None
    return {_normalize(part) for part in raw.split(",") if part.strip()}


def _entry_points() -> Iterator[tuple[metadata.EntryPoint, str, str | None]]:
    seen: set[tuple[str, str]] = set()
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        try:  # a malformed dist-info (no Name, unreadable METADATA) must not stop discovery
            dist_name = (dist.metadata.get("Name") if dist is not None else None) or ep.module or ep.name
            version = dist.version if dist is not None else None
        except Exception:  # noqa: BLE001
            dist_name, version = ep.module or ep.name, None
        marker = (_normalize(dist_name or ""), ep.name)
        if marker in seen:  # the same distribution found twice on sys.path
            continue
        seen.add(marker)
        yield ep, dist_name, version


class Registry:
    """The loaded plugins and their (kind, name) -> factory tables."""

    def __init__(self, extra: list[tuple[Any, str | None]] | None = None) -> None:
        self.pm = pluggy.PluginManager("kdforge")
        self.pm.add_hookspecs(hookspecs)
        self.records: list[PluginRecord] = []
        self.tables: dict[str, dict[str, PluginRecord]] = {kind: {} for kind in KIND_HOOKS}
        self._conflicts: dict[tuple[str, str], list[PluginRecord]] = {}
        #: entry points that KDFORGE_LOAD_PLUGINS left out, as "distribution (entry point)"
        self.skipped: list[str] = []
        for source in self._discover(extra or []):
            self._load(source)

    # -- discovery ---------------------------------------------------------
    def _discover(self, extra: list[tuple[Any, str | None]]) -> Iterator[_Source]:
        allowed = _allowed_plugins()
        for ep, dist_name, version in _entry_points():
            builtin = _normalize(dist_name) == BUILTIN_DISTRIBUTION
            if not builtin and allowed is not None:
                if _normalize(dist_name) not in allowed and _normalize(ep.name) not in allowed:
                    self.skipped.append(f"{dist_name} ({ep.name})")
                    continue
            try:
                obj = ep.load()
            except BaseException as exc:  # noqa: BLE001 - a plugin's import may raise anything
                if isinstance(exc, KeyboardInterrupt):
                    raise
                self._fail(ep.name, dist_name, version, f"import of {ep.value!r} failed: {_describe(exc)}")
                continue
            yield _Source(obj, ep.name, dist_name, version, builtin)
        for obj, name in extra:
            module = getattr(obj, "__name__", None) or type(obj).__module__
            default = module if isinstance(obj, types.ModuleType) else f"{module}.{type(obj).__name__}@{id(obj):x}"
            yield _Source(obj, name or default, module, getattr(obj, "__version__", None), False)

    def _fail(self, plugin: str, provider: str, version: str | None, error: str) -> None:
        _warn(f"plugin {plugin!r} from {provider} is disabled: {error}")
        self.records.append(
            PluginRecord("plugin", plugin, provider, version, "failed", error=error, plugin=plugin)
        )

    # -- registration ------------------------------------------------------
    def _load(self, source: _Source) -> None:
        label = f"{source.provider}:{source.plugin}"
        try:
            self.pm.register(source.obj, name=label)
        except Exception as exc:  # bad hook signatures, duplicate objects
            self._fail(source.plugin, source.provider, source.version, f"bad registration: {_describe(exc)}")
            return
        try:
            staged = self._collect(source)
        except Exception as exc:
            self.pm.unregister(source.obj)
            self._fail(source.plugin, source.provider, source.version, str(exc))
            return
        for kind, name, factory in staged:
            reason = getattr(factory, UNAVAILABLE_ATTR, None)
            record = PluginRecord(
                kind, name, source.provider, source.version, "unavailable" if reason else "ok",
                error=reason, plugin=source.plugin, summary=_first_doc_line(factory), factory=factory,
            )
            self._add(record)

    def _collect(self, source: _Source) -> list[tuple[str, str, Callable[..., Any]]]:
        """Call the plugin's own hook implementations; stage what they register."""
        unknown = [
            attr for attr in dir(source.obj)
            if attr.startswith("register_") and attr not in hookspecs.__dict__
            and self.pm.parse_hookimpl_opts(source.obj, attr) is not None
        ]
        if unknown:
            hint = did_you_mean(unknown[0], KIND_HOOKS.values())
            raise RuntimeError(f"unknown hook {unknown[0]!r}.{hint}")
        staged: list[tuple[str, str, Callable[..., Any]]] = []
        for kind, hook_name in KIND_HOOKS.items():
            caller = getattr(self.pm.hook, hook_name)
            for impl in caller.get_hookimpls():
                if impl.plugin is not source.obj:
                    continue

                def register(name: str, factory: Callable[..., Any], _kind: str = kind) -> None:
                    if not isinstance(name, str) or not name.strip():
                        raise TypeError(f"{hook_name}: name must be a non-empty string, got {name!r}")
                    if not callable(factory):
                        raise TypeError(f"{hook_name}: factory for {name!r} is not callable")
                    if any(k == _kind and n == name for k, n, _ in staged):
                        raise ValueError(f"{hook_name}: {_kind} {name!r} registered twice")
                    staged.append((_kind, name, factory))

                args = {arg: register for arg in impl.argnames}
                try:
                    impl.function(**args)
                except Exception as exc:
                    raise RuntimeError(f"hook {hook_name} raised {_describe(exc)}") from exc
        return staged

    def _add(self, record: PluginRecord) -> None:
        table = self.tables[record.kind]
        key = (record.kind, record.name)
        existing = table.get(record.name)
        if existing is None:
            table[record.name] = record
            self.records.append(record)
            return
        holders = self._conflicts.setdefault(key, [existing])
        holders.append(record)
        self.records.append(record)
        providers = " and ".join(f"{r.provider} ({r.plugin})" for r in holders)
        message = f"{record.kind} {record.name!r} is registered by both {providers}"
        for holder in holders:
            holder.status = "conflict"
            holder.error = message
        _warn(message + "; it cannot be used until one is removed (or see KDFORGE_LOAD_PLUGINS)")

    # -- lookup --------------------------------------------------------------
    def get(self, kind: str, name: str, *, key: str | None = None) -> PluginRecord:
        """The record for (kind, name), or a ``PluginError`` with did-you-mean help."""
        kind = normalize_kind(kind)
        table = self.tables[kind]
        record = table.get(name) if isinstance(name, str) else None
        if record is None:
            raise PluginError(self._unknown_message(kind, name), key=key)
        if record.status != "ok":
            raise PluginError(record.error or f"{kind} {name!r} is unavailable", key=key)
        return record


    def _unknown_message(self, kind: str, name: Any) -> str:
        """Why no plugin answers to ``name``: nothing installed provides it, and what might have."""
        usable = [n for n, r in self.tables[kind].items() if r.status == "ok"]
        message = f"unknown {kind} {name!r}: no installed plugin provides it.{did_you_mean(str(name), usable)}"
        message += f" ({valid_list(usable)})"
        if self.skipped:
            shown = ", ".join(self.skipped[:5])
            message += (f"; KDFORGE_LOAD_PLUGINS={os.environ.get('KDFORGE_LOAD_PLUGINS', '')!r} left out {shown}, "
                        f"which may provide it")
        for failed in [r for r in self.records if r.status == "failed"][:3]:
            message += f"; plugin {failed.name!r} from {failed.provider} failed to load ({failed.error}), it may have provided it"
        if not self.skipped and not any(r.status == "failed" for r in self.records):
            message += "; install the package that provides it, or check `kdforge plugins`"
        return message


UNAVAILABLE_ATTR = "__kdforge_unavailable__"


def unavailable(reason: str, summary: str = "") -> Callable[..., Any]:
    """A factory to register for a plugin whose optional dependencies are not installed.

    ``kdforge plugins`` lists it with status ``unavailable`` and ``reason`` (say, the install
    command); a recipe that uses it is a recipe error with that reason.
    """
    def factory(**_params: Any) -> Any:
        raise PluginError(reason)

    factory.__doc__ = summary or reason
    setattr(factory, UNAVAILABLE_ATTR, reason)
    return factory


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def normalize_kind(kind: str) -> str:
    """Map ``"losses"``/``"loss"`` etc. to the canonical kind, or raise ``PluginError``."""
    canonical = _KIND_ALIASES.get(str(kind).lower())
    if canonical is None:
        raise PluginError(f"unknown plugin kind {kind!r}.{did_you_mean(str(kind), KIND_HOOKS)} ({valid_list(KIND_HOOKS)})")
    return canonical


_extra_plugins: list[tuple[Any, str | None]] = []
_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _registry
    if _registry is None:
        _registry = Registry(list(_extra_plugins))
    return _registry


def reload() -> Registry:
    """Forget the loaded plugins and discover them again (e.g. after changing the env)."""
    global _registry
    _registry = None
    return get_registry()


def register_plugin(plugin: Any, name: str | None = None) -> None:
    """Register a plugin object (module, class or instance with hookimpls) without packaging it."""
    _extra_plugins.append((plugin, name))
    reload()


def unregister_plugin(plugin: Any) -> None:
    """Undo ``register_plugin`` (by object or by the name it was registered under)."""
    _extra_plugins[:] = [(p, n) for p, n in _extra_plugins if p is not plugin and n != plugin]
    reload()


def list_plugins() -> list[PluginRecord]:
    """One record per registered (kind, name), plus one per plugin that failed to load."""
    return list(get_registry().records)


def create(kind: str, name: str, **params: Any) -> Any:
    """Build the registered plugin object ``name`` of ``kind`` from ``params``.

    Params are checked against the factory's signature first (``RecipeError`` on
    unknown, missing or out-of-range values).
    """
    from .extensions import check_extension_points

    record = get_registry().get(kind, name)
    checked = check_params(record.factory, params, key=f"{record.kind} {name!r} params")
    obj = call_factory(record, checked, key=None)
    check_extension_points(obj, record.kind, f"{record.kind} {name!r}")
    return obj


def call_factory(record: PluginRecord, params: dict[str, Any], *, key: str | None) -> Any:
    """Call a plugin factory; turn its failure into a ``PluginError`` naming the plugin."""
    try:
        return record.factory(**params)
    except RecipeError as exc:
        # A factory names its own param with a leading dot (".path"): relative to where it is used.
        if key is not None and (exc.key is None or exc.key.startswith(".")):
            raise type(exc)(exc.detail, key=key + (exc.key or "")) from None
        raise
    except Exception as exc:  # noqa: BLE001 - a third-party factory may raise anything
        raise PluginError(
            f"{record.kind} {record.name!r} (from {record.provider}, plugin {record.plugin!r}) "
            f"failed to build: {_describe(exc)}",
            key=key,
        ) from exc
