"""Every module of the project imports on a CPU-only machine, and the import rules hold."""

import ast
import importlib
import pathlib
import pkgutil

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("mimo_builder", "submodels", "graphs")


def _modules():
    for package in PACKAGES:
        yield package
        pkg = importlib.import_module(package)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."):
            yield info.name


@pytest.mark.parametrize("module", sorted(_modules()))
def test_module_imports(module):
    importlib.import_module(module)


def _imported_roots(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


# Direction of imports: graphs -> submodels -> mimo_builder -> megatron/torch. Never back.
FORBIDDEN = {"mimo_builder": {"submodels", "graphs"}, "submodels": {"graphs"}}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_only_point_downwards(package):
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_roots(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
        if _imported_roots(path) & FORBIDDEN[package]
    }
    assert not offenders, f"{package}/ must not import {sorted(FORBIDDEN[package])}: {offenders}"


def test_no_mcore_or_cuda_patching_outside_the_fence():
    """Assignments to torch.cuda.* or megatron.* attributes live only in mimo_builder/_internal/platform/compat.py,
    and ``setattr`` only in the patch mechanism (mimo_builder/_internal/platform/patching.py), which keeps
    the originals: every patch goes through them and can be undone."""
    offenders = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                targets = node.targets if isinstance(node, ast.Assign) and path.name != "compat.py" else []
                for target in targets:
                    if isinstance(target, ast.Attribute) and _is_foreign(target.value):
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
                if (isinstance(node, ast.Call) and ast.unparse(node.func) == "setattr"
                        and path.name != "patching.py"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} setattr")
    assert not offenders, f"patching outside the fence: {offenders}"


def _is_foreign(node) -> bool:
    """True for expressions like torch.cuda or an imported megatron module object."""
    text = ast.unparse(node)
    return text.startswith(("torch.cuda", "megatron", "mcore_", "parallel_state"))


def test_importing_the_library_prints_nothing():
    """MCore announces missing optional packages (TE, Apex, absl) and torch a missing CUDA
    runtime at import; the package hides exactly those, so a user's import is silent."""
    import subprocess
    import sys

    code = "import " + ", ".join(sorted(_modules()))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == "", result.stdout + result.stderr


_SHARDED_TENSOR_CALL = """
import contextlib
{quiet}
from torch.distributed._shard.sharded_tensor.api import ShardedTensor
with contextlib.suppress(Exception):
    ShardedTensor.reshard(None, None)  # deprecated: warns first (dist_checkpointing's loads reach such calls)
"""


def test_a_checkpoint_loads_sharded_tensor_deprecation_is_hidden():
    """Every checkpoint load goes through torch's deprecated ShardedTensor; ranks hide that notice."""
    import subprocess
    import sys

    quiet = "from mimo_builder._internal.platform.environment import quiet_dependency_warnings\n" \
            "quiet_dependency_warnings()"
    said = {name: subprocess.run([sys.executable, "-c", _SHARDED_TENSOR_CALL.format(quiet=code)], cwd=ROOT,
                                 capture_output=True, text=True, timeout=300).stderr
            for name, code in (("plain", ""), ("quiet", quiet))}
    assert "deprecating ShardedTensor" in said["plain"], said  # the call does warn
    assert said["quiet"] == "", said


# --- no import circle, at any depth ------------------------------------------------------------

def _module_files() -> dict[str, pathlib.Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    return {id(n) for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}


def _imports(name: str, path: pathlib.Path, modules: dict) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (inside functions too; not under
    TYPE_CHECKING). ``from package import submodule`` counts as the submodule alone."""
    tree = ast.parse(path.read_text())
    skip, out = _type_checking_nodes(tree), set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            submodules = {f"{base}.{alias.name}" for alias in node.names} & modules.keys()
            out.update(submodules if len(submodules) == len(node.names) else {base, *submodules})
    return {_owner(target, modules) for target in out} - {None, name}


def _owner(target: str, modules: dict) -> str | None:
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def test_no_module_imports_itself_through_others():
    """Every import counts, also one inside a function: a deferred import is a circle with the
    lights off. A circle is listed with its modules."""
    import networkx as nx

    modules = _module_files()
    graph = nx.DiGraph((name, target) for name, path in modules.items() for target in _imports(name, path, modules))
    circles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not circles, f"import circles: {circles}"


def test_the_circle_check_sees_a_deferred_import(tmp_path, monkeypatch):
    """The check can fail: two modules that import each other, one of them inside a function."""
    import networkx as nx

    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import g\n")
    modules = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    graph = nx.DiGraph((n, t) for n, p in modules.items() for t in _imports(n, p, modules))
    assert [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1] == [["a", "b"]]


def _undocumented(path: pathlib.Path) -> list[str]:
    out = []

    def visit(node, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not child.name.startswith("_"):
                if ast.get_docstring(child) is None:
                    out.append(f"{path.relative_to(ROOT)}:{child.lineno} {prefix}{child.name}")
                if isinstance(child, ast.ClassDef):
                    visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(path.read_text()), "")
    return out


def test_every_public_function_class_and_method_has_a_docstring():
    missing = [line for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
               for line in _undocumented(path)]
    assert not missing, f"{len(missing)} without a docstring:\n" + "\n".join(missing)


FENCED = {"private.py", "compat.py", "patching.py", "preload.py"}
"""The modules allowed to touch private names of torch and Megatron-Core, each for one concern."""
FOREIGN = ("torch", "dist", "megatron", "dist_utils", "c10d", "mcore")


def _private_uses(path: pathlib.Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if ast.unparse(node.value).split(".")[0] in FOREIGN:
                out.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("torch", "megatron"):
            if "._" in node.module or any(a.name.startswith("_") for a in node.names):
                out.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module} import ...")
    return out


def test_private_torch_and_mcore_names_only_in_the_fence():
    found = [use for package in PACKAGES for path in (ROOT / package).rglob("*.py") if path.name not in FENCED
             for use in _private_uses(path)]
    assert not found, "private torch/MCore names outside mimo_builder/_internal/platform/private.py: " + ", ".join(found)


_LIGHT = """
import contextlib, io, sys
from mimo_builder.cli import main
for argv in (["--help"], ["run"], ["plan", "x.yaml", "--world-size", "0"], ["validate", "--help"]):
    try:
        main(argv)
    except SystemExit:
        pass
heavy = sorted(name for name in ("torch", "megatron", "mamba_ssm", "pydantic") if name in sys.modules)
print("help and errors:", heavy)
with contextlib.redirect_stdout(io.StringIO()) as out:
    codes = [main(["schema"]), main(["schema", "--builder", "mamba"])]
assert codes == [0, 0] and '"MambaConfig"' in out.getvalue(), codes
print("schema:", sorted(name for name in ("torch", "megatron", "mamba_ssm") if name in sys.modules))
"""


def test_help_argument_errors_and_schema_import_neither_torch_nor_megatron(tmp_path):
    """``mimo-builder --help`` (and a subcommand's) and argument errors answer before anything
    heavy is imported, and ``schema`` reads the kinds' config modules alone (entry-point group
    ``mimo_builder.configs``): the package import is light, MCore's preparation waits for MCore.
    (Run outside the repository root: an in-tree egg-info, which the GPU kit's install makes for
    a moment, would shadow the installed entry points there.)"""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _LIGHT], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-3:-1] == ["help and errors: []", "schema: []"], result.stdout + result.stderr


def test_each_installed_kinds_config_entry_point_is_its_builders_config_class():
    from mimo_builder._internal.kinds.registry import BUILDER_GROUP, CONFIG_GROUP, active_registry

    registry = active_registry()
    configs, _ = registry.installed(CONFIG_GROUP)
    assert set(configs) == set(registry.installed(BUILDER_GROUP)[0])
    for name, point in configs.items():
        assert point.load() is registry.resolve_builder(name).config_class, name


def test_mamba_ssm_is_prepared_before_the_first_megatron_import():
    """The package's import leaves mamba-ssm alone; the first MCore import prepares it, so MCore's
    Mamba mixer finds mamba-ssm's Triton modules (else it refuses to construct)."""
    import subprocess
    import sys

    code = ("import sys, mimo_builder; assert 'mamba_ssm' not in sys.modules; "
            "import megatron.core.ssm.mamba_mixer as m; print(m.HAVE_MAMBA_SSM)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "True"
