"""Names for builders and hooks: a registry filled by entry points, and allowlisted references.

A builder or hook is named in documents either by a registered short name (``mamba``) or by a
``module:attr`` reference. A reference is accepted only when its module is under an allowed
prefix, checked BEFORE anything is imported, so a document cannot make the process import
arbitrary code (``os:system`` is refused without importing ``os``). The attribute path is walked
without leaving the allowed modules: every object on it must be defined under an allowed prefix
and none may be a module, so ``mimo_builder._internal.platform.launch:os.system`` is refused too.

The state (allowed prefixes, in-code registrations, the entry points read once, who reads the
messages, extra import roots) lives in a :class:`Registry`; the module-level functions use the
active one: the process's default, or the one a :func:`using` block selects (the CLI selects its
own, which speaks ``--allow`` and imports from the current directory). A spawned rank starts with
the defaults: the prefixes and roots travel with the run (``TrainOptions``).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.machinery
import importlib.util
import sys
import types
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Callable, Iterable, Iterator, Literal

from mimo_builder._internal.errors import ConfigError
from mimo_builder._internal.kinds.contract import builder_base, builder_class_problems

BUILDER_GROUP = "mimo_builder.builders"
HOOK_GROUP = "mimo_builder.hooks"
CONFIG_GROUP = "mimo_builder.configs"
"""Installed kinds' config classes alone (read by ``mimo-builder schema`` without the builders)."""
DEFAULT_ALLOWED_PREFIXES = ("mimo_builder", "submodels", "graphs")

Audience = Literal["python", "cli"]


class Registry:
    """Allowed module prefixes, in-code registrations and installed entry points (read once).

    ``audience`` says how messages tell the reader to trust a module: ``--allow PREFIX`` for
    "cli", ``allow_modules(...)`` for "python". ``roots`` are folders an allowed top-level
    package is imported from when it is not installed (the CLI passes the current directory,
    so ``examples.my_node:MyBuilder`` works from a checkout). A new instance reads the installed
    distributions afresh on first use.
    """

    def __init__(self, prefixes: Iterable[str] = DEFAULT_ALLOWED_PREFIXES, *, audience: Audience = "python",
                 roots: Iterable[str] = ()):
        self.audience: Audience = audience
        self.prefixes: list[str] = []
        self.roots: list[str] = list(roots)
        self.registered: dict[str, dict[str, Any]] = {BUILDER_GROUP: {}, HOOK_GROUP: {}}
        self._installed: dict[str, tuple[dict[str, EntryPoint], dict[str, list[EntryPoint]]]] = {}
        self.allow(*prefixes)

    def derive(self, *, allow: Iterable[str] = (), audience: Audience | None = None,
               roots: Iterable[str] = ()) -> "Registry":
        """A copy of this registry (prefixes, registrations, roots) trusting ``allow`` too."""
        child = Registry((), audience=audience or self.audience, roots=[*self.roots, *roots])
        child.prefixes = list(self.prefixes)
        child.registered = {group: dict(names) for group, names in self.registered.items()}
        child._installed = self._installed
        child.allow(*allow)
        return child

    # --- allowlist ----------------------------------------------------------------------------

    def allow(self, *prefixes: str) -> None:
        """Also accept ``module:attr`` references whose module starts with one of ``prefixes``."""
        for prefix in prefixes:
            self._check_prefix(prefix)
            if prefix not in self.prefixes:
                self.prefixes.append(prefix)

    def allows(self, module_name: str) -> bool:
        """Whether ``module_name`` is under one of the allowed prefixes."""
        return any(module_name == p or module_name.startswith(p + ".") for p in self.prefixes)

    def add_roots(self, *folders: str) -> None:
        """Also import allowed top-level packages that are not installed from these folders."""
        self.roots.extend(f for f in folders if f not in self.roots)

    def trust_hint(self, module_name: str) -> str:
        """How the reader trusts ``module_name``, in the reader's terms (CLI or Python)."""
        top = module_name.split(".")[0]
        if self.audience == "cli":
            return f"To trust it, add --allow {top} before the command (mimo-builder --allow {top} COMMAND ...)"
        return (f"To trust it, call mimo_builder._internal.kinds.registry.allow_modules({top!r}) before loading the graph "
                f"(or Registry.allow({top!r}) on your own registry)")

    def _check_prefix(self, prefix: str) -> None:
        if not isinstance(prefix, str) or not all(part.isidentifier() for part in prefix.split(".")):
            empty = " (an empty prefix is refused: it would trust every module)" if prefix == "" else ""
            what = "--allow" if self.audience == "cli" else "allow_modules"
            raise ConfigError(f"{what}: {prefix!r} is not a module prefix like 'mypackage' or "
                              f"'mypackage.models'{empty}")

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
        """The builder class named by ``ref``; it must subclass mimo_builder's ModelBuilder and
        keep its contract (:func:`~mimo_builder._internal.kinds.contract.builder_class_problems`)."""
        obj = self._resolve(BUILDER_GROUP, ref, where)
        if not (isinstance(obj, type) and builder_base(obj) is not None):
            raise ConfigError(f"{where}: {ref!r} resolves to {describe_object(obj)}, which is not a subclass of "
                              "mimo_builder._internal.kinds.builder.ModelBuilder")
        problems = builder_class_problems(obj, ref)
        if problems:
            raise ConfigError("\n".join(f"{where}: {p}" for p in problems))
        return obj

    def resolve_hook(self, ref: str | Callable, where: str = "hook") -> Callable:
        """The hook named by ``ref`` (a callable given in Python is returned as is)."""
        if callable(ref):
            return ref
        obj = self._resolve(HOOK_GROUP, ref, where)
        if isinstance(obj, type) or not callable(obj):
            raise ConfigError(f"{where}: {ref!r} resolves to {describe_object(obj)}; a hook must be a function "
                              "taking and returning the list of model chunks")
        return obj

    def import_reference(self, ref: str, where: str) -> Any:
        """The object named by ``module:attr``: the module is checked before import, and every
        object on the attribute path must be defined under an allowed prefix (no module on it)."""
        module_name, _, attr = ref.partition(":")
        if not module_name or not attr:
            raise ConfigError(f"{where}: {ref!r} must look like 'package.module:Name'")
        if not self.allows(module_name):
            raise ConfigError(f"{where}: module {module_name!r} of {ref!r} is not under an allowed prefix "
                              f"{self.prefixes}; nothing was imported. {self.trust_hint(module_name)}")
        try:
            obj: Any = self._import(module_name)
        except ImportError as err:
            roots = f" (looked in the installed packages and {self.roots})" if self.roots else ""
            raise ConfigError(f"{where}: cannot import module {module_name!r} of {ref!r}{roots}: {err}") from err
        walked: list[str] = []
        for part in attr.split("."):
            obj = self._step(obj, part, ref, f"{module_name}:{'.'.join([*walked, part])}", where)
            walked.append(part)
        return obj

    def _import(self, module_name: str) -> types.ModuleType:
        """``module_name``, its top-level package taken from ``roots`` when it is not installed
        (only that package is loaded from there: ``sys.path`` is left as it is)."""
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            top = module_name.split(".")[0]
            if err.name != top or not self.roots:
                raise
            spec = importlib.machinery.PathFinder.find_spec(top, self.roots)
            if spec is None:
                raise
        package = importlib.util.module_from_spec(spec)
        sys.modules[top] = package
        try:
            spec.loader.exec_module(package)
        except BaseException:
            del sys.modules[top]
            raise
        return importlib.import_module(module_name)

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
            raise ConfigError(f"{where}: {ref!r}: {name} is {describe_object(found)}, which names no defining module; "
                              "a reference names a class, function or Graph")
        if not self.allows(owner):
            raise ConfigError(f"{where}: {ref!r}: {name} is defined in module {owner!r}, which is not under an "
                              f"allowed prefix {self.prefixes}. {self.trust_hint(owner)}")
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


def _read_entry_points(group: str) -> tuple[dict[str, EntryPoint], dict[str, list[EntryPoint]]]:
    """Entry points by name; a name that distributions declare with different values is a conflict."""
    points: dict[str, EntryPoint] = {}
    conflicts: dict[str, list[EntryPoint]] = {}
    for point in entry_points(group=group):
        first = points.setdefault(point.name, point)
        if first is not point and first.value != point.value:
            conflicts.setdefault(point.name, [first]).append(point)
    return points, conflicts


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


def describe_object(obj: Any) -> str:
    """How a message names ``obj``: "the class m.C", "the function m.f" or "a T"."""
    if isinstance(obj, type):
        return f"the class {obj.__module__}.{obj.__qualname__}"
    if callable(obj) and hasattr(obj, "__qualname__"):
        return f"the function {getattr(obj, '__module__', '?')}.{obj.__qualname__}"
    return f"a {type(obj).__qualname__}"


# --- the active registry: the process's default, or one a `using` block selects -----------------

_default = Registry()
_active: contextvars.ContextVar[Registry | None] = contextvars.ContextVar("mimo_builder_registry", default=None)


def default_registry() -> Registry:
    """The process's default registry (the one used outside any :func:`using` block)."""
    return _default


def active_registry() -> Registry:
    """The registry the module-level functions use: the innermost :func:`using`, else the default."""
    return _active.get() or _default


@contextlib.contextmanager
def using(registry: Registry) -> Iterator[Registry]:
    """Resolve names through ``registry`` inside the block (the CLI's registry speaks ``--allow``)."""
    token = _active.set(registry)
    try:
        yield registry
    finally:
        _active.reset(token)


def allow_modules(*prefixes: str) -> None:
    """Also accept ``module:attr`` references whose module starts with one of ``prefixes``."""
    active_registry().allow(*prefixes)


def allowed_prefixes() -> tuple[str, ...]:
    """The active registry's allowed module prefixes."""
    return tuple(active_registry().prefixes)


def import_roots() -> tuple[str, ...]:
    """Folders the active registry imports allowed, uninstalled top-level packages from."""
    return tuple(active_registry().roots)


def register_builder(name: str):
    """Class decorator: register a builder under a short name (in-process, e.g. for tests)."""
    return active_registry().register(BUILDER_GROUP, name)


def register_hook(name: str):
    """Function decorator: register a pre/post-wrap hook under a name usable in documents."""
    return active_registry().register(HOOK_GROUP, name)


def registered_names(group: str = BUILDER_GROUP) -> list[str]:
    """Every name of ``group`` the active registry knows (registered and installed)."""
    return active_registry().names(group)


def resolve_builder(ref: str, where: str = "builder") -> type:
    """The builder class ``ref`` names, through the active registry."""
    return active_registry().resolve_builder(ref, where)


def resolve_hook(ref: str | Callable, where: str = "hook") -> Callable:
    """The hook ``ref`` names, through the active registry."""
    return active_registry().resolve_hook(ref, where)


def import_reference(ref: str, where: str) -> Any:
    """The object a ``module:attr`` reference names, through the active registry."""
    return active_registry().import_reference(ref, where)


def reference_of(obj: Any) -> str:
    """The name a document uses for ``obj``, through the active registry."""
    return active_registry().reference_of(obj)
