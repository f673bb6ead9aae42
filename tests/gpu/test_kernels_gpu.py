"""mamba-ssm's Triton kernels against the project's pure-torch kernels, on the same CUDA inputs.

The CPU stand-ins of ``submodels/mamba_kernels.py`` are what MCore's MambaMixer runs on CPU;
on a GPU it runs mamba-ssm's Triton SSD scan and gated RMSNorm. Both must compute the same
outputs and gradients: errors are ``max |triton - ours| / max |ours|``, at most 1e-3 in fp32
and 1e-2 in bf16, three times that for gradients (longer
chains; in bf16 mamba-ssm also keeps the chunk states in bf16). Every error is recorded as a
junit property (``scripts/gpu-check`` keeps junit.xml), so a passing run shows its margins too.
"""

import os

# Triton computes fp32 dots in TF32 unless told otherwise; the CPU kernels are IEEE fp32. With
# TF32 the fp32 scan differed by 1.5e-3 (H100, 2026-11-27); with IEEE it is within 1e-3.
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

# Importing the project's kernels first makes mamba_ssm.ops.triton.* importable without
# mamba-ssm's CUDA extension (see submodels/mamba_kernels.py).
from submodels import mamba_kernels as mk  # isort: skip

import pytest
import torch
from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (Triton kernels)")]

TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2}
GRAD_FACTOR = 3
SCAN_GRADS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


def rel_err(got, want) -> float:
    got, want = got.detach().float(), want.detach().float()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def check(record, got, want, tol, what):
    err = rel_err(got, want)
    record(what, f"{err:.3e}")
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def scan_inputs(dtype, softplus, *, l=256, D="h", z=True, dt_bias=True, init=True, b=2, h=8, p=32, g=2, n=32):
    """Leaf CUDA tensors; activations in ``dtype``, parameters and states in fp32 (as in the mixer).
    dt is positive (0.1 .. 1) after the kernel's softplus, or already without it."""
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dt)

    f32 = torch.float32
    dt = rnd(b, l, h, scale=0.5) - 1.0
    t = {"x": rnd(b, l, h, p), "dt": dt if softplus else torch.nn.functional.softplus(dt),
         "A": -torch.exp(rnd(h, scale=0.5, dt=f32)), "B": rnd(b, l, g, n), "C": rnd(b, l, g, n),
         "D": {None: None, "h": rnd(h, dt=f32), "hp": rnd(h, p, dt=f32)}[D],
         "z": rnd(b, l, h, p) if z else None,
         "dt_bias": rnd(h, scale=0.5, dt=f32) if dt_bias else None,
         "initial_states": rnd(b, h, p, n, dt=f32) if init else None}
    return {k: None if v is None else v.requires_grad_() for k, v in t.items()}


def twin(t):
    """Independent leaf copies, so each side gets its own gradients."""
    return {k: None if v is None else v.detach().clone().requires_grad_() for k, v in t.items()}


def backward(outputs, inputs, dtype, seed=1):
    """Gradients of sum(out * w) for one fixed random cotangent w per output, rounded to ``dtype``
    (so that both sides see the same w even where their output dtypes differ)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    cot = [torch.randn(o.shape, generator=gen, device="cuda").to(dtype).to(o.dtype) for o in outputs]
    return torch.autograd.grad(outputs, inputs, cot)


SCAN_CASES = {  # name -> (dtype, scan_inputs options, dt_softplus)
    "fp32_all_options": (torch.float32, {}, True),
    "bf16_all_options": (torch.bfloat16, {}, True),
    "fp32_plain_ragged": (torch.float32, dict(l=200, D="hp", z=False, dt_bias=False, init=False), False),
}


@pytest.mark.parametrize("case", SCAN_CASES)
def test_ssd_scan_matches_the_cpu_kernel(case, record_property):
    dtype, options, softplus = SCAN_CASES[case]
    ours_in = scan_inputs(dtype, softplus, **options)
    tri_in = twin(ours_in)
    kwargs = dict(chunk_size=64, dt_softplus=softplus, return_final_states=True)
    y_ours, s_ours = mk.ssd_chunk_scan(**ours_in, **kwargs)
    y_tri, s_tri = mamba_chunk_scan_combined(**tri_in, **kwargs)
    assert y_tri.dtype == y_ours.dtype == dtype
    tol = TOL[dtype]
    check(record_property, y_tri, y_ours, tol, "y")
    check(record_property, s_tri, s_ours, tol, "final state")
    names = [k for k in SCAN_GRADS if ours_in[k] is not None]
    g_ours = backward([y_ours, s_ours], [ours_in[k] for k in names], dtype)
    g_tri = backward([y_tri, s_tri], [tri_in[k] for k in names], dtype)
    for name, a, b in zip(names, g_tri, g_ours):
        check(record_property, a, b, GRAD_FACTOR * tol, f"grad {name}")


NORM_CASES = {  # name -> (dtype, gate, group_size, norm_before_gate, bias)
    "fp32_gate_before": (torch.float32, True, None, True, False),
    "fp32_gate_after_groups_bias": (torch.float32, True, 64, False, True),
    "fp32_no_gate": (torch.float32, False, None, True, False),
    "bf16_gate_groups": (torch.bfloat16, True, 64, True, False),
}


@pytest.mark.parametrize("case", NORM_CASES)
def test_gated_rms_norm_matches_the_cpu_kernel(case, record_property):
    dtype, gate, group, before, bias = NORM_CASES[case]
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, hidden = 300, 256
    t = {"x": torch.randn(rows, hidden, generator=gen, device="cuda").to(dtype),
         "weight": 1 + 0.1 * torch.randn(hidden, generator=gen, device="cuda"),
         "bias": 0.1 * torch.randn(hidden, generator=gen, device="cuda") if bias else None,
         "z": torch.randn(rows, hidden, generator=gen, device="cuda").to(dtype) if gate else None}
    ours_in = {k: None if v is None else v.requires_grad_() for k, v in t.items()}
    tri_in = twin(ours_in)
    kwargs = dict(eps=1e-5, group_size=group, norm_before_gate=before)
    out_ours = mk.gated_rms_norm(**ours_in, **kwargs)
    out_tri = rmsnorm_fn(**tri_in, **kwargs)
    assert out_tri.dtype == out_ours.dtype == dtype
    check(record_property, out_tri, out_ours, TOL[dtype], "out")
    names = [k for k in ("x", "weight", "bias", "z") if ours_in[k] is not None]
    g_ours = backward([out_ours], [ours_in[k] for k in names], dtype)
    g_tri = backward([out_tri], [tri_in[k] for k in names], dtype)
    for name, a, b in zip(names, g_tri, g_ours):
        check(record_property, a, b, GRAD_FACTOR * TOL[dtype], f"grad {name}")
