"""CPU stand-in for mamba-ssm's fused ``mamba_split_conv1d_scan_combined``: MCore's training path.

MCore's ``MambaMixer`` trains through ``_ssm_training`` (its memory-efficient path, the one MCore
tests) and only that path takes packed rows (``packed_seq_params.seq_idx``). On CUDA it calls
mamba-ssm's fused kernel, which needs ``causal_conv1d``; here the same split, convolution and
scan are composed from :mod:`submodels.mamba_kernels`, so the unchanged mixer trains packed rows
on CPU. Installed with the other CPU kernels (``mamba_cpu.install_cpu_kernels``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from submodels.mamba_kernels import causal_conv1d, gated_rms_norm, ssd_chunk_scan

SPLIT_SCAN_REASON = ("MCore's Mamba training path (the only one that takes packed rows) calls mamba-ssm's fused "
                     "conv+scan kernel and checks causal_conv1d's version; both need a GPU.")


def split_conv1d_scan(
    zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states=None, seq_idx=None,
    dt_limit=(0.0, float("inf")), return_final_states=False, activation="silu", rmsnorm_weight=None,
    rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None, ngroups=1, norm_before_gate=True,
    **unused,
):
    """Split ``zxbcdt`` [b,l,2*dim + 2*ngroups*dstate + nheads] into z, xBC and dt; causal conv over
    xBC; SSD scan gated by silu(z) (or the gated RMSNorm with ``rmsnorm_weight``); optional output
    projection. ``seq_idx`` [b,l] restarts the convolution and the state at each packed sequence.
    Returns y [b,l,dim] (or [b,l,out]) in zxbcdt's dtype; extra keywords (``state_dtype``) are ignored."""
    nheads = dt_bias.shape[0]
    if headdim is None:
        headdim = D.shape[-1]
    dim = nheads * headdim
    conv_dim = conv1d_weight.shape[0]
    dstate = (conv_dim - dim) // (2 * ngroups)
    z, xbc, dt = torch.split(zxbcdt, [dim, conv_dim, nheads], dim=-1)
    xbc = causal_conv1d(xbc.transpose(1, 2), conv1d_weight, conv1d_bias, seq_idx=seq_idx,
                        activation=activation).transpose(1, 2)
    x, B, C = torch.split(xbc, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    b, l = zxbcdt.shape[:2]
    heads = lambda t: t.reshape(b, l, nheads, headdim)  # noqa: E731
    groups = lambda t: t.reshape(b, l, ngroups, dstate)  # noqa: E731
    result = ssd_chunk_scan(heads(x), dt, A, groups(B), groups(C), chunk_size, D=D,
                            z=heads(z) if rmsnorm_weight is None else None, dt_bias=dt_bias,
                            initial_states=initial_states, seq_idx=seq_idx, dt_softplus=True, dt_limit=dt_limit,
                            return_final_states=return_final_states)
    y, final = result if return_final_states else (result, None)
    y = y.reshape(b, l, dim)
    if rmsnorm_weight is not None:
        y = gated_rms_norm(y, rmsnorm_weight, None, z=z, eps=rmsnorm_eps, group_size=dim // ngroups,
                           norm_before_gate=norm_before_gate)
    if outproj_weight is not None:
        y = F.linear(y, outproj_weight, outproj_bias)
    return (y, final) if return_final_states else y


def packing_supported(for_inference_not_training: bool = True):
    """MCore's ``_check_mamba_sequence_packing_support`` on CPU: training rows pack (the kernels here
    honour ``seq_idx``); inference packing (dynamic batching) is not provided."""
    if for_inference_not_training:
        return False, "packed inference needs mamba-ssm's and causal_conv1d's CUDA kernels"
    return True, None
