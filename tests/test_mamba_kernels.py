"""CPU Mamba-2 kernels (submodels.mamba_kernels) against mamba-ssm's own pure-torch references.

References, all run on CPU:
* SSD scan: ``ssd_chunk_scan_combined_ref`` and its building blocks ``chunk_state_ref`` /
  ``state_passing_ref`` / ``chunk_scan_ref`` (in float64), and the per-time-step
  ``selective_scan_ref`` (computes in fp32); plus our own ``naive_sequential_scan``.
* gated RMSNorm: ``layernorm_gated.rms_norm_ref`` (float64).
* causal conv: ``torch.nn.functional.conv1d`` with groups=d and left padding (float64).
Outputs and gradients (from one shared random cotangent) must agree to 1e-5 relative.
"""

import functools
import importlib
import sys
import types

# Must come before anything from megatron.core.ssm (see the module docstring).
from submodels import mamba_kernels as mk  # isort: skip
from submodels import mamba_cpu  # noqa: E402

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from mamba_ssm.ops.triton.layernorm_gated import rms_norm_ref
from mamba_ssm.ops.triton.ssd_chunk_scan import chunk_scan_ref
from mamba_ssm.ops.triton.ssd_chunk_state import chunk_state_ref
from mamba_ssm.ops.triton.ssd_combined import ssd_chunk_scan_combined_ref
from mamba_ssm.ops.triton.ssd_state_passing import state_passing_ref

TOL = 1e-5
SCAN_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


def rel_err(a, b):
    """max |a - b| / max |b|, in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_close(got, want, what):
    err = rel_err(got, want)
    assert err <= TOL, f"{what}: relative error {err:.3e} > {TOL:.0e}"


def grads(outputs, inputs, seed):
    """Gradients of sum(out * w) for one random cotangent w per output (same for any caller)."""
    gen = torch.Generator().manual_seed(seed)
    cot = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outputs]
    return torch.autograd.grad(outputs, inputs, cot)


def scan_inputs(seed, b, l, h, p, g, n, *, D=None, z=False, dt_bias=False, init=False):
    """Random fp32 leaf tensors for a scan; D is None, 'h' or 'hp'."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    t = {
        "x": rnd(b, l, h, p),
        "dt": rnd(b, l, h, scale=0.5) - 1.0,  # softplus(dt + bias) ~ 0.1 .. 1
        "A": -torch.exp(rnd(h, scale=0.5)),
        "B": rnd(b, l, g, n),
        "C": rnd(b, l, g, n),
        "D": {None: None, "h": rnd(h), "hp": rnd(h, p)}[D],
        "z": rnd(b, l, h, p) if z else None,
        "dt_bias": rnd(h, scale=0.5) if dt_bias else None,
        "initial_states": rnd(b, h, p, n) if init else None,
    }
    return {k: (v.requires_grad_() if v is not None else None) for k, v in t.items()}


def as_f64(t):
    """Detached float64 leaf copies (None kept)."""
    return {k: None if v is None else v.detach().double().requires_grad_() for k, v in t.items()}


def present(t):
    return [k for k in SCAN_NAMES if t.get(k) is not None]


def compare_grads(ours, ref, outs_ours, outs_ref, what, seed=7):
    keys = present(ours)
    g_ours = grads(outs_ours, [ours[k] for k in keys], seed)
    g_ref = grads(outs_ref, [ref[k] for k in keys], seed)
    for k, a, b in zip(keys, g_ours, g_ref):
        assert_close(a, b, f"{what}: grad {k}")


# ----------------------------------------------------------------- mamba-ssm references


def pad_time(t, mult):
    if t is None or t.shape[1] % mult == 0:
        return t
    return F.pad(t, (0, 0) * (t.dim() - 2) + (0, -t.shape[1] % mult))


def ref_combined(t, chunk, softplus=True):
    """mamba-ssm's ssd_chunk_scan_combined_ref; inputs zero-padded to whole chunks (it asserts
    that), which by causality leaves the first l outputs unchanged."""
    l = t["x"].shape[1]
    padded = {k: pad_time(t[k], chunk) for k in ("x", "dt", "B", "C", "z")}
    out = ssd_chunk_scan_combined_ref(
        padded["x"], padded["dt"], t["A"], padded["B"], padded["C"], chunk,
        D=t["D"], z=padded["z"], dt_bias=t["dt_bias"], dt_softplus=softplus,
    )
    return out[:, :l]


def ref_blocks(t, chunk, softplus=True, dt_limit=None):
    """The same pipeline as ssd_chunk_scan_combined_ref, from mamba-ssm's chunk_state_ref /
    state_passing_ref / chunk_scan_ref, but passing initial_states and returning final states.
    dt is discretised first (clamped to dt_limit as ssd_selective_scan does) and zero-padded,
    so padding cannot decay the final state."""
    l = t["x"].shape[1]
    dt = t["dt"] + t["dt_bias"] if t["dt_bias"] is not None else t["dt"]
    dt = F.softplus(dt) if softplus else dt
    dt = dt.clamp(*dt_limit) if dt_limit else dt
    x, B, C, z, dt = (pad_time(v, chunk) for v in (t["x"], t["B"], t["C"], t["z"], dt))
    dt = rearrange(dt, "b (c l) h -> b h c l", l=chunk)
    dA_cumsum = torch.cumsum(dt * rearrange(t["A"], "h -> h 1 1"), dim=-1)
    states = chunk_state_ref(B, x, dt, dA_cumsum)
    init = t["initial_states"]
    states, final = state_passing_ref(
        rearrange(states, "... p n -> ... (p n)"), dA_cumsum[:, :, :, -1],
        initial_states=rearrange(init, "... p n -> ... (p n)") if init is not None else None,
    )
    n = B.shape[-1]
    states, final = (rearrange(s, "... (p n) -> ... p n", n=n) for s in (states, final))
    out = chunk_scan_ref(B, C, x, dt, dA_cumsum, states, D=t["D"], z=z)
    return out[:, :l], final


@functools.lru_cache(maxsize=1)
def selective_scan_ref():
    """mamba-ssm's per-step ``selective_scan_ref``. Its module imports the CUDA-only
    ``selective_scan_cuda`` at top level, so import it under a stub, then forget both again
    (``import mamba_ssm`` must keep failing exactly as before)."""
    name = "mamba_ssm.ops.selective_scan_interface"
    sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
    try:
        return importlib.import_module(name).selective_scan_ref
    finally:
        del sys.modules["selective_scan_cuda"]
        sys.modules.pop(name, None)


def ref_selective(t):
    """(out, last_state) from selective_scan_ref (no initial state support)."""
    h, p = t["x"].shape[2], t["x"].shape[3]
    n = t["B"].shape[-1]
    D = t["D"]
    if D is not None:
        D = rearrange(D, "h p -> (h p)") if D.dim() == 2 else repeat(D, "h -> (h p)", p=p)
    out, last = selective_scan_ref()(
        rearrange(t["x"], "b l h p -> b (h p) l"),
        repeat(t["dt"], "b l h -> b (h p) l", p=p),
        repeat(t["A"], "h -> (h p) n", p=p, n=n),
        rearrange(t["B"], "b l g n -> b g n l"),
        rearrange(t["C"], "b l g n -> b g n l"),
        D=D,
        z=rearrange(t["z"], "b l h p -> b (h p) l") if t["z"] is not None else None,
        delta_bias=repeat(t["dt_bias"], "h -> (h p)", p=p) if t["dt_bias"] is not None else None,
        delta_softplus=True,
        return_last_state=True,
    )
    return rearrange(out, "b (h p) l -> b l h p", p=p), rearrange(last, "b (h p) n -> b h p n", h=h)


def run_ours(t, chunk, **kw):
    return mk.ssd_chunk_scan(
        t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, D=t["D"], z=t["z"],
        dt_bias=t["dt_bias"], initial_states=t["initial_states"], dt_softplus=True, **kw,
    )


# ----------------------------------------------------------------- SSD scan

# (b, l, h, p, g, n, chunk, D, z, dt_bias, initial_states)
SHAPES = [
    (2, 37, 4, 8, 1, 16, 16, "h", True, True, False),
    (2, 64, 4, 8, 2, 16, 32, None, False, True, False),
    (1, 130, 4, 8, 2, 16, 32, "hp", True, False, False),
    (2, 50, 4, 8, 4, 16, 16, "h", False, False, False),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"b{s[0]}-l{s[1]}-g{s[4]}-c{s[6]}")
def test_ssd_matches_combined_ref(shape):
    b, l, h, p, g, n, chunk, D, z, bias, _ = shape
    t = scan_inputs(l, b, l, h, p, g, n, D=D, z=z, dt_bias=bias)
    r = as_f64(t)
    y, y_ref = run_ours(t, chunk), ref_combined(r, chunk)
    assert y.dtype == torch.float32 and y.shape == t["x"].shape
    assert_close(y, y_ref, "output")
    compare_grads(t, r, [y], [y_ref], "combined_ref")


@pytest.mark.parametrize("D,dt_limit", [(None, None), ("h", None), ("h", (0.2, 0.6))])
@pytest.mark.parametrize("l,chunk,g", [(37, 16, 2), (96, 32, 1)])
def test_ssd_initial_and_final_states_match_block_refs(l, chunk, g, D, dt_limit):
    t = scan_inputs(100 + l, 2, l, 4, 8, g, 16, D=D, z=True, dt_bias=True, init=True)
    r = as_f64(t)
    kw = {"dt_limit": dt_limit} if dt_limit else {}
    y, final = run_ours(t, chunk, return_final_states=True, **kw)
    y_ref, final_ref = ref_blocks(r, chunk, dt_limit=dt_limit)
    assert final.shape == t["initial_states"].shape and final.dtype == torch.float32
    assert_close(y, y_ref, "output")
    assert_close(final, final_ref, "final state")
    compare_grads(t, r, [y, final], [y_ref, final_ref], "block refs")


@pytest.mark.parametrize("l,chunk,g,D", [(37, 16, 2, "hp"), (80, 32, 1, "h")])
def test_ssd_matches_selective_scan_ref(l, chunk, g, D):
    t = scan_inputs(200 + l, 2, l, 4, 8, g, 16, D=D, z=True, dt_bias=True)
    y, final = run_ours(t, chunk, return_final_states=True)
    y_ref, final_ref = ref_selective(t)  # same fp32 leaves: this reference computes in fp32
    assert_close(y, y_ref, "output")
    assert_close(final, final_ref, "final state")
    compare_grads(t, t, [y, final], [y_ref, final_ref], "selective_scan_ref")


@pytest.mark.parametrize("dt_limit", [(0.0, float("inf")), (0.2, 0.6)])
def test_ssd_matches_naive_sequential(dt_limit):
    t = scan_inputs(300, 2, 45, 4, 8, 2, 16, D="h", z=True, dt_bias=True, init=True)
    r = as_f64(t)
    y, final = run_ours(t, 16, dt_limit=dt_limit, return_final_states=True)
    y_ref, final_ref = mk.naive_sequential_scan(
        r["x"], r["dt"], r["A"], r["B"], r["C"], D=r["D"], z=r["z"], dt_bias=r["dt_bias"],
        initial_states=r["initial_states"], dt_softplus=True, dt_limit=dt_limit,
        return_final_states=True,
    )
    assert y_ref.dtype == torch.float64  # the baseline really ran in float64
    assert_close(y, y_ref, "output")
    assert_close(final, final_ref, "final state")
    compare_grads(t, r, [y, final], [y_ref, final_ref], "naive")


def test_ssd_without_softplus_clamps_negative_dt_like_triton():
    # The Triton kernel always clamps dt to dt_limit, by default (0, inf).
    t = scan_inputs(450, 2, 40, 4, 8, 2, 16, D="h", z=True)
    r = as_f64(t)
    with torch.no_grad():
        t["dt"].add_(0.8)  # now a mix of signs
    assert (t["dt"] < 0).any() and (t["dt"] > 0).any()
    y = mk.ssd_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], 16, D=t["D"], z=t["z"])
    r["dt"] = t["dt"].detach().double().clamp(min=0.0)
    assert_close(y, ref_combined(r, 16, softplus=False), "output")


def test_ssd_chunk_size_does_not_change_result():
    t = scan_inputs(400, 1, 70, 4, 8, 2, 16, D="h", dt_bias=True, init=True)
    y16, y64 = run_ours(t, 16), run_ours(t, 64)
    assert_close(y16, y64, "chunk 16 vs 64")


def test_ssd_half_precision_io_like_triton():
    t = scan_inputs(500, 1, 33, 4, 8, 1, 16, D="h", z=True, dt_bias=True)
    lo = {k: (v.detach().bfloat16() if k in ("x", "B", "C", "z") and v is not None else v)
          for k, v in t.items()}
    y, final = run_ours(lo, 16, return_final_states=True)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    y_ref = run_ours({k: (v.float() if v is not None else None) for k, v in lo.items()}, 16)
    assert rel_err(y, y_ref) < 1e-2  # only the final rounding to bfloat16 differs


def test_ssd_varlen_inference_inputs_not_implemented():
    t = scan_inputs(600, 1, 20, 4, 8, 1, 16)
    with pytest.raises(NotImplementedError, match="cu_seqlens"):
        run_ours(t, 16, cu_seqlens=torch.tensor([0, 20], dtype=torch.int32), return_varlen_states=True)


# ----------------------------------------------------------------- causal conv1d


def conv_ref(x, weight, bias, activation):
    d, w = weight.shape
    out = F.conv1d(F.pad(x, (w - 1, 0)), weight.unsqueeze(1), bias, groups=d)
    return F.silu(out) if activation in ("silu", "swish") else out


@pytest.mark.parametrize("b,d,l,w,use_bias,activation", [
    (2, 24, 37, 4, True, "silu"),
    (1, 16, 9, 2, False, None),
    (2, 8, 3, 4, True, "swish"),  # shorter than the kernel
])
def test_causal_conv1d_matches_conv1d(b, d, l, w, use_bias, activation):
    gen = torch.Generator().manual_seed(d * l)
    x = torch.randn(b, d, l, generator=gen).requires_grad_()
    weight = torch.randn(d, w, generator=gen).requires_grad_()
    bias = torch.randn(d, generator=gen).requires_grad_() if use_bias else None
    leaves = [v for v in (x, weight, bias) if v is not None]
    refs = [v.detach().double().requires_grad_() for v in leaves]
    out = mk.causal_conv1d(x, weight, bias, activation=activation)
    out_ref = conv_ref(refs[0], refs[1], refs[2] if use_bias else None, activation)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_close(out, out_ref, "output")
    pairs = zip(grads([out], leaves, 1), grads([out_ref], refs, 1))
    for name, (a, r) in zip("x weight bias".split(), pairs):
        assert_close(a, r, f"grad {name}")


def test_causal_conv1d_rejects_unsupported():
    x, wt = torch.randn(1, 4, 6), torch.randn(4, 3)
    with pytest.raises(NotImplementedError):
        mk.causal_conv1d(x, wt, initial_states=torch.zeros(1, 4, 2))
    with pytest.raises(NotImplementedError):
        mk.causal_conv1d(x, wt, activation="relu")


# ----------------------------------------------------------------- gated RMSNorm


@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("gate", [None, "before", "after"])
@pytest.mark.parametrize("use_bias", [False, True])
def test_gated_rms_norm_matches_rms_norm_ref(group_size, gate, use_bias):
    gen = torch.Generator().manual_seed(len(str((group_size, gate, use_bias))))
    x = torch.randn(3, 5, 32, generator=gen).requires_grad_()
    weight = (1 + 0.1 * torch.randn(32, generator=gen)).requires_grad_()
    bias = torch.randn(32, generator=gen).requires_grad_() if use_bias else None
    z = torch.randn(3, 5, 32, generator=gen).requires_grad_() if gate else None
    before = gate != "after"
    leaves = [v for v in (x, weight, bias, z) if v is not None]
    refs = [v.detach().double().requires_grad_() for v in leaves]
    names = [k for k, v in zip("x weight bias z".split(), (x, weight, bias, z)) if v is not None]
    r = dict(zip(names, refs))
    out = mk.gated_rms_norm(x, weight, bias, z=z, eps=1e-5, group_size=group_size,
                            norm_before_gate=before)
    out_ref = rms_norm_ref(r["x"], r["weight"], r.get("bias"), z=r.get("z"), eps=1e-5,
                           group_size=group_size, norm_before_gate=before, upcast=False)
    assert out.dtype == x.dtype
    assert_close(out, out_ref, "output")
    for name, a, b in zip(r, grads([out], leaves, 2), grads([out_ref], refs, 2)):
        assert_close(a, b, f"grad {name}")


def test_gated_rms_norm_keeps_input_dtype():
    x, z = torch.randn(4, 16).bfloat16(), torch.randn(4, 16).bfloat16()
    weight = torch.rand(16) + 0.5
    out = mk.gated_rms_norm(x, weight, None, z=z)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, rms_norm_ref(x, weight, None, z=z)) < 1e-2


# ----------------------------------------------------------------- installation


@pytest.fixture
def patch_targets(monkeypatch):
    """The two patched modules, with their current globals restored after the test."""
    mixer = importlib.import_module("megatron.core.ssm.mamba_mixer")
    norm = importlib.import_module("mamba_ssm.ops.triton.layernorm_gated")
    names = [(mixer, "mamba_chunk_scan_combined"), (mixer, "causal_conv1d_fn"), (norm, "rmsnorm_fn"),
             (mixer, "mamba_split_conv1d_scan_combined"), (mixer, "_check_mamba_sequence_packing_support")]
    for mod, name in names:
        monkeypatch.setattr(mod, name, getattr(mod, name))
    return mixer, norm


def test_install_cpu_kernels_patches_the_mixers_globals(patch_targets, monkeypatch):
    from submodels.mamba_split_scan import split_conv1d_scan

    mixer, norm = patch_targets
    assert mixer.HAVE_MAMBA_SSM, "MCore imported without mamba_ssm despite the import guard"
    monkeypatch.setattr(mixer, "causal_conv1d_fn", None)
    assert not mamba_cpu.cpu_kernels_installed()
    for _ in range(2):  # idempotent
        assert mamba_cpu.install_cpu_kernels(force=True) is True
        assert mixer.mamba_chunk_scan_combined is mk.ssd_chunk_scan
        assert mixer.causal_conv1d_fn is mk.causal_conv1d
        assert norm.rmsnorm_fn is mk.gated_rms_norm
        assert mixer.mamba_split_conv1d_scan_combined is split_conv1d_scan
        assert mixer._check_mamba_sequence_packing_support(False) == (True, None)
        assert mamba_cpu.cpu_kernels_installed()


def test_installed_rmsnorm_module_runs_on_cpu(patch_targets):
    _, norm = patch_targets
    mamba_cpu.install_cpu_kernels(force=True)
    module = norm.RMSNorm(16, eps=1e-5, group_size=8, norm_before_gate=False)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
    x, z = torch.randn(3, 16), torch.randn(3, 16)
    want = rms_norm_ref(x.double(), module.weight.double(), None, z=z.double(), eps=1e-5,
                        group_size=8, norm_before_gate=False, upcast=False)
    assert_close(module(x, z), want, "RMSNorm module")


def test_install_skipped_when_cuda_available(patch_targets, monkeypatch):
    mixer, _ = patch_targets
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mixer, "causal_conv1d_fn", None)
    assert mamba_cpu.install_cpu_kernels() is False
    assert mixer.causal_conv1d_fn is None


def test_guard_raises_if_mixer_imported_without_mamba_ssm(patch_targets, monkeypatch):
    mixer, _ = patch_targets
    monkeypatch.setattr(mixer, "HAVE_MAMBA_SSM", False)
    with pytest.raises(RuntimeError, match="Import submodels.mamba_kernels before"):
        mk.ensure_mamba_ssm_importable()
    with pytest.raises(RuntimeError):
        mamba_cpu.install_cpu_kernels(force=True)
