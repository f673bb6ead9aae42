"""References to builders, hooks and graphs: the allowlist holds along the attribute path, names
from two installed distributions are a conflict, and ``--allow`` reaches the spawned ranks."""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import yaml

from cli_in_process import main_in_process
from mimo_builder._internal.kinds import registry
from mimo_builder._internal.errors import ConfigError, GraphError
from mimo_builder._internal.kinds.registry import BUILDER_GROUP, Registry

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLI = pathlib.Path(sys.executable).parent / "mimo-builder"


def _cli(*args, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([str(CLI), *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def _module(tmp_path, name, source) -> str:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    return name


# --- the attribute path stays inside the allowed modules ------------------------------------

@pytest.mark.parametrize("ref,module", [("mimo_builder._internal.platform.launch:os.system", "os"),
                                        ("mimo_builder._internal.platform.launch:os.abort", "os"),
                                        ("mimo_builder._internal.kinds.registry:importlib.import_module", "importlib"),
                                        ("mimo_builder._internal.platform.launch:dist.init_process_group", "torch.distributed")])
def test_a_path_into_another_module_is_refused(ref, module):
    where = "node 'lm' hooks.post_wrap[0]"
    with pytest.raises(ConfigError) as err:
        Registry().resolve_hook(ref, where=where)
    message = str(err.value)
    assert message.startswith(f"{where}: {ref!r}") and f"is the module {module!r}" in message, message


@pytest.mark.parametrize("ref,owner", [("mimo_builder._internal.kinds.registry:entry_points", "importlib.metadata"),
                                       ("mimo_builder._internal.platform.launch:pickle", None),
                                       ("graphs.vlm:Placement", None)])
def test_only_objects_defined_under_an_allowed_prefix_resolve(ref, owner):
    """entry_points is imported into registry.py but defined in importlib.metadata; Placement is
    imported into graphs.vlm and defined in mimo_builder._internal.document.graph, which is allowed."""
    reg = Registry()
    if owner is None and ref.endswith("Placement"):
        from mimo_builder._internal.document.graph import Placement

        assert reg.import_reference(ref, where="x") is Placement
        return
    with pytest.raises(ConfigError) as err:
        reg.import_reference(ref, where="x")
    if owner:
        top = owner.split(".")[0]
        assert f"defined in module {owner!r}" in str(err.value)
        assert f"allow_modules({top!r})" in str(err.value) and "--allow" not in str(err.value)
    else:
        assert "is the module 'pickle'" in str(err.value)


def test_dunder_names_are_not_followed():
    with pytest.raises(ConfigError, match="does not follow dunder names .'__globals__'"):
        Registry().resolve_hook("mimo_builder._internal.platform.launch:launch.__globals__", where="hook")


def _hooked_mamba_lm(hook: str) -> str:
    doc = yaml.safe_load((ROOT / "graphs/mamba_lm.yaml").read_text())
    doc["nodes"]["lm"]["hooks"] = {"post_wrap": [hook]}
    return yaml.safe_dump(doc)


def test_a_document_hook_walking_into_os_names_node_and_field():
    from mimo_builder._internal.document.graph import Graph
    from mimo_builder._internal.validation import validate_graph

    with pytest.raises(GraphError) as err:
        validate_graph(Graph.from_yaml(_hooked_mamba_lm("mimo_builder._internal.platform.launch:os.system")))
    assert "node 'lm' hooks.post_wrap[0]: 'mimo_builder._internal.platform.launch:os.system'" in str(err.value)


@pytest.mark.parametrize("audience,hint,not_hint", [
    ("python", "mimo_builder._internal.kinds.registry.allow_modules('mark_on_import')", "--allow"),
    ("cli", "--allow mark_on_import", "allow_modules")])
def test_a_refused_module_says_how_to_trust_it_in_the_readers_terms(audience, hint, not_hint):
    with pytest.raises(ConfigError) as err:
        Registry(audience=audience).resolve_builder("mark_on_import.sub:Thing", where="nodes.enc.builder")
    message = str(err.value)
    assert "nodes.enc.builder: module 'mark_on_import.sub'" in message and "nothing was imported" in message
    assert hint in message and not_hint not in message


# --- the right kind of object -----------------------------------------------------------------

@pytest.mark.parametrize("ref,why", [("graphs.vlm:vlm", "not a subclass of mimo_builder._internal.kinds.builder.ModelBuilder"),
                                     ("mimo_builder._internal.document.graph:Graph", "not a subclass")])
def test_a_builder_reference_must_be_a_builder_class(ref, why):
    with pytest.raises(ConfigError, match=why):
        Registry().resolve_builder(ref, where="nodes.lm.builder")


def test_a_hook_reference_must_be_a_function():
    with pytest.raises(ConfigError, match="the class mimo_builder._internal.platform.launch.RankError; a hook must be a function"):
        Registry().resolve_hook("mimo_builder._internal.platform.launch:RankError", where="hook")


def test_graph_references_check_kind_before_and_after_calling(tmp_path, monkeypatch):
    from mimo_builder._internal.document.graph import Graph

    monkeypatch.syspath_prepend(str(tmp_path))
    name = _module(tmp_path, "ref_graphs", """
        from graphs.mamba_lm import mamba_lm
        CALLS = []
        def not_a_graph():
            CALLS.append(1)
            return 42
        def needs(arg):
            return mamba_lm()
        GRAPH = mamba_lm()
    """)
    from mimo_builder._internal.kinds.loading import resolve_graph

    reg = Registry([*registry.DEFAULT_ALLOWED_PREFIXES, name])
    with registry.using(reg):
        assert isinstance(resolve_graph("graphs.vlm:vlm"), Graph)
        assert isinstance(resolve_graph(f"{name}:GRAPH"), Graph)
    for ref, why in [("graphs.parts:vision", "annotated to return submodels.vision_config.VisionConfig"),
                     ("mimo_builder.cli:main", "annotated to return 'int'"),
                     ("mimo_builder._internal.platform.launch:RankError", "is the class mimo_builder._internal.platform.launch.RankError"),
                     (f"{name}:needs", "callable without arguments"),
                     (f"{name}:not_a_graph", "returned a int, not a mimo_builder._internal.document.graph.Graph")]:
        with pytest.raises(ConfigError, match=why), registry.using(reg):
            resolve_graph(ref)
    assert sys.modules[name].CALLS == [1]  # only the unannotated zero-argument function was called


def test_the_cli_refuses_a_graph_file_reaching_into_os():
    """``os.abort`` was called and killed the process (exit -6) before."""
    result = _cli("validate", "mimo_builder._internal.platform.launch:os.abort")
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "'mimo_builder._internal.platform.launch:os.abort'" in result.stderr and "the module 'os'" in result.stderr


# --- installed names: a second distribution cannot shadow one -------------------------------

def _distribution(root, name, entries: dict[str, str]) -> None:
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entries.items())
    (info / "entry_points.txt").write_text(f"[{BUILDER_GROUP}]\n{lines}")


def test_a_builder_name_declared_by_two_distributions_is_an_error(tmp_path, monkeypatch):
    assert Registry().resolve_builder("mamba").__name__ == "MambaBuilder"  # before the second one
    _distribution(tmp_path, "shadow-builders", {"mamba": "shadow_builders:Mamba", "extra": "shadow_builders:Extra"})
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    with pytest.raises(ConfigError) as err:
        reg.resolve_builder("mamba", where="nodes.lm.builder")
    message = str(err.value)
    assert message.startswith("nodes.lm.builder: builder name 'mamba' is declared by several installed")
    assert "'shadow-builders' (shadow_builders:Mamba)" in message, message
    assert "'mimo-builder' (submodels.mamba:MambaBuilder)" in message, message
    assert "shadow_builders" not in sys.modules  # nothing was loaded
    assert reg.resolve_builder("gpt").__name__ == "GPTBuilder"  # other names are unaffected
    assert {"mamba", "extra", "gpt"} <= set(reg.names())


def test_the_same_entry_point_from_two_distributions_is_no_conflict(tmp_path, monkeypatch):
    _distribution(tmp_path, "mimo-twin", {"mamba": "submodels.mamba:MambaBuilder"})
    monkeypatch.syspath_prepend(str(tmp_path))
    assert Registry().resolve_builder("mamba").__name__ == "MambaBuilder"


def test_registering_an_installed_name_in_code_is_refused():
    reg = Registry()

    class Local:
        pass

    with pytest.raises(ConfigError, match="builder name 'gpt' is already installed by distribution 'mimo-builder'"):
        reg.register(BUILDER_GROUP, "gpt")(Local)
    assert reg.register(BUILDER_GROUP, "local")(Local) is Local


# --- the allowlist --------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["", "a..b", ".rel", "pkg:attr", "1pkg"])
def test_malformed_prefixes_are_refused(prefix):
    with pytest.raises(ConfigError) as err:
        Registry().allow(prefix)
    assert f"allow_modules: {prefix!r} is not a module prefix" in str(err.value)


def test_registries_do_not_share_their_allowlist():
    a, b = Registry(), Registry()
    a.allow("mark_on_import")
    assert a.allows("mark_on_import.sub") and not b.allows("mark_on_import")
    assert not registry.default_registry().allows("mark_on_import")


HOOK = """
    import os
    import torch.distributed as dist

    def mark(chunks):
        open(os.path.join(os.environ["MIMO_TEST_MARKS"], f"rank{dist.get_rank()}"), "w").close()
        return chunks
"""


def test_allowed_prefixes_reach_the_spawned_ranks(tmp_path):
    """A hook under ``--allow`` passes validation in the CLI and runs on both spawned ranks."""
    module = _module(tmp_path, "mimo_ref_hooks", HOOK)
    path = tmp_path / "hooked.yaml"
    path.write_text(_hooked_mamba_lm(f"{module}:mark"))
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "MIMO_TEST_MARKS": str(marks)}

    refused = main_in_process("validate", str(path))  # refused before anything is imported
    assert refused.returncode == 2 and f"--allow {module}" in refused.stderr, refused.stderr[-2000:]
    result = _cli("--allow", module, "run", str(path), "--nproc", "2", "--steps", "1", "--batch-size", "2", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in marks.iterdir()) == ["rank0", "rank1"]
