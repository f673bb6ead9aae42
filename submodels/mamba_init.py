"""How MCore's MambaMixer draws its own parameters, as seeded-init rules over the full tensors.

MCore draws ``conv1d_weight``, ``conv1d_bias``, ``dt_bias`` and ``A_log`` inside the TP-rank
tracker, one shard per rank; these rules draw the whole tensor with the same distributions
(:mod:`mimo_builder._internal.assembly.seeded_init` copies each rank's part: x/B/C of the
convolution and the heads of dt and A are split across TP as MCore splits them). The mixer's
``in_proj`` and ``out_proj`` are MCore linears, which the generic rules cover; ``D`` and the
norm start at one.
"""

from __future__ import annotations

import inspect
import math

import torch

from submodels import mamba_kernels

mamba_kernels.ensure_mamba_ssm_importable()  # before MCore's mixer is imported

from megatron.core.ssm.mamba_mixer import MambaMixer  # noqa: E402

_DEFAULTS = {name: p.default for name, p in inspect.signature(MambaMixer.__init__).parameters.items()}
"""MambaMixer's keyword defaults (A_init_range, dt_min, dt_max, dt_init_floor): MCore's layer specs pass none."""


def conv_weight(mixer: MambaMixer, full: torch.Tensor) -> None:
    """[channels, 1, d_conv]: U(+-conv_init), else kaiming_uniform(a=sqrt(5)) over d_conv (U(+-1/sqrt(d_conv)))."""
    if mixer.conv_init is not None:
        full.uniform_(-mixer.conv_init, mixer.conv_init)
    else:
        torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5))


def conv_bias(mixer: MambaMixer, full: torch.Tensor) -> None:
    """[channels]: U(+-1/sqrt(fan_in)), fan_in = d_conv (torch's Conv1d bias init, as MCore keeps it)."""
    bound = 1 / math.sqrt(mixer.d_conv)
    full.uniform_(-bound, bound)


def dt_bias(mixer: MambaMixer, full: torch.Tensor) -> None:
    """[heads]: the inverse softplus of dt, log-uniform in [dt_min, dt_max] and at least dt_init_floor."""
    low, high = math.log(_DEFAULTS["dt_min"]), math.log(_DEFAULTS["dt_max"])
    dt = torch.exp(torch.rand(full.shape) * (high - low) + low).clamp(min=_DEFAULTS["dt_init_floor"])
    full.copy_(dt + torch.log(-torch.expm1(-dt)))


def a_log(mixer: MambaMixer, full: torch.Tensor) -> None:
    """[heads]: log A, A uniform in A_init_range."""
    full.uniform_(*_DEFAULTS["A_init_range"]).log_()


MAMBA_RULES = {(MambaMixer, "conv1d_weight"): conv_weight, (MambaMixer, "conv1d_bias"): conv_bias,
               (MambaMixer, "dt_bias"): dt_bias, (MambaMixer, "A_log"): a_log}
"""The mixer's parameters MCore draws itself, by (module class, parameter name)."""
