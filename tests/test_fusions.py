"""MCore's torch.compile'd ops compiled when first called on a machine without a GPU
(mimo_builder/_internal/platform/fusions.py): Megatron-Core's import then skips dynamo and inductor."""

import subprocess
import sys

import pytest

from mimo_builder._internal.platform import fusions

IMPORT_THE_STACK = """
import sys, time
{before}
import mimo_builder
import torch
start = time.perf_counter()
{imports}
from megatron.core import jit
from megatron.core.fusions import fused_bias_gelu
from megatron.core.transformer.moe.router import InferenceTopKRouter
seconds = time.perf_counter() - start
print("dynamo" if "torch._dynamo" in sys.modules else "no dynamo", "inductor" if "torch._inductor" in sys.modules else "no inductor")
print("fuser", "torch.compile" if jit.jit_fuser is torch.compile else "deferred")
print("ops", type(fused_bias_gelu.bias_gelu).__name__, type(InferenceTopKRouter.__dict__["_compiled_topk_routing"].__func__).__name__)
print("seconds", round(seconds, 2), file=sys.stderr)
"""


RANK_IMPORTS = """import megatron.core, megatron.core.optimizer, megatron.core.distributed, megatron.core.dist_checkpointing
import megatron.core.models.hybrid.hybrid_model, megatron.core.ssm.mamba_layer"""


def _import_the_stack(before: str = "", imports: str = RANK_IMPORTS) -> list[str]:
    script = IMPORT_THE_STACK.format(before=before, imports=imports)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.slow
def test_megatron_core_imports_without_dynamo_where_no_gpu_is():
    lines = _import_the_stack()
    assert lines == ["no dynamo no inductor", "fuser deferred", "ops CompiledWhenCalled CompiledWhenCalled"]


@pytest.mark.slow
def test_where_a_gpu_device_file_exists_torch_compile_is_left_alone():
    before = "from mimo_builder._internal.platform import fusions\nfusions.GPU_DEVICE_FILES = ('/',)"
    lines = _import_the_stack(before, imports="import megatron.core")  # its fused ops and router among it
    assert lines[1:] == ["fuser torch.compile", "ops function function"]


class _Compiler:
    """A stand-in for torch.compile that records what it compiled and marks its results."""

    def __init__(self):
        self.compiled = []

    def __call__(self, model, **options):
        self.compiled.append((model.__name__, options))
        return lambda *args, **kwargs: ("compiled", model(*args, **kwargs))


def test_a_deferred_function_compiles_on_its_first_call_only():
    compiler = _Compiler()
    deferred = fusions.compile_when_called(compiler)

    @deferred
    def double(x):
        """Twice x."""
        return 2 * x

    @deferred(dynamic=True)
    def triple(x):
        return 3 * x

    assert compiler.compiled == [] and double.__name__ == "double" and double.__doc__ == "Twice x."
    assert double(2) == ("compiled", 4) and double(3) == ("compiled", 6) and triple(1) == ("compiled", 3)
    assert compiler.compiled == [("double", {}), ("triple", {"dynamic": True})]


def test_a_deferred_method_binds_and_eager_runs_it_as_written(monkeypatch):
    compiler = _Compiler()

    class Router:
        scale = 5

        @fusions.compile_when_called(compiler)
        def route(self, x):
            return self.scale * x

        @staticmethod
        @fusions.compile_when_called(compiler)
        def plain(x):
            return x + 1

    assert Router().route(2) == ("compiled", 10) and Router.plain(1) == ("compiled", 2)
    monkeypatch.setattr(fusions.CompiledWhenCalled, "eager", True)
    assert Router().route(2) == 10 and Router.plain(1) == 2


def test_anything_but_a_function_is_compiled_at_once():
    compiler = _Compiler()

    class Module:
        __name__ = "Module"

        def __call__(self, x):
            return x

    compiled = fusions.compile_when_called(compiler)(Module())
    assert compiler.compiled == [("Module", {})] and compiled(7) == ("compiled", 7)
