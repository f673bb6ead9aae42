"""Graphs and builds the LoRA tests share (tests/test_lora.py, tests/test_lora_checkpoints.py)."""

import torch

LORA = {"rank": 4, "alpha": 8}
SEED, BATCH, LR = 3, 4, 0.5
# SGD, as in test_parity: the update is the gradient itself, so TP rounding stays at rounding size.


def lora_vlm(placement="single", lm=LORA, proj=None, vision=None):
    """graphs/vlm at ``placement`` with these ``lora:`` settings per node."""
    from graphs.vlm import vlm
    from mimo_builder._internal.document.graph import Graph

    data = vlm(placement).as_dict()
    data["nodes"]["lm"]["lora"] = lm
    if proj is not None:
        data["nodes"]["proj"]["lora"] = proj
    if vision is not None:
        data["nodes"]["vision"]["lora"] = vision
    return Graph.from_dict({k: v for k, v in data.items()})


def build(graph):
    """``graph`` built on this rank from SEED, DDP-wrapped."""
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.platform import compat

    compat.init_runtime("cpu")
    (model,) = CompositeBuilder(graph, seed=SEED).build_distributed_models(ddp_config=DistributedDataParallelConfig())
    return model


def eval_loss(model, batch):
    """The graph's loss in a forward-only pass."""
    from mimo_builder._internal.runtime.schedule import GraphSchedule

    with torch.no_grad():
        return GraphSchedule(model).evaluate(batch)["lm.loss"]


def adapters(module) -> dict[str, torch.Tensor]:
    """The LoRA parameters of ``module`` by name."""
    return {n: p for n, p in module.named_parameters() if n.endswith(("lora_a", "lora_b"))}
