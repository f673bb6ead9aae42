"""Incremental decoding of MCore's HybridModel on CPU: the Mamba mixer's decode step in torch.

MCore's ``MambaMixer`` decodes one token at a time through Triton kernels
(``causal_conv1d_update``, ``selective_state_update``), which need a GPU. Its own PyTorch
fallback (used when those names are None) reads the static-batch step ``[1, batch, ...]`` as one
sample of ``batch`` tokens and refuses it, and with the gated norm it would broadcast the
squeezed gate against the output. So on CPU ``MambaMixer._decode`` for static batches is
:func:`batched_decode`: the same recurrence as that fallback (shift the conv state, convolve,
discretise, update the SSM state in place, gate), for every row at once. Installed with the CPU
kernels (:func:`submodels.mamba_cpu.install_cpu_kernels`), on CPU only;
``tests/test_generate.py`` checks decoding against full forwards.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

DECODE_REASON = ("MCore's MambaMixer decodes through Triton kernels (a GPU), and its PyTorch fallback does "
                 "not take a static batch of several rows.")


def decode_targets():
    """(owner, name, replacement) for the CPU decode step."""
    mixer = importlib.import_module("megatron.core.ssm.mamba_mixer")
    return [(mixer, "causal_conv1d_update", None), (mixer, "selective_state_update", None),
            (mixer.MambaMixer, "_decode", batched_decode)]


def batched_decode(self, hidden_states, conv_state, ssm_state, batch_indices=None):
    """``MambaMixer._decode`` for one token of every row: ``hidden_states`` [1, b, h]; the conv
    state [b, channels, width] and SSM state [b, heads, head dim, state] update in place."""
    zxBCdt, _ = self.in_proj(hidden_states)  # [1, b, d]
    if batch_indices is not None:  # dynamic batches: MCore's own step (batch first), unchanged
        y = self._ssm_decode(zxBCdt.transpose(0, 1), conv_state=conv_state, ssm_state=ssm_state,
                             batch_indices=batch_indices)
        return self.out_proj(y.transpose(0, 1))
    inner, groups, state, heads = self.d_inner_local_tp, self.ngroups_local_tp, self.d_state, self.nheads_local_tp
    z, xBC, dt = torch.split(zxBCdt[0], [inner, inner + 2 * groups * state, heads], dim=-1)
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = xBC
    xBC = (conv_state * self.conv1d_weight[:, 0, :]).sum(dim=-1) + self.conv1d_bias
    x, B, C = torch.split(F.silu(xBC).to(zxBCdt.dtype), [inner, groups * state, groups * state], dim=-1)
    per_group = heads // groups
    B = B.view(-1, groups, 1, state).expand(-1, groups, per_group, state).reshape(-1, heads, state)
    C = C.view(-1, groups, 1, state).expand(-1, groups, per_group, state).reshape(-1, heads, state)
    dt = F.softplus(dt.float() + self.dt_bias.float())  # [b, heads]
    decay = torch.exp(dt * -torch.exp(self.A_log.float()))
    x = x.view(-1, heads, self.headdim)
    ssm_state.copy_(ssm_state * decay[..., None, None] + (dt[..., None] * x.float())[..., None] * B.float()[:, :, None, :])
    y = torch.einsum("bhpn,bhn->bhp", ssm_state.to(x.dtype), C.to(x.dtype))
    skip = self.D.view(heads, -1).to(x.dtype)  # per head, or per channel with D_has_hdim
    y = (y + skip * x).reshape(-1, inner)
    y = self.norm(y[None], z[None]) if self.rmsnorm else (y * F.silu(z))[None]
    return self.out_proj(y)
