"""MCore's compiled ops on a machine without a GPU: compiled when first called, not at import.

MCore decorates about 36 functions with ``torch.compile`` at import, most through
``megatron.core.jit.jit_fuser`` (its fused elementwise ops). Creating those wrappers imports
dynamo, inductor and sympy: 2.7 of the 6 s that importing Megatron-Core takes on this project's
2-core machine, in every process that imports it (a command validating a document, the ranks'
fork server, a test worker). On CPU the fused ops then run eagerly anyway
(:mod:`~mimo_builder._internal.platform.compat`'s ``compiled_fusions_eager``), so that import buys
nothing.

So where no GPU device file exists, ``torch.compile`` is :func:`compile_when_called` while MCore's
package executes (:func:`compilation_deferred`, entered by the import hook in
:mod:`~mimo_builder._internal.platform.environment`): each function it decorates becomes a
:class:`CompiledWhenCalled`, which calls the real ``torch.compile`` on its first call (what the
decorator would have returned, compiled when called as it would have been), or runs the function
as written while :attr:`CompiledWhenCalled.eager` is set. ``jit_fuser``, bound then, defers the
ops decorated later too. Where a GPU device file exists nothing changes. Imports neither torch
nor MCore.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import types

GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")
"""Device files of NVIDIA, ROCm and WSL GPUs."""


def gpu_device_present() -> bool:
    """True where this machine shows a GPU device file (without asking a driver)."""
    return any(os.path.exists(path) for path in GPU_DEVICE_FILES)


class CompiledWhenCalled:
    """A function that ``torch.compile`` compiles on its first call rather than at decoration."""

    eager = False
    """Set (through the process's patches) where the ops run eagerly: CPU processes."""

    def __init__(self, function, options: dict, compile_):
        functools.update_wrapper(self, function)
        self._function, self._options, self._compile, self._compiled = function, options, compile_, None

    def __call__(self, *args, **kwargs):
        if self.eager:
            return self._function(*args, **kwargs)
        if self._compiled is None:
            self._compiled = self._compile(self._function, **self._options)
        return self._compiled(*args, **kwargs)

    def __get__(self, instance, owner=None):  # a method binds as the function it wraps would
        return self if instance is None else types.MethodType(self, instance)


def compile_when_called(compile_):
    """``compile_`` (``torch.compile``) deferred for functions, in its decorator forms
    (``@torch.compile``, ``@torch.compile(**options)``); anything else it compiles at once."""

    def deferred(model=None, **options):
        if model is None:
            return lambda function: deferred(function, **options)
        if not inspect.isfunction(model):
            return compile_(model, **options)
        return CompiledWhenCalled(model, options, compile_)

    return deferred


@contextlib.contextmanager
def compilation_deferred():
    """Inside the block ``torch.compile`` is :func:`compile_when_called`, where no GPU device file
    exists; elsewhere, and after the block, it is itself."""
    if gpu_device_present():
        yield
        return
    import torch

    real = torch.compile
    torch.compile = compile_when_called(real)
    try:
        yield
    finally:
        torch.compile = real


def compiled_at_import() -> bool:
    """True when MCore's ops were wrapped by ``torch.compile`` itself at its import (a GPU
    machine, or MCore imported before :mod:`mimo_builder`)."""
    import torch
    from megatron.core import jit

    return jit.jit_fuser is torch.compile
