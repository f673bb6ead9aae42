"""The Python environment MCore runs in: its optional-package imports and their notices.

Not workarounds of MCore's CUDA assumptions (those are in :mod:`mimo_builder._internal.platform.compat`, which
re-exports these two for its callers).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys
import warnings


def prepare_mamba_ssm_import() -> None:
    """Attempt ``import mamba_ssm`` once, before anything imports MCore's Mamba modules.

    Without its CUDA extension, ``import mamba_ssm`` raises (its ``__init__`` imports
    ``selective_scan_cuda``), but the failed attempt leaves ``mamba_ssm.ops.triton.*`` in
    ``sys.modules``, which is all MCore's MambaMixer imports. Importing
    ``megatron.training.models`` imports that mixer, so this must run first:
    :func:`prepare_before_megatron` runs it the moment anything first imports ``megatron``.
    Without mamba-ssm installed it does nothing.

    It first asks Triton to keep autotuning results in its cache (``TRITON_CACHE_AUTOTUNING=1``
    unless set): mamba-ssm's kernels autotune on their first call, which takes minutes on a GPU,
    and Triton reads the setting when those kernels are defined, at this import.
    """
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    try:
        import mamba_ssm  # noqa: F401
    except ImportError:
        pass


class _BeforeMegatron(importlib.abc.MetaPathFinder):
    """An import finder that finds no module itself: it runs :func:`prepare_mamba_ssm_import` just
    before the first import of any ``megatron`` module, and has ``megatron.core`` execute inside
    :func:`~mimo_builder._internal.platform.fusions.compilation_deferred`; then it leaves ``sys.meta_path``."""

    prepared = False

    def find_spec(self, fullname, path=None, target=None):
        """Prepare on the first ``megatron`` import; load ``megatron.core`` through :class:`_CompilationDeferred`."""
        if fullname.partition(".")[0] != "megatron" or self not in sys.meta_path:
            return None
        if not self.prepared:
            self.prepared = True
            prepare_mamba_ssm_import()
        if fullname != "megatron.core":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _CompilationDeferred(spec.loader)
        return spec


class _CompilationDeferred(importlib.abc.Loader):
    """``megatron.core``'s own loader, executing it inside ``compilation_deferred()``."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        from mimo_builder._internal.platform.fusions import compilation_deferred

        with compilation_deferred():
            self._loader.exec_module(module)

    def __getattr__(self, name):  # get_source, get_filename, ...: the real loader's
        return getattr(self._loader, name)


def prepare_before_megatron() -> None:
    """Make sure :func:`prepare_mamba_ssm_import` runs before MCore is first imported, and MCore's
    fused ops compile when first called on a machine without a GPU, without importing anything
    now: the package's own import stays light (``mimo-builder --help`` imports neither torch nor MCore)."""
    if "megatron" in sys.modules:
        prepare_mamba_ssm_import()
    elif not any(isinstance(finder, _BeforeMegatron) for finder in sys.meta_path):
        sys.meta_path.insert(0, _BeforeMegatron())


OPTIONAL_PACKAGE_NOTICES = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"absl\.logging is not installed",
    r"Only transformer-engine>=",
)
"""Import-time notices of MCore about optional packages a CPU (or TE-less) run does not have."""


def quiet_import_notices() -> None:
    """Hide, for the package's import, exactly the notices above and torch's "No CUDA runtime"
    log line: importing the library prints nothing. Other warnings still show."""
    for notice in OPTIONAL_PACKAGE_NOTICES:
        warnings.filterwarnings("ignore", message=notice, category=UserWarning)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def quiet_dependency_warnings() -> None:
    """Hide the import-time notices of MCore and torch about optional packages (TE, Apex,
    absl, CUDA) that a CPU run does not have; errors and our own warnings still show."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron\.")
    # MCore's DDP and distributed optimizer call collectives torch has renamed
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    # torch DCP notes that MCore reads checkpoint metadata outside a process group, as intended
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed\.checkpoint")
    # dist_checkpointing loads through torch's ShardedTensor, which warns of its deprecation on every load
    warnings.filterwarnings("ignore", message="Please use DTensor instead and we are deprecating ShardedTensor",
                            category=FutureWarning)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    logging.getLogger("megatron").setLevel(logging.WARNING)  # DDP lists every parameter at INFO
    # with absl installed (tensorboard brings it), MCore's grid logs every group through it at INFO
    logging.getLogger("absl").setLevel(logging.WARNING)
    # dist_checkpointing's synchronous save runs through its deprecated async writer and says so
    logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").setLevel(logging.ERROR)
    # The unfused Mamba path is the one the CPU kernels serve; MCore warns about it on every layer.
    logging.getLogger("megatron.core.ssm.mamba_mixer").setLevel(logging.ERROR)
