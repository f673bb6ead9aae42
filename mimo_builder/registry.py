"""Names for builders and hooks: a registry filled by entry points, and allowlisted references.

A builder or hook is named in documents either by a registered short name (``mamba``) or by a
``module:attr`` reference. A reference is accepted only when its module is under an allowed
prefix, checked BEFORE anything is imported, so a document cannot make the process import
arbitrary code (``os:system`` is refused without importing ``os``).
"""

from __future__ import annotations

import functools
import importlib
from importlib.metadata import entry_points
from typing import Any, Callable

from mimo_builder.errors import ConfigError

BUILDER_GROUP = "mimo_builder.builders"
HOOK_GROUP = "mimo_builder.hooks"
DEFAULT_ALLOWED_PREFIXES = ("mimo_builder", "submodels", "graphs")

_allowed_prefixes: list[str] = list(DEFAULT_ALLOWED_PREFIXES)
_registered: dict[str, dict[str, Any]] = {BUILDER_GROUP: {}, HOOK_GROUP: {}}


def allow_modules(*prefixes: str) -> None:
    """Also accept ``module:attr`` references whose module starts with one of ``prefixes``."""
    for prefix in prefixes:
        if not prefix or ":" in prefix or prefix.startswith("."):
            raise ConfigError(f"allow_modules: {prefix!r} is not a module prefix like 'mypackage.models'")
        if prefix not in _allowed_prefixes:
            _allowed_prefixes.append(prefix)


def allowed_prefixes() -> tuple[str, ...]:
    return tuple(_allowed_prefixes)


def register_builder(name: str):
    """Class decorator: register a builder under a short name (in-process, e.g. for tests)."""
    return _register(BUILDER_GROUP, name)


def register_hook(name: str):
    """Function decorator: register a pre/post-wrap hook under a name usable in documents."""
    return _register(HOOK_GROUP, name)


def _register(group: str, name: str):
    def decorator(obj):
        existing = _registered[group].get(name)
        if existing is not None and existing is not obj:
            raise ConfigError(f"{_kind(group)} name {name!r} is already registered to {_qualname(existing)}")
        _registered[group][name] = obj
        obj.__mimo_name__ = name
        return obj

    return decorator


def registered_names(group: str = BUILDER_GROUP) -> list[str]:
    """Names known in ``group``: registered in code or installed as entry points."""
    return sorted(set(_registered[group]) | set(_installed(group)))


@functools.cache
def _installed(group: str) -> dict[str, Any]:
    """Entry points of ``group`` by name (read once: scanning package metadata is slow)."""
    return {ep.name: ep for ep in entry_points(group=group)}


def resolve_builder(ref: str, where: str = "builder") -> type:
    """The builder class named by ``ref``; it must subclass mimo_builder's ModelBuilder."""
    from mimo_builder.builder import ModelBuilder

    obj = _resolve(BUILDER_GROUP, ref, where)
    if not (isinstance(obj, type) and issubclass(obj, ModelBuilder)):
        raise ConfigError(f"{where}: {ref!r} resolves to {_qualname(obj)}, which is not a subclass of "
                          "mimo_builder.builder.ModelBuilder")
    return obj


def resolve_hook(ref: str | Callable, where: str = "hook") -> Callable:
    """The hook named by ``ref`` (a callable is returned as is)."""
    if callable(ref):
        return ref
    obj = _resolve(HOOK_GROUP, ref, where)
    if not callable(obj):
        raise ConfigError(f"{where}: {ref!r} resolves to {_qualname(obj)}, which is not callable")
    return obj


def reference_of(obj: Any) -> str:
    """The name a document uses for ``obj``: its registered name, else ``module:qualname``."""
    name = getattr(obj, "__mimo_name__", None)
    if name is not None and _registered_object(name, obj):
        return name
    return f"{obj.__module__}:{obj.__qualname__}"


def _registered_object(name: str, obj: Any) -> bool:
    return any(_registered[g].get(name) is obj for g in _registered)


def _resolve(group: str, ref: str, where: str) -> Any:
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"{where}: expected a registered name or 'module:attr', got {ref!r}")
    if ":" in ref:
        return import_reference(ref, where)
    if ref in _registered[group]:
        return _registered[group][ref]
    if ref in _installed(group):
        return _installed(group)[ref].load()
    known = ", ".join(registered_names(group)) or "(none)"
    raise ConfigError(f"{where}: unknown {_kind(group)} {ref!r}. Registered {_kind(group)}s: {known}; "
                      "or use 'module:attr' under an allowed module prefix")


def import_reference(ref: str, where: str) -> Any:
    """The object named by `module:attr` (module under an allowed prefix, checked before import)."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{where}: {ref!r} must look like 'package.module:Name'")
    if not _is_allowed(module_name):
        raise ConfigError(
            f"{where}: module {module_name!r} is not under an allowed prefix {list(_allowed_prefixes)}; "
            "nothing was imported. Call mimo_builder.registry.allow_modules('<prefix>') to trust it"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{where}: cannot import module {module_name!r}: {err}") from err
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as err:
            raise ConfigError(f"{where}: module {module_name!r} has no attribute {attr!r}") from err
    return obj


def _is_allowed(module_name: str) -> bool:
    return any(module_name == p or module_name.startswith(p + ".") for p in _allowed_prefixes)


def _kind(group: str) -> str:
    return "builder" if group == BUILDER_GROUP else "hook"


def _qualname(obj: Any) -> str:
    return getattr(obj, "__qualname__", type(obj).__qualname__)
