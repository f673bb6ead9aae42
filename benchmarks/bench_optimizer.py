"""Optimizer state per rank: the distributed optimizer at DP=2 vs the plain one at DP=1.

The ``vlm`` graph in bf16 with Megatron-Core's Adam (fp32 master weights and two fp32 moments per
parameter) takes one step on 1 rank (plain optimizer) and on 2 colocated ranks with
``use_distributed_optimizer`` (state sharded over each node's DP group). Bytes are what
``GraphOptimizer.state_bytes()`` counts per rank: moments plus master copies. Target: the
largest rank's bytes at DP=2 / bytes at DP=1 <= 0.51 (ideal 0.5; bucket padding adds a little).

Run: .venv/bin/python benchmarks/bench_optimizer.py [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from common import report  # noqa: E402


def _state_bytes(placement: str, distributed: bool) -> dict[str, int]:
    from megatron.core.distributed import DistributedDataParallelConfig

    from graphs.vlm import vlm
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.optim import GraphOptimizer
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch
    from mimo_builder._internal.assembly.walker import CompositeBuilder

    compat.init_runtime("cpu")
    graph = vlm(placement)
    for node in graph.nodes.values():
        node.config["dtype"] = "bf16"
    ddp = DistributedDataParallelConfig(use_distributed_optimizer=distributed)
    (model,) = CompositeBuilder(graph).build_distributed_models(ddp_config=ddp)
    optimizer = GraphOptimizer(model)
    optimizer.zero_grad()
    GraphSchedule(model).forward_backward(synthetic_batch(model.valid, 4))
    optimizer.step()
    return optimizer.state_bytes()


def main(argv=None) -> dict:
    from mimo_builder._internal.platform.launch import launch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    plain = launch(_state_bytes, 1, "single", False)[0]
    sharded = launch(_state_bytes, 2, "colocated_dp2", True)
    total_plain = sum(plain.values())
    largest = max(sum(rank.values()) for rank in sharded)
    rows = [(f"{name}: DP=1 plain / DP=2 distributed (per rank)",
             f"{plain[name]:,} / {' + '.join(f'{rank[name]:,}' for rank in sharded)} bytes") for name in plain]
    rows.append(("all nodes", f"{total_plain:,} / {largest:,} bytes on the largest rank"))
    return report("Optimizer state per rank: distributed optimizer at DP=2 vs plain at DP=1 (vlm, bf16 Adam)",
                  rows, "DP=2 largest rank / DP=1", largest / total_plain, "<= 0.51", args.json)


if __name__ == "__main__":
    main()
