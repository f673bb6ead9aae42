"""Names for builders and hooks: a registry filled by entry points, and allowlisted references.

A builder or hook is named in documents either by a registered short name (``mamba``) or by a
``module:attr`` reference. A reference is accepted only when its module is under an allowed
prefix, checked BEFORE anything is imported, so a document cannot make the process import
arbitrary code (``os:system`` is refused without importing ``os``). The attribute path is walked
without leaving the allowed modules: every object on it must be defined under an allowed prefix
and none may be a module, so ``mimo_builder.launch:os.system`` is refused too.

The state (allowed prefixes, in-code registrations, the entry points read once) lives in a
:class:`Registry`; the module-level functions use one default instance per process. A spawned
rank starts with the defaults: the prefixes travel with the run (``TrainOptions.allowed_modules``).
"""

from __future__ import annotations

import importlib
import inspect
import types
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Callable, Iterable

from mimo_builder.errors import ConfigError

BUILDER_GROUP = "mimo_builder.builders"
HOOK_GROUP = "mimo_builder.hooks"
DEFAULT_ALLOWED_PREFIXES = ("mimo_builder", "submodels", "graphs")


class Registry:
    """Allowed module prefixes, in-code registrations and installed entry points (read once).

    A new instance reads the installed distributions afresh on first use.
    """

    def __init__(self, prefixes: Iterable[str] = DEFAULT_ALLOWED_PREFIXES):
        self.prefixes: list[str] = []
        self.registered: dict[str, dict[str, Any]] = {BUILDER_GROUP: {}, HOOK_GROUP: {}}
        self._installed: dict[str, tuple[dict[str, EntryPoint], dict[str, list[EntryPoint]]]] = {}
        self.allow(*prefixes)

    # --- allowlist ----------------------------------------------------------------------------

    def allow(self, *prefixes: str) -> None:
        """Also accept ``module:attr`` references whose module starts with one of ``prefixes``."""
        for prefix in prefixes:
            _check_prefix(prefix)
            if prefix not in self.prefixes:
                self.prefixes.append(prefix)

    def allows(self, module_name: str) -> bool:
        return any(module_name == p or module_name.startswith(p + ".") for p in self.prefixes)

    # --- names --------------------------------------------------------------------------------

    def register(self, group: str, name: str):
        """Decorator: register ``obj`` under ``name`` in ``group`` (refused if the name is taken)."""
        def decorator(obj):
            existing = self.registered[group].get(name)
            if existing is not None and existing is not obj:
                raise ConfigError(f"{_kind(group)} name {name!r} is already registered to {_qualname(existing)}")
            point = self.installed(group)[0].get(name)
            if point is not None and point.value != f"{obj.__module__}:{obj.__qualname__}":
                raise ConfigError(f"{_kind(group)} name {name!r} is already installed by distribution "
                                  f"{_dist(point)} ({point.value}); register {_qualname(obj)} under another name")
            self.registered[group][name] = obj
            obj.__mimo_name__ = name
            return obj

        return decorator

    def names(self, group: str = BUILDER_GROUP) -> list[str]:
        """Names known in ``group``: registered in code or installed as entry points."""
        return sorted(set(self.registered[group]) | set(self.installed(group)[0]))

    def installed(self, group: str) -> tuple[dict[str, EntryPoint], dict[str, list[EntryPoint]]]:
        """``group``'s entry points by name, and the names that several distributions declare."""
        if group not in self._installed:
            self._installed[group] = _read_entry_points(group)
        return self._installed[group]

    def reference_of(self, obj: Any) -> str:
        """The name a document uses for ``obj``: its registered name, else ``module:qualname``."""
        name = getattr(obj, "__mimo_name__", None)
        if name is not None and any(names.get(name) is obj for names in self.registered.values()):
            return name
        return f"{obj.__module__}:{obj.__qualname__}"

    # --- resolution ---------------------------------------------------------------------------

    def resolve_builder(self, ref: str, where: str = "builder") -> type:
        """The builder class named by ``ref``; it must subclass mimo_builder's ModelBuilder."""
        from mimo_builder.builder import ModelBuilder

        obj = self._resolve(BUILDER_GROUP, ref, where)
        if not (isinstance(obj, type) and issubclass(obj, ModelBuilder)):
            raise ConfigError(f"{where}: {ref!r} resolves to {_describe(obj)}, which is not a subclass of "
                              "mimo_builder.builder.ModelBuilder")
        return obj

    def resolve_hook(self, ref: str | Callable, where: str = "hook") -> Callable:
        """The hook named by ``ref`` (a callable given in Python is returned as is)."""
        if callable(ref):
            return ref
        obj = self._resolve(HOOK_GROUP, ref, where)
        if isinstance(obj, type) or not callable(obj):
            raise ConfigError(f"{where}: {ref!r} resolves to {_describe(obj)}; a hook must be a function "
                              "taking and returning the list of model chunks")
        return obj

    def resolve_graph(self, ref: str, where: str = "graph"):
        """The Graph named by ``module:attr``: a Graph, or a function called without arguments
        that returns one (both defined under an allowed prefix)."""
        from mimo_builder.graph import Graph

        obj = self.import_reference(ref, where)
        if isinstance(obj, Graph):
            return obj
        if not (inspect.isfunction(obj) or inspect.ismethod(obj)):
            raise ConfigError(f"{where}: {ref!r} is {_describe(obj)}, not a mimo_builder.graph.Graph "
                              "or a function returning one")
        signature = inspect.signature(obj)
        if not _may_return(signature.return_annotation, Graph):
            raise ConfigError(f"{where}: {ref!r} is annotated to return "
                              f"{inspect.formatannotation(signature.return_annotation)}, "
                              "not a mimo_builder.graph.Graph; it was not called")
        try:
            signature.bind()
        except TypeError as err:
            raise ConfigError(f"{where}: {ref!r} must be callable without arguments to return a Graph: {err}") from err
        graph = obj()
        if not isinstance(graph, Graph):
            raise ConfigError(f"{where}: {ref!r} returned {_describe(graph)}, not a mimo_builder.graph.Graph")
        return graph

    def import_reference(self, ref: str, where: str) -> Any:
        """The object named by ``module:attr``: the module is checked before import, and every
        object on the attribute path must be defined under an allowed prefix (no module on it)."""
        module_name, _, attr = ref.partition(":")
        if not module_name or not attr:
            raise ConfigError(f"{where}: {ref!r} must look like 'package.module:Name'")
        if not self.allows(module_name):
            raise ConfigError(f"{where}: module {module_name!r} of {ref!r} is not under an allowed prefix "
                              f"{self.prefixes}; nothing was imported. {_trust_hint(module_name)}")
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError as err:
            raise ConfigError(f"{where}: cannot import module {module_name!r} of {ref!r}: {err}") from err
        walked: list[str] = []
        for part in attr.split("."):
            obj = self._step(obj, part, ref, f"{module_name}:{'.'.join([*walked, part])}", where)
            walked.append(part)
        return obj

    def _step(self, obj: Any, part: str, ref: str, name: str, where: str) -> Any:
        """``obj.part`` (called ``name``), refused unless defined under an allowed prefix and not a module."""
        if part.startswith("__"):
            raise ConfigError(f"{where}: {ref!r}: the attribute path does not follow dunder names ({part!r})")
        try:
            found = getattr(obj, part)
        except AttributeError as err:
            raise ConfigError(f"{where}: {ref!r}: {name} does not exist") from err
        if isinstance(found, types.ModuleType):
            raise ConfigError(f"{where}: {ref!r}: {name} is the module {found.__name__!r}; a reference names "
                              "an object defined in the module before ':' and does not walk into other modules")
        owner = getattr(found, "__module__", None)
        if not isinstance(owner, str):
            raise ConfigError(f"{where}: {ref!r}: {name} is {_describe(found)}, which names no defining module; "
                              "a reference names a class, function or Graph")
        if not self.allows(owner):
            raise ConfigError(f"{where}: {ref!r}: {name} is defined in module {owner!r}, which is not under an "
                              f"allowed prefix {self.prefixes}. {_trust_hint(owner)}")
        return found

    def _resolve(self, group: str, ref: str, where: str) -> Any:
        if not isinstance(ref, str) or not ref:
            raise ConfigError(f"{where}: expected a registered name or 'module:attr', got {ref!r}")
        if ":" in ref:
            return self.import_reference(ref, where)
        if ref in self.registered[group]:
            return self.registered[group][ref]
        points, conflicts = self.installed(group)
        if ref in conflicts:
            declared = " and ".join(f"{_dist(p)} ({p.value})" for p in conflicts[ref])
            raise ConfigError(f"{where}: {_kind(group)} name {ref!r} is declared by several installed "
                              f"distributions: {declared}; uninstall one, or name the class as 'module:attr'")
        if ref in points:
            return _load(points[ref], where)
        known = ", ".join(self.names(group)) or "(none)"
        raise ConfigError(f"{where}: unknown {_kind(group)} {ref!r}. Registered {_kind(group)}s: {known}; "
                          "or use 'module:attr' under an allowed module prefix")


def _check_prefix(prefix: str) -> None:
    if not isinstance(prefix, str) or not all(part.isidentifier() for part in prefix.split(".")):
        empty = " (an empty prefix is refused: it would trust every module)" if prefix == "" else ""
        raise ConfigError(f"--allow / allow_modules: {prefix!r} is not a module prefix like 'mypackage' or "
                          f"'mypackage.models'{empty}")


def _trust_hint(module_name: str) -> str:
    top = module_name.split(".")[0]
    return (f"To trust it: --allow {top} on the command line, or "
            f"mimo_builder.registry.allow_modules({top!r}) in Python")


def _read_entry_points(group: str) -> tuple[dict[str, EntryPoint], dict[str, list[EntryPoint]]]:
    """Entry points by name; a name that distributions declare with different values is a conflict."""
    points: dict[str, EntryPoint] = {}
    conflicts: dict[str, list[EntryPoint]] = {}
    for point in entry_points(group=group):
        first = points.setdefault(point.name, point)
        if first is not point and first.value != point.value:
            conflicts.setdefault(point.name, [first]).append(point)
    return points, conflicts


def _may_return(annotation: Any, cls: type) -> bool:
    """False when a return annotation rules out ``cls`` (a string annotation is matched by name)."""
    if annotation is inspect.Signature.empty:
        return True
    if isinstance(annotation, str):
        return annotation.rsplit(".", 1)[-1] == cls.__name__
    return isinstance(annotation, type) and issubclass(annotation, cls)


def _load(point: EntryPoint, where: str) -> Any:
    try:
        return point.load()
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{where}: entry point {point.name!r} = {point.value!r} of distribution "
                          f"{_dist(point)} cannot be loaded: {err}") from err


def _dist(point: EntryPoint) -> str:
    dist = getattr(point, "dist", None)
    return repr(dist.name) if dist is not None else "(unknown)"


def _kind(group: str) -> str:
    return "builder" if group == BUILDER_GROUP else "hook"


def _qualname(obj: Any) -> str:
    return getattr(obj, "__qualname__", type(obj).__qualname__)


def _describe(obj: Any) -> str:
    if isinstance(obj, type):
        return f"the class {obj.__module__}.{obj.__qualname__}"
    if callable(obj) and hasattr(obj, "__qualname__"):
        return f"the function {getattr(obj, '__module__', '?')}.{obj.__qualname__}"
    return f"a {type(obj).__qualname__}"


# --- the process's default registry ---------------------------------------------------------

_default = Registry()
_allowed_prefixes = _default.prefixes  # the default registry's list (tests restore it in place)


def default_registry() -> Registry:
    return _default


def allow_modules(*prefixes: str) -> None:
    """Also accept ``module:attr`` references whose module starts with one of ``prefixes``."""
    _default.allow(*prefixes)


def allowed_prefixes() -> tuple[str, ...]:
    return tuple(_default.prefixes)


def register_builder(name: str):
    """Class decorator: register a builder under a short name (in-process, e.g. for tests)."""
    return _default.register(BUILDER_GROUP, name)


def register_hook(name: str):
    """Function decorator: register a pre/post-wrap hook under a name usable in documents."""
    return _default.register(HOOK_GROUP, name)


def registered_names(group: str = BUILDER_GROUP) -> list[str]:
    return _default.names(group)


def resolve_builder(ref: str, where: str = "builder") -> type:
    return _default.resolve_builder(ref, where)


def resolve_hook(ref: str | Callable, where: str = "hook") -> Callable:
    return _default.resolve_hook(ref, where)


def resolve_graph(ref: str, where: str = "graph"):
    return _default.resolve_graph(ref, where)


def import_reference(ref: str, where: str) -> Any:
    return _default.import_reference(ref, where)


def reference_of(obj: Any) -> str:
    return _default.reference_of(obj)
