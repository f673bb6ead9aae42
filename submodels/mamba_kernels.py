"""Pure-torch CPU stand-ins for the Mamba-2 kernels that Megatron-Core's ``MambaMixer`` calls.

Why: MCore's ``MambaMixer`` (``megatron/core/ssm/mamba_mixer.py``) runs its SSM through
mamba-ssm's Triton kernels and its convolution through the ``causal_conv1d`` CUDA
extension. Neither runs without a GPU, so on CPU the mixer cannot do a forward pass.
This module supplies numerically equivalent torch implementations (autograd supplies
the gradients) so that the *unchanged* MCore ``MambaMixer``, with its own parameters,
runs on CPU -- for tests, debugging and small CPU-only runs.

They are installed only on CPU, by :func:`submodels.mamba_cpu.install_cpu_kernels` (with the
fused training kernel of :mod:`submodels.mamba_split_scan` and the decode step of
:mod:`submodels.mamba_decode`).

Import order matters: ``import mamba_ssm`` raises here (its ``__init__`` needs the missing
``selective_scan_cuda`` extension), but the failed attempt leaves ``mamba_ssm.ops.triton.*``
in ``sys.modules``, after which MCore's ``from mamba_ssm.ops.triton.X import name`` works.
So import this module *before* anything from ``megatron.core.ssm`` (and from
``megatron.training``, which imports it); installing the kernels raises if that order
was broken, as MCore then has no gated RMSNorm. (``import
mamba_ssm.ops.triton.X`` and ``from mamba_ssm.ops.triton import X`` still fail: both
re-import the top-level package. Use the ``from ... import name`` form or importlib.)
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

_MIXER = "megatron.core.ssm.mamba_mixer"
_NO_LIMIT = (0.0, float("inf"))


def _try_import_mamba_ssm() -> None:
    try:
        import mamba_ssm  # noqa: F401  (a failed import still registers mamba_ssm.ops.triton)
    except ImportError:
        pass


def ensure_mamba_ssm_importable() -> None:
    """Make ``mamba_ssm.ops.triton.*`` importable for MCore, even without mamba-ssm's CUDA parts.

    Raises RuntimeError if MCore's mamba_mixer was already imported without mamba-ssm.
    """
    _try_import_mamba_ssm()
    mixer = sys.modules.get(_MIXER)
    if mixer is not None and not getattr(mixer, "HAVE_MAMBA_SSM", False):
        raise RuntimeError(
            f"{_MIXER} was imported before mamba_ssm could be, so it runs without mamba-ssm "
            "(HAVE_MAMBA_SSM == False). Import submodels.mamba_kernels before MCore's Mamba "
            "modules (anything under megatron.core.ssm)."
        )


_try_import_mamba_ssm()  # on import, so that importing this module first is enough


# --------------------------------------------------------------------------- SSD scan


def _reject_varlen(cu_seqlens, return_varlen_states) -> None:
    if cu_seqlens is not None or return_varlen_states:
        raise NotImplementedError(
            "CPU ssd_chunk_scan: cu_seqlens and return_varlen_states (MCore's inference paths) are "
            "not supported; packed training rows pass seq_idx."
        )


def _check_seq_idx(seq_idx, b, l):
    """seq_idx [b, l] (int): each row's sequence number, non-decreasing along the row."""
    if seq_idx.shape != (b, l):
        raise ValueError(f"seq_idx has shape {tuple(seq_idx.shape)}, expected {(b, l)}")
    if bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
        raise ValueError("seq_idx must not decrease along a row (each sequence is one contiguous run)")


def _compute_dtype(t):
    """fp32 for half/bfloat16/fp32 inputs (like the Triton kernels), fp64 for fp64 inputs."""
    return torch.promote_types(t.dtype, torch.float32)


def _discretize_dt(dt, dt_bias, dt_softplus, dt_limit, cd):
    """dt in dtype cd after bias, softplus (linear above 20) and clamping to dt_limit.

    Like the Triton kernel, the clamp is always applied: by default dt < 0 becomes 0.
    """
    dt = dt.to(cd)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cd)
    if dt_softplus:
        dt = F.softplus(dt, threshold=20.0)
    return dt.clamp(min=dt_limit[0], max=dt_limit[1])


def _skip_term(y, x, D, z):
    """Add the D skip connection and apply the silu(z) gate, in y's dtype."""
    if D is not None:
        d = D.to(y.dtype) if D.dim() == 2 else D.to(y.dtype)[:, None]
        y = y + x.to(y.dtype) * d
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _check_shapes(x, dt, A, B, C):
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if dt.shape != (b, l, h) or A.shape != (h,) or B.shape != (b, l, g, n) or C.shape != B.shape:
        raise ValueError(
            f"bad shapes: x {tuple(x.shape)}, dt {tuple(dt.shape)}, A {tuple(A.shape)}, "
            f"B {tuple(B.shape)}, C {tuple(C.shape)}"
        )
    if h % g:
        raise ValueError(f"nheads ({h}) must be divisible by ngroups ({g})")


def _to_chunks(t, chunk_size):
    """Zero-pad dim 1 (time) to a multiple of chunk_size and split it into (chunks, chunk_size)."""
    pad = (-t.shape[1]) % chunk_size
    if pad:
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
    return t.unflatten(1, (t.shape[1] // chunk_size, chunk_size))


def _seq_chunks(seq_idx, chunk_size):
    """seq_idx [b, l] in chunks [b, c, s], the padded tail continuing the last sequence."""
    pad = (-seq_idx.shape[1]) % chunk_size
    if pad:
        seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(-1, pad)], dim=1)
    return seq_idx.unflatten(1, (seq_idx.shape[1] // chunk_size, chunk_size))


def _segsum_decay(a):
    """exp(sum_{j<k<=i} a[..., k]) for i >= j, 0 above the diagonal: [..., T] -> [..., T, T]."""
    cs = torch.cumsum(a, dim=-1)
    diff = cs[..., :, None] - cs[..., None, :]
    t = a.shape[-1]
    keep = torch.ones(t, t, dtype=torch.bool, device=a.device).tril()
    return torch.exp(diff.masked_fill(~keep, float("-inf")))


def _pass_states(chunk_states, chunk_decay, initial_states, owners=None):
    """Inter-chunk recurrence s_{c+1} = exp(a_c) s_c + S_c, vectorised as one segment-sum matmul.

    chunk_states [b,c,g,r,p,n], chunk_decay (log) [b,c,g,r], initial [b,g,r,p,n] or None.
    ``owners`` [b,c+1]: the sequence each state belongs to (the initial one, then each chunk's
    last token); a state passes on only within its sequence. Returns (states entering each
    chunk [b,c,g,r,p,n], final state [b,g,r,p,n]).
    """
    if initial_states is None:
        initial_states = torch.zeros_like(chunk_states[:, 0])
    seq = torch.cat([initial_states[:, None], chunk_states], dim=1)
    log_a = F.pad(chunk_decay.permute(0, 2, 3, 1), (1, 0))  # [b,g,r,c+1], first step no-op
    decay = _segsum_decay(log_a)  # [b,g,r,c+1,c+1]
    if owners is not None:
        decay = decay * (owners[:, :, None] == owners[:, None, :])[:, None, None]
    out = torch.einsum("bgrzc,bcgrpn->bzgrpn", decay, seq)
    return out[:, :-1], out[:, -1]


def ssd_chunk_scan(
    x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
    seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=_NO_LIMIT,
    return_final_states=False, return_varlen_states=False, **unused,
):
    """Mamba-2 SSD scan; drop-in for mamba-ssm's ``mamba_chunk_scan_combined``.

    Shapes: x [b,l,h,p], dt [b,l,h], A [h], B/C [b,l,g,n], D [h] or [h,p], z like x,
    dt_bias [h], initial_states [b,h,p,n]. Chunked algorithm: a causal quadratic form
    inside each chunk plus a segment-sum pass of the chunk states across chunks.
    ``seq_idx`` [b,l] (packed rows): the state restarts where the sequence number changes, as
    in mamba-ssm; ``initial_states`` then belong to each row's first sequence.
    Computes in fp32 (fp64 for fp64 x); returns y in x's dtype, plus the final state
    [b,h,p,n] in the compute dtype if ``return_final_states``. Extra keywords (e.g.
    MCore's ``state_dtype``) are ignored.
    """
    _reject_varlen(cu_seqlens, return_varlen_states)
    _check_shapes(x, dt, A, B, C)
    b, l, h, p = x.shape
    g = B.shape[2]
    r, cd = h // g, _compute_dtype(x)
    chunk_size = min(chunk_size, l)  # a sequence shorter than a chunk is one chunk, not padding
    dt = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit, cd)
    xc = _to_chunks(x.to(cd), chunk_size).unflatten(3, (g, r))  # [b,c,s,g,r,p]
    Bc, Cc = _to_chunks(B.to(cd), chunk_size), _to_chunks(C.to(cd), chunk_size)  # [b,c,s,g,n]
    dtc = _to_chunks(dt, chunk_size).unflatten(3, (g, r)).permute(0, 1, 3, 4, 2)  # [b,c,g,r,s]
    dA = dtc * A.to(cd).view(g, r, 1)  # padded steps have dt = 0: no input, no decay
    dA_cs = torch.cumsum(dA, dim=-1)
    same = _same_sequence(seq_idx, b, l, chunk_size)

    # Intra-chunk (diagonal blocks): y_l = sum_{s<=l} C_l.B_s exp(dA_cs_l - dA_cs_s) dt_s x_s
    decay = _segsum_decay(dA) if same is None else _segsum_decay(dA) * same["pairs"]
    scores = torch.einsum("bclgn,bcsgn->bcgls", Cc, Bc)[:, :, :, None] * decay
    y = torch.einsum("bcgrls,bcsgrp->bclgrp", scores * dtc[..., None, :], xc)

    # State at the end of each chunk from that chunk's inputs alone (its last sequence's inputs).
    w = torch.exp(dA_cs[..., -1:] - dA_cs) * dtc
    w = (w if same is None else w * same["with_last"]).permute(0, 1, 4, 2, 3)  # [b,c,s,g,r]
    chunk_states = torch.einsum("bcsgn,bcsgrp->bcgrpn", Bc, xc * w[..., None])
    init = None if initial_states is None else initial_states.to(cd).unflatten(1, (g, r))
    states_in, final = _pass_states(chunk_states, dA_cs[..., -1], init, None if same is None else same["owners"])

    # Off-diagonal: contribution of the state entering each chunk (to its own sequence only).
    y_off = torch.einsum("bclgn,bcgrpn->bclgrp", Cc, states_in)
    carried = torch.exp(dA_cs) if same is None else torch.exp(dA_cs) * same["with_entering"]
    y = y + y_off * carried.permute(0, 1, 4, 2, 3)[..., None]
    y = _skip_term(y.reshape(b, -1, h, p)[:, :l], x, D, z).to(x.dtype)
    return (y, final.flatten(1, 2)) if return_final_states else y


def _same_sequence(seq_idx, b, l, chunk_size):
    """For packed rows, where two positions share a sequence (None without ``seq_idx``):
    ``pairs`` [b,c,1,1,s,s] inside a chunk, ``with_last`` [b,c,1,1,s] with the chunk's last
    token, ``with_entering`` [b,c,1,1,s] with the state entering the chunk, ``owners`` [b,c+1]."""
    if seq_idx is None:
        return None
    _check_seq_idx(seq_idx, b, l)
    sc = _seq_chunks(seq_idx.to(torch.int64), chunk_size)  # [b,c,s]
    owners = torch.cat([sc[:, :1, 0], sc[:, :, -1]], dim=1)  # the initial state's, then each chunk's end
    return {
        "pairs": (sc[..., :, None] == sc[..., None, :])[:, :, None, None],
        "with_last": (sc == sc[..., -1:])[:, :, None, None],
        "with_entering": (sc == owners[:, :-1, None])[:, :, None, None],
        "owners": owners,
    }


def naive_sequential_scan(
    x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None,
    dt_softplus=False, dt_limit=_NO_LIMIT, return_final_states=False,
):
    """Per-time-step SSM recurrence (benchmark baseline and independent check).

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,  y_t = h_t C_t (+ D x_t, * silu(z_t)).
    Same shapes/semantics as :func:`ssd_chunk_scan` (fp32/fp64 inside, y in x's dtype).
    """
    _check_shapes(x, dt, A, B, C)
    b, l, h, p = x.shape
    r, cd = h // B.shape[2], _compute_dtype(x)
    dt = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit, cd)
    Bh, Ch = (t.to(cd).repeat_interleave(r, dim=2) for t in (B, C))  # [b,l,h,n]
    xf = x.to(cd)
    decay = torch.exp(dt * A.to(cd))  # [b,l,h]
    zeros = x.new_zeros(b, h, p, B.shape[3], dtype=cd)
    state = zeros if initial_states is None else initial_states.to(cd)
    ys = []
    for t in range(l):
        inp = (dt[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]
        state = decay[:, t, :, None, None] * state + inp
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = _skip_term(torch.stack(ys, dim=1), x, D, z).to(x.dtype)
    return (y, state) if return_final_states else y


# --------------------------------------------------------------------------- conv / norm


def causal_conv1d(
    x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
    final_states_out=None, activation=None,
):
    """Depthwise causal conv1d; drop-in for ``causal_conv1d.causal_conv1d_fn`` (no states).

    x [b,d,l], weight [d,w], bias [d]; out[..., t] = bias + sum_k weight[:, k] x[..., t-w+1+k]
    (zeros before t=0, and with ``seq_idx`` [b,l] zeros before the start of t's sequence),
    then silu if activation is 'silu'/'swish'. fp32/fp64 inside, x's dtype out.
    """
    if initial_states is not None or final_states_out is not None or return_final_states:
        raise NotImplementedError("CPU causal_conv1d: initial and final states are not supported.")
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    width, l, cd = weight.shape[-1], x.shape[-1], _compute_dtype(x)
    xp, w = F.pad(x.to(cd), (width - 1, 0)), weight.to(cd)
    if seq_idx is None:
        out = sum(w[:, k, None] * xp[..., k : k + l] for k in range(width))
    else:
        _check_seq_idx(seq_idx, x.shape[0], l)
        sp = F.pad(seq_idx.to(torch.int64), (width - 1, 0), value=-1)
        same = [(sp[:, k : k + l] == seq_idx)[:, None] for k in range(width)]  # [b,1,l] per tap
        out = sum(w[:, k, None] * xp[..., k : k + l] * same[k] for k in range(width))
    if bias is not None:
        out = out + bias.to(cd)[:, None]
    if activation is not None:
        out = F.silu(out)
    return out.to(x.dtype)


def gated_rms_norm(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """Gated (group) RMSNorm; drop-in for mamba-ssm's ``layernorm_gated.rmsnorm_fn``.

    norm_before_gate: rmsnorm(x) * silu(z); otherwise rmsnorm(x * silu(z)). With group_size,
    the RMS is taken over consecutive groups of that many channels. fp32/fp64 inside, x's dtype out.
    """
    hidden = x.shape[-1]
    group = hidden if group_size is None else group_size
    if hidden % group:
        raise ValueError(f"group_size {group} must divide the last dim {hidden}")
    cd = _compute_dtype(x)
    xf, gate = x.to(cd), (None if z is None else F.silu(z.to(cd)))
    if gate is not None and not norm_before_gate:
        xf = xf * gate
    xg = xf.unflatten(-1, (hidden // group, group))
    rms_inv = torch.rsqrt(xg.square().mean(dim=-1, keepdim=True) + eps)
    out = (xg * rms_inv).flatten(-2) * weight.to(cd)
    if bias is not None:
        out = out + bias.to(cd)
    if gate is not None and norm_before_gate:
        out = out * gate
    return out.to(x.dtype)
