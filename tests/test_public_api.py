"""The public surface: what users import, what the docs show, and how a moved name still imports.

Public modules: ``mimo_builder``, ``mimo_builder.kinds``, ``mimo_builder.cli``, ``submodels``
(and its kind modules), ``graphs`` and ``examples``. ``mimo_builder._internal`` is private.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PINNED = ("Graph", "Placement", "load_graph", "build", "train", "TrainOptions", "GraphSchedule", "GraphOptimizer",
          "OptimizerSettings", "launch", "GraphData", "GraphCollator", "HFTokenizer", "ByteTokenizer", "Checkpointer")
PUBLIC_MODULES = ("mimo_builder", "mimo_builder.kinds", "mimo_builder.cli", "submodels")
PACKAGES = ("mimo_builder", "submodels", "graphs")
BUILD_OUTPUT_NAMES = {"build", "dist", "site", "out"}


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_pinned_names_import_in_a_fresh_interpreter_and_torch_loads_only_when_used():
    result = _fresh(
        "import sys\n"
        "import mimo_builder\n"
        "assert 'torch' not in sys.modules and 'megatron' not in sys.modules, 'import mimo_builder loaded torch'\n"
        "from mimo_builder import Graph, Placement, load_graph, OptimizerSettings\n"
        "assert 'torch' not in sys.modules, 'declaring a graph loaded torch'\n"
        f"from mimo_builder import {', '.join(PINNED)}\n"
        "from mimo_builder._internal.assembly.walker import CompositeBuilder\n"
        "from mimo_builder._internal.runtime.schedule import GraphSchedule as Internal\n"
        "assert GraphSchedule is Internal and callable(build)\n"
        "print('ok')\n")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_every_public_name_resolves_and_is_documented(module):
    loaded = importlib.import_module(module)
    assert loaded.__all__ == sorted(set(loaded.__all__)) or module == "mimo_builder", "__all__ sorted, no repeats"
    undocumented = []
    for name in loaded.__all__:
        value = getattr(loaded, name)
        if name != "__version__" and not (getattr(value, "__doc__", None) or "").strip():
            undocumented.append(name)
    assert not undocumented, f"{module}: public names without a docstring: {undocumented}"
    assert set(dir(loaded)) >= set(loaded.__all__)


def test_pinned_names_are_public():
    import mimo_builder

    assert set(PINNED) <= set(mimo_builder.__all__)


def test_an_unknown_public_name_is_an_attribute_error():
    import mimo_builder

    with pytest.raises(AttributeError, match="has no attribute 'Grahp'"):
        mimo_builder.Grahp  # noqa: B018


def _python_sources() -> list[tuple[str, str]]:
    """(where, code) for every Python block of the README and docs pages and every example file."""
    sources = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for number, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S)):
            sources.append((f"{page.relative_to(ROOT)} python block {number + 1}", block))
    for example in sorted((ROOT / "examples").glob("*.py")):
        sources.append((str(example.relative_to(ROOT)), example.read_text()))
    return sources


def _imports(code: str) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in ``code`` (names empty for ``import module``)."""
    found = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
    return found


def _private_uses(code: str) -> list[str]:
    problems = []
    for module, names in _imports(code):
        root = module.partition(".")[0]
        if root not in ("mimo_builder", "submodels"):
            continue
        if module not in PUBLIC_MODULES and not (root == "submodels" and "._" not in module):
            problems.append(f"imports private module {module}")
            continue
        if module in PUBLIC_MODULES:
            public = set(importlib.import_module(module).__all__)
            problems += [f"{module}.{name} is not public" for name in names if name not in public]
    return problems


def test_the_readme_docs_and_examples_import_only_public_names():
    sources = _python_sources()
    assert len(sources) >= 5, "the scan found the README's and docs' Python blocks"
    problems = [f"{where}: {problem}" for where, code in sources for problem in _private_uses(code)]
    assert not problems, "\n".join(problems)


def test_the_public_name_check_sees_a_private_import():
    code = ("from mimo_builder._internal.runtime.schedule import GraphSchedule\n"
            "from mimo_builder import Graph, NotAThing\n")
    assert _private_uses(code) == ["imports private module mimo_builder._internal.runtime.schedule",
                                   "mimo_builder.NotAThing is not public"]


def test_a_moved_module_of_0_1_still_imports_with_a_warning_naming_the_public_import():
    result = _fresh(
        "import warnings\n"
        "warnings.simplefilter('error', FutureWarning)\n"
        "try:\n"
        "    from mimo_builder.runtime.schedule import GraphSchedule\n"
        "except FutureWarning as warning:\n"
        "    print('warned:', warning)\n"
        "warnings.simplefilter('ignore', FutureWarning)\n"
        "from mimo_builder.build.walker import CompositeBuilder\n"
        "import mimo_builder.kinds.builder as old_builder\n"
        "import mimo_builder\n"
        "from mimo_builder._internal.assembly import walker\n"
        "from mimo_builder._internal.kinds import builder\n"
        "assert CompositeBuilder is walker.CompositeBuilder and old_builder is builder\n"
        "assert callable(mimo_builder.build) and mimo_builder.kinds.ModelBuilder is builder.ModelBuilder\n"
        "print('same objects')\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "warned: 'mimo_builder.runtime' moved in mimo-builder 0.2 and goes in 0.3" in result.stdout
    assert "from 'mimo_builder'" in result.stdout and "same objects" in result.stdout


def test_no_package_folder_is_named_like_a_build_output():
    named = [path for package in PACKAGES for path in (ROOT / package).rglob("*")
             if path.is_dir() and path.name in BUILD_OUTPUT_NAMES]
    assert not named, f"package folders named like build outputs: {named}"


def test_no_source_file_of_the_packages_is_hidden_by_gitignore():
    if not (ROOT / ".git").exists():
        pytest.fail("not a git checkout: the .gitignore check needs one (CI runs in a fresh clone)")
    files = [str(path.relative_to(ROOT)) for package in PACKAGES for path in (ROOT / package).rglob("*")
             if path.is_file() and "__pycache__" not in path.parts]
    assert len(files) > 50
    result = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], input="\n".join(files),
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1 and not result.stdout, f"ignored by .gitignore:\n{result.stdout}"


def test_version_comes_from_pyproject():
    wanted = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    result = subprocess.run([sys.executable, "-m", "mimo_builder.cli", "--version"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"mimo-builder {wanted}", result.stdout + result.stderr
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{wanted}]" in changelog, "CHANGELOG.md has a section for the current version"


_CONSOLE = """
import atexit, sys
class Teardown:
    def __del__(self):
        print("modules torn down")
KEEP = Teardown()
atexit.register(lambda: print("exit handlers ran"))
sys.argv = ["mimo-builder", "validate", {doc!r}]
from mimo_builder.cli import console
console()
"""


@pytest.mark.parametrize("doc, code", [("graphs/mamba_lm.yaml", 0), ("missing.yaml", 2)])
def test_the_console_script_flushes_runs_exit_handlers_and_skips_module_teardown(tmp_path, doc, code):
    """``console()`` ends the process with the command's code after its output (to a file: block
    buffered) and the exit handlers, without the module teardown that follows a plain exit."""
    out = tmp_path / "out.txt"
    with out.open("w") as stream:
        result = subprocess.run([sys.executable, "-c", _CONSOLE.format(doc=doc)], stdout=stream,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=300)
    text = out.read_text()
    assert result.returncode == code, result.stderr
    assert text.rstrip().endswith("exit handlers ran") and "modules torn down" not in text, text
    assert ("valid" in text) if code == 0 else ("missing.yaml" in result.stderr), text + result.stderr
