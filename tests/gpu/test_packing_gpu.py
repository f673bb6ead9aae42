"""Packed rows on CUDA: the vlm graph's step on variable-length samples, packed several to a row
(MCore's fused Mamba path with ``seq_idx``, causal-conv1d's kernels) against one sample per row,
on one CUDA rank in fp32: the same loss and the same gradients.

The CPU suite checks the same on the CPU kernels (``tests/test_packing.py``); here the packed
rows go through mamba-ssm's Triton scan and causal-conv1d. Tolerance: 1e-4 of the largest
gradient (fp32 with IEEE Triton dots; the packed and padded steps sum in other orders).
"""

from __future__ import annotations

import pytest
import torch
from cuda_cases import needs_causal_conv1d, on_cuda_rank

pytestmark = [pytest.mark.gpu, needs_causal_conv1d()]

TOL = 1e-4


def packed_and_padded() -> dict:
    """Inside one rank (any device): per side, the step's loss and each node's gradient buffer."""
    import os

    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
    from megatron.core.distributed import DistributedDataParallelConfig

    from graphs.vlm import vlm
    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from tests.packing_steps import variable_batch

    device = compat.init_runtime("auto")
    sides = {}
    for packed in (False, True):
        graph = vlm("single").packed() if packed else vlm("single")
        (model,) = CompositeBuilder(graph, seed=3).build_distributed_models(ddp_config=DistributedDataParallelConfig())
        with model:
            loss = GraphSchedule(model, device=device).forward_backward(variable_batch(model.valid, packed), 2)
            grads = {n: torch.cat([b.grad_data.float().flatten() for b in model.chunks(n)[0].buffers]).cpu()
                     for n in model.valid.order}
        sides["packed" if packed else "padded"] = {"loss": loss, "grads": grads}
    return sides


def test_packed_rows_give_the_padded_steps_loss_and_gradients_on_cuda():
    sides = on_cuda_rank(packed_and_padded)
    packed, padded = sides["packed"], sides["padded"]
    assert packed["loss"] == pytest.approx(padded["loss"], rel=TOL)
    for node, want in padded["grads"].items():
        got = packed["grads"][node]
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err <= TOL, f"node {node}: gradients differ by {err:.2e} of the largest"
