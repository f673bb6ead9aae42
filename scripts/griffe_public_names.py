"""Griffe extension for the docs site (mkdocs.yml): the public names of ``mimo_builder`` and
``mimo_builder.kinds`` as griffe sees them.

Both modules load their names on first use (PEP 562, ``LazyNames``), which static analysis cannot
follow. This extension reads each module's table of public name -> private module from its source
and adds an alias per name, so ``::: mimo_builder`` in docs/api.md renders ``mimo_builder.Graph``
from the class in ``mimo_builder._internal``. It also turns the Sphinx roles of the docstrings
(``:class:`~x.Y```) into code spans.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import griffe

PUBLIC_MODULES = ("mimo_builder", "mimo_builder.kinds")
_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`(~?)([^`]+)`")


def public_table(source: Path) -> dict[str, str]:
    """``{public name: griffe path of its object}`` from the ``LazyNames(__name__, {...})`` call
    in ``source``, where values are ``_I + "module"``, ``"module:attribute"`` or ``"module:*"``."""
    tree = ast.parse(source.read_text())
    constants: dict[str, str] = {}
    table: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    constants[target.id] = node.value.value
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "LazyNames":
            names = node.args[1]
            assert isinstance(names, ast.Dict)
            for key, value in zip(names.keys, names.values):
                table[key.value] = _target(key.value, _string(value, constants))
    return table


def _string(node: ast.expr, constants: dict[str, str]) -> str:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return constants[node.id]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _string(node.left, constants) + _string(node.right, constants)
    raise ValueError(f"cannot read {ast.dump(node)} as a string")


def _target(name: str, spec: str) -> str:
    module, _, attribute = spec.partition(":")
    if attribute == "*":
        return module
    return f"{module}.{attribute or name}"


class PublicNames(griffe.Extension):
    """Adds the lazy public names as aliases; rewrites Sphinx roles in docstrings."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        if pkg.path != "mimo_builder":
            return
        for path in PUBLIC_MODULES:
            module = pkg if path == pkg.path else pkg.get_member(path.removeprefix("mimo_builder."))
            for name, target in public_table(Path(module.filepath)).items():
                module.set_member(name, griffe.Alias(name, target, parent=module))

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_code_span, obj.docstring.value)


def _code_span(match: re.Match) -> str:
    """``:class:`~a.b.C``` -> `C`; ``:mod:`a.b``` -> `a.b` (Sphinx's display rule)."""
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"
