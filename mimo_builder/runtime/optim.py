"""One optimizer step for a whole graph: per-node DDP sync, one global grad-norm clip, per-node
optimizers. Frozen nodes have no gradients, no DDP buffers and no optimizer."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist

from mimo_builder.placement import control_group
from mimo_builder.walker import CompositeModel

OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def adamw(lr: float = 1e-3, weight_decay: float = 0.0) -> OptimizerFactory:
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class GraphOptimizer:
    """Torch optimizers over each hosted, trainable node, fed from MCore DDP's ``main_grad``."""

    def __init__(self, model: CompositeModel, make_optimizer: OptimizerFactory = adamw(), clip_grad: float = 1.0):
        self.model = model
        self.clip_grad = clip_grad
        self.control = control_group()
        self.params = {name: [p for chunk in model.chunks(name) for p in chunk.parameters() if p.requires_grad]
                       for name in model.valid.order if model.hosts(name)}
        self.optimizers = {name: make_optimizer(params) for name, params in self.params.items() if params}

    def zero_grad(self) -> None:
        for name in self.optimizers:
            for chunk in self.model.chunks(name):
                chunk.zero_grad_buffer()
            for p in self.params[name]:
                p.grad = None

    def step(self) -> float:
        """Sync gradients inside each node's DP group, clip by the graph-wide norm, step.
        Returns the norm before clipping."""
        for name in self.model.valid.order:  # one global order: no deadlock across nodes
            if name in self.optimizers:
                for chunk in self.model.chunks(name):
                    chunk.finish_grad_sync()
                for p in self.params[name]:
                    p.grad = p.main_grad.to(p.dtype)
        norm = self._global_norm()
        if self.clip_grad and norm > self.clip_grad:
            for params in self.params.values():
                for p in params:
                    p.grad.mul_(self.clip_grad / (norm + 1e-6))
        for optimizer in self.optimizers.values():
            optimizer.step()
        return norm

    def _global_norm(self) -> float:
        """L2 norm over every parameter of the graph, each shard counted once."""
        squares = torch.zeros(1, dtype=torch.float64)
        for name, params in self.params.items():
            coords = self.model.valid.layouts[name].coords(dist.get_rank())
            if coords["dp"] or coords["cp"]:
                continue  # DP/CP replicas hold the same synced gradients
            for p in params:
                if getattr(p, "tensor_model_parallel", False) or coords["tp"] == 0:
                    squares += p.grad.double().pow(2).sum()
        dist.all_reduce(squares, group=self.control)
        return math.sqrt(float(squares))
