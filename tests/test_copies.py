"""The graph adds no copies of its own: on one rank the composite training step of the GPU
benchmark's graph (ViT + projector + Mamba hybrid, bf16, tiny sizes) writes no more bytes through
copying operators than the same modules run as one plain autograd graph.

Copies counted: copy_, clone, cat, stack, dtype/device casts, contiguous, index_put, masked
writes and fresh zero tensors, forward and backward. What the layers themselves copy (MCore's
norms and softmax in fp32, the Mamba mixer's layouts) is the same on both sides and cancels.
"""

import pathlib
import sys

from tests.multirank import run_ranks

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

COPYING = {"copy_", "clone", "cat", "stack", "_to_copy", "contiguous", "index_put", "index_put_", "masked_scatter",
           "masked_fill", "zeros", "zeros_like", "new_zeros"}


def _copied_bytes():
    import collections

    import torch
    from megatron.core.distributed import DistributedDataParallelConfig
    from torch.utils._python_dispatch import TorchDispatchMode

    import bench_gpu
    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.schedule import GraphSchedule

    class Counting(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bytes = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func._overloadpacket.__name__
            if name in COPYING and isinstance(out, torch.Tensor):
                self.bytes[name] += out.numel() * out.element_size()
            return out

    device = compat.init_runtime("cpu")
    sizes = bench_gpu.SIZES["tiny"]
    graph, image_tokens = bench_gpu.make_graph(sizes)
    (model,) = CompositeBuilder(graph, seed=0).build_distributed_models(ddp_config=DistributedDataParallelConfig())
    with model:
        batch = bench_gpu.make_batch(sizes, image_tokens, device)
        steps = bench_gpu._steps(model, GraphSchedule(model, device=device), batch)
        counted = []
        for step in steps:  # composite, monolithic
            step()  # warm: first-step caches
            mode = Counting()
            with mode:
                step()
            counted.append(dict(mode.bytes))
        return counted


def test_the_composite_step_copies_no_more_than_the_modules_as_one_graph():
    ((composite, monolithic),) = run_ranks(1, _copied_bytes)
    extra = sum(composite.values()) - sum(monolithic.values())
    by_op = {op: composite.get(op, 0) - monolithic.get(op, 0) for op in set(composite) | set(monolithic)}
    # a few scalars (the loss's zero start) at most; a copy of one activation would be kilobytes
    assert extra <= 64, {op: n for op, n in by_op.items() if n}
    assert sum(monolithic.values()) > 1_000_000  # the count sees the layers' own copies
