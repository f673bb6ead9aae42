"""mamba-ssm's fused conv + scan (``mamba_split_conv1d_scan_combined``, MCore's Mamba training
path, with causal-conv1d's CUDA kernels) against the project's CPU stand-in
(:func:`submodels.mamba_split_scan.split_conv1d_scan`) on the same CUDA inputs.

This is the path the GPU benchmark trains through once causal-conv1d is installed (the kit
builds it: ``scripts/build_causal_conv1d.py``); it is also the only path that takes packed rows
(``seq_idx``). Tolerances and the error measure are those of ``test_kernels_gpu.py``.
"""

import os

os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")  # as in test_kernels_gpu.py

from submodels import mamba_kernels  # noqa: F401  isort: skip  (mamba_ssm.ops.triton importable)

import pytest
import torch
from cuda_cases import needs_causal_conv1d
from test_kernels_gpu import GRAD_FACTOR, TOL, backward, check, twin

from submodels.mamba_split_scan import split_conv1d_scan

pytestmark = [pytest.mark.gpu, needs_causal_conv1d()]

HEADS, HEADDIM, GROUPS, STATE, WIDTH = 8, 32, 2, 32, 4
GRADS = ("zxbcdt", "conv1d_weight", "conv1d_bias", "dt_bias", "A", "D", "rmsnorm_weight")


def fused_inputs(dtype, *, b=2, l=256, norm=True):
    """The mixer's call: zxbcdt in ``dtype``, conv weight [d, w], parameters in fp32."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    dim, conv_dim = HEADS * HEADDIM, HEADS * HEADDIM + 2 * GROUPS * STATE

    def rnd(*shape, scale=1.0, dt=torch.float32):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dt)

    t = {"zxbcdt": rnd(b, l, 2 * dim + 2 * GROUPS * STATE + HEADS, dt=dtype),
         "conv1d_weight": rnd(conv_dim, WIDTH, scale=0.5, dt=dtype), "conv1d_bias": rnd(conv_dim, scale=0.1, dt=dtype),
         "dt_bias": rnd(HEADS, scale=0.5) - 1.0, "A": -torch.exp(rnd(HEADS, scale=0.5)), "D": rnd(HEADS),
         "rmsnorm_weight": 1 + 0.1 * rnd(dim) if norm else None}
    return {k: None if v is None else v.requires_grad_() for k, v in t.items()}


def packed_rows(b: int, l: int) -> torch.Tensor:
    """seq_idx [b, l]: three sequences in the first row, one in the second."""
    seq_idx = torch.zeros(b, l, dtype=torch.int32, device="cuda")
    seq_idx[0, l // 3:] = 1
    seq_idx[0, 2 * l // 3:] = 2
    return seq_idx


CASES = {  # name -> (dtype, packed, gated norm)
    "fp32": (torch.float32, False, True),
    "bf16": (torch.bfloat16, False, True),
    "fp32_packed": (torch.float32, True, True),
    "bf16_packed_gate_only": (torch.bfloat16, True, False),
}


@pytest.mark.parametrize("case", CASES)
def test_fused_conv_scan_matches_the_cpu_stand_in(case, record_property):
    from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined

    dtype, packed, norm = CASES[case]
    ours_in = fused_inputs(dtype, norm=norm)
    fused_in = twin(ours_in)
    b, l = ours_in["zxbcdt"].shape[:2]
    kwargs = dict(chunk_size=64, seq_idx=packed_rows(b, l) if packed else None, activation="silu",
                  headdim=HEADDIM, ngroups=GROUPS, norm_before_gate=False)
    y_ours = split_conv1d_scan(**ours_in, **kwargs)
    y_fused = mamba_split_conv1d_scan_combined(**fused_in, **kwargs)
    assert y_fused.dtype == y_ours.dtype == dtype
    check(record_property, y_fused, y_ours, TOL[dtype], "y")
    names = [k for k in GRADS if ours_in[k] is not None]
    g_ours = backward([y_ours], [ours_in[k] for k in names], dtype)
    g_fused = backward([y_fused], [fused_in[k] for k in names], dtype)
    for name, a, b_ in zip(names, g_fused, g_ours):
        check(record_property, a, b_, GRAD_FACTOR * TOL[dtype], f"grad {name}")
