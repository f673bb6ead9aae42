"""Incremental decoding of MCore's HybridModel on CPU: its static-batch decode step, without
Triton.

MCore's ``MambaMixer`` decodes one token at a time through Triton kernels
(``causal_conv1d_update``, ``selective_state_update``); with those names set to None it runs its
own PyTorch fallback instead. That fallback reads the static-batch step ``[1, batch, ...]`` as one
sample of ``batch`` tokens (and refuses it), and with the gated norm it would broadcast the
squeezed gate against the output; for a single row both are right. So on CPU ``_decode`` steps
each row through the fallback with its own slice of the conv and SSM states (updated in place).
Installed with the CPU kernels (:func:`submodels.mamba_kernels.install_cpu_kernels`), on CPU only.
"""

from __future__ import annotations

import importlib

import torch

DECODE_REASON = ("MCore's MambaMixer decodes through Triton kernels (a GPU); its PyTorch fallback is "
                 "right for one row at a time only.")


def decode_targets():
    """(owner, name, replacement) for the CPU decode step."""
    mixer = importlib.import_module("megatron.core.ssm.mamba_mixer")
    return [(mixer, "causal_conv1d_update", None), (mixer, "selective_state_update", None),
            (mixer.MambaMixer, "_decode", _row_by_row_decode)]


def _row_by_row_decode(self, hidden_states, conv_state, ssm_state, batch_indices=None):
    """MambaMixer._decode for static batches, each row through the PyTorch fallback alone."""
    zxBCdt, _ = self.in_proj(hidden_states)  # [1, b, d]
    if batch_indices is not None:  # dynamic batches: MCore's own order (batch first), unchanged
        y = self._ssm_decode(zxBCdt.transpose(0, 1), conv_state=conv_state, ssm_state=ssm_state,
                             batch_indices=batch_indices)
        return self.out_proj(y.transpose(0, 1))
    rows = [self._ssm_decode(zxBCdt[:, i:i + 1], conv_state=conv_state[i:i + 1], ssm_state=ssm_state[i:i + 1])
            for i in range(zxBCdt.shape[1])]  # one row at a time: the states update in place
    return self.out_proj(torch.cat(rows, dim=1))
