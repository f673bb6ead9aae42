"""Optimizer settings of a graph document: graph-wide ``optimizer:`` and per-node overrides.

The settings are plain data. :mod:`mimo_builder._internal.runtime.optim` turns a node's merged settings
into Megatron-Core's ``OptimizerConfig`` (precision and the distributed optimizer come from the
node's model and DDP options, not from here) and an ``OptimizerParamScheduler``::

    optimizer: {lr: 3.0e-4, min_lr: 3.0e-5, warmup_steps: 100, decay_style: cosine}
    nodes:
      vision: {builder: vision, optimizer: {lr: 1.0e-5}}
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mimo_builder._internal.document.types import FiniteNonNegativeFloat, NonNegativeInt, PositiveInt
from mimo_builder._internal.document.options import OPTIMIZER_CONFIG, options_type

OptimizerOptions = options_type(OPTIMIZER_CONFIG)
# OptimizerConfig fields set by named settings, by the node's model (precision) or by its DDP
# options (distributed optimizer); refused in the ``mcore`` passthrough dict.
OWNED_OPTIONS = {"optimizer", "lr", "min_lr", "weight_decay", "clip_grad", "bf16", "fp16", "params_dtype",
                 "use_distributed_optimizer", "timers"}
DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class NodeOptimizer(_Strict):
    """Per-node overrides of the graph-wide optimizer settings (unset fields inherit)."""

    lr: FiniteNonNegativeFloat | None = None
    """Peak learning rate of this node."""

    min_lr: FiniteNonNegativeFloat | None = None
    """Learning rate at the end of the decay for this node."""

    weight_decay: FiniteNonNegativeFloat | None = None
    """Decoupled weight decay of this node (norms and biases get none, as in Megatron)."""

    mcore: OptimizerOptions = Field(default_factory=dict)
    """Other OptimizerConfig options for this node, over the graph-wide ones."""

    def model_post_init(self, __context: Any) -> None:
        """Refuse ``mcore`` options that named fields, the node's dtype or its DDP options set."""
        _refuse_owned(self.mcore)


class OptimizerSettings(_Strict):
    """Graph-wide optimizer, schedule, clipping and non-finite policy."""

    optimizer: Literal["adam", "sgd"] = "adam"
    """Megatron-Core's Adam (decoupled weight decay, i.e. AdamW) or SGD."""

    lr: FiniteNonNegativeFloat = 1e-3
    """Peak learning rate (after warm-up)."""

    min_lr: FiniteNonNegativeFloat = 0.0
    """Learning rate at the end of the decay."""

    weight_decay: FiniteNonNegativeFloat = 0.0
    """Decoupled weight decay (norms and biases get none, as in Megatron)."""

    clip_grad: FiniteNonNegativeFloat = 1.0
    """Clip by one L2 norm over every parameter of the graph; 0 disables clipping."""

    warmup_steps: NonNegativeInt = 0
    """Linear warm-up from 0 to ``lr`` over this many steps."""

    decay_steps: PositiveInt | None = None
    """Steps from the start to the end of the decay (None: the length of the run)."""

    decay_style: Literal[DECAY_STYLES] = "constant"
    """Learning-rate decay after warm-up (MCore's OptimizerParamScheduler styles)."""

    on_nonfinite: Literal["skip", "error"] = "skip"
    """A non-finite loss or grad norm skips the step on every rank, or raises on every rank."""

    mcore: OptimizerOptions = Field(default_factory=dict)
    """Any other OptimizerConfig option by its MCore field name (adam_beta2, sgd_momentum, ...)."""

    def model_post_init(self, __context: Any) -> None:
        """Refuse owned ``mcore`` options, ``min_lr`` above ``lr`` and ``decay_steps`` not after the warm-up."""
        _refuse_owned(self.mcore)
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is larger than lr {self.lr}")
        if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            raise ValueError(f"decay_steps ({self.decay_steps}) must be larger than warmup_steps "
                             f"({self.warmup_steps})")

    def for_node(self, overrides: NodeOptimizer) -> "OptimizerSettings":
        """These settings with a node's overrides applied (checked again as a whole)."""
        update = {k: v for k, v in overrides.model_dump(exclude={"mcore"}).items() if v is not None}
        if overrides.mcore:
            update["mcore"] = {**self.mcore, **overrides.mcore}
        return OptimizerSettings.model_validate({**self.model_dump(), **update})


def _refuse_owned(options: dict[str, Any]) -> None:
    owned = sorted(set(options) & OWNED_OPTIONS)
    if owned:
        raise ValueError(f"mcore: {owned} are set by named fields, by the node's dtype or by its DDP "
                         "options (use_distributed_optimizer), not in the mcore dict")
