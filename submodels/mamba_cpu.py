"""Installs the CPU stand-ins for mamba-ssm's kernels into MCore, for the rest of a CPU process.

MCore's ``MambaMixer`` calls mamba-ssm's Triton kernels and causal-conv1d; none runs without a GPU.
On CPU these module globals point at the project's torch implementations instead (through
``compat.replace_for_process``, which keeps the originals), and this module is the only place in
the project that points them:

* ``megatron.core.ssm.mamba_mixer.mamba_chunk_scan_combined`` -> :func:`~submodels.mamba_kernels.ssd_chunk_scan`
* ``megatron.core.ssm.mamba_mixer.causal_conv1d_fn`` -> :func:`~submodels.mamba_kernels.causal_conv1d`
* ``mamba_ssm.ops.triton.layernorm_gated.rmsnorm_fn`` -> :func:`~submodels.mamba_kernels.gated_rms_norm`
  (the gated ``RMSNorm`` module's ``forward`` calls this global)
* ``megatron.core.ssm.mamba_mixer.mamba_split_conv1d_scan_combined`` and its packing check ->
  :mod:`submodels.mamba_split_scan` (MCore's training path)
* the decode step's kernels -> :mod:`submodels.mamba_decode`

Nothing is installed when CUDA is available (unless ``force``): there the real kernels run.
"""

from __future__ import annotations

import importlib
import sys

import torch

from mimo_builder._internal.platform import compat
from submodels.mamba_decode import DECODE_REASON, decode_targets
from submodels.mamba_kernels import (
    causal_conv1d, ensure_mamba_ssm_importable, gated_rms_norm, ssd_chunk_scan,
)
from submodels.mamba_split_scan import SPLIT_SCAN_REASON, packing_supported, split_conv1d_scan

KERNELS_REASON = "MCore's MambaMixer calls mamba-ssm's Triton kernels (SSD scan, causal conv, gated RMSNorm), which need a GPU."
_MIXER = "megatron.core.ssm.mamba_mixer"
_LAYERNORM_GATED = "mamba_ssm.ops.triton.layernorm_gated"


def _targets():
    """(module, global name, replacement) for the scan, convolution and gated norm."""
    ensure_mamba_ssm_importable()
    mixer = importlib.import_module(_MIXER)
    norm = importlib.import_module(_LAYERNORM_GATED)
    return [
        (mixer, "mamba_chunk_scan_combined", ssd_chunk_scan),
        (mixer, "causal_conv1d_fn", causal_conv1d),
        (norm, "rmsnorm_fn", gated_rms_norm),
    ]


def install_cpu_kernels(force: bool = False) -> bool:
    """Point MCore's MambaMixer (and gated RMSNorm) at the CPU kernels. Idempotent.

    Does nothing and returns False when CUDA is available, unless ``force``; else True.
    """
    if torch.cuda.is_available() and not force:
        return False
    compat.replace_for_process(KERNELS_REASON, _targets())
    compat.replace_for_process(DECODE_REASON, decode_targets())
    mixer = importlib.import_module(_MIXER)
    compat.replace_for_process(SPLIT_SCAN_REASON, [
        (mixer, "mamba_split_conv1d_scan_combined", split_conv1d_scan),
        (mixer, "_check_mamba_sequence_packing_support", packing_supported),
    ])
    return True


def cpu_kernels_installed() -> bool:
    """True when the scan, convolution, gated norm and fused training kernel point at the CPU ones."""
    mixer, norm = sys.modules.get(_MIXER), sys.modules.get(_LAYERNORM_GATED)
    if mixer is None or norm is None:
        return False
    return (
        getattr(mixer, "mamba_chunk_scan_combined", None) is ssd_chunk_scan
        and getattr(mixer, "causal_conv1d_fn", None) is causal_conv1d
        and getattr(norm, "rmsnorm_fn", None) is gated_rms_norm
        and getattr(mixer, "mamba_split_conv1d_scan_combined", None) is split_conv1d_scan
    )
