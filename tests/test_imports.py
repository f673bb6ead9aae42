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


def test_no_mcore_or_cuda_patching_outside_compat():
    """Assignments to torch.cuda.* or megatron.* attributes live only in mimo_builder/platform/compat.py."""
    offenders = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if path.name in {"compat.py", "mamba_kernels.py"}:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                targets = node.targets if isinstance(node, ast.Assign) else []
                for target in targets:
                    if isinstance(target, ast.Attribute) and _is_foreign(target.value):
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"patching outside compat.py: {offenders}"


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
