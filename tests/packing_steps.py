"""Rank bodies of the packing tests: the vlm graph's step on variable-length samples, one per row
or packed (run inside rank processes)."""

from __future__ import annotations

BATCH, LR = 6, 0.5
LENGTHS = (48, 20, 33, 17, 40, 25)  # tokens per sample; the rows are 48 wide, seq_length 128


def variable_batch(valid, packed: bool) -> dict:
    """The vlm synthetic batch with each sample cut to its length: after it, padding (id 0, no
    loss). Packed, the batch also brings ``seq_lengths``."""
    import torch

    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    batch = synthetic_batch(valid, BATCH, seed=11)
    lengths = torch.tensor(LENGTHS)
    pad = torch.arange(batch["input_ids"].shape[1])[None] >= lengths[:, None]
    batch["input_ids"] = batch["input_ids"].masked_fill(pad, 0)
    batch["labels"] = batch["labels"].masked_fill(pad, 0)
    batch["loss_mask"] = batch["loss_mask"].masked_fill(pad, 0.0)
    batch.pop("seq_lengths", None)
    if packed:
        batch["seq_lengths"] = lengths
    return batch


def build(graph):
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.platform import compat

    compat.init_runtime("cpu")
    (model,) = CompositeBuilder(graph, seed=3).build_distributed_models(ddp_config=DistributedDataParallelConfig())
    return model


def step(graph, packed: bool, initial: dict | None = None, microbatches: int = 2):
    """One SGD step of ``graph`` (packed: ``graph.packed()``), from ``initial`` full weights where
    given (else the build's, on one rank): the loss, the grad norm, the full weights before and
    after the step of the nodes whose first rank this is."""
    import torch.distributed as dist

    from mimo_builder._internal.assembly.tp_shard import unshard, unwrap
    from mimo_builder._internal.document.optimizer import OptimizerSettings
    from parity_steps import load_initial, sgd_steps

    model = build(graph.packed() if packed else graph)
    if initial is not None:
        load_initial(model, initial)
    params = {n: dict(unwrap(model.chunks(n)[0]).named_parameters()) for n in model.valid.order if model.hosts(n)}
    start = {n: {k: p.detach().clone() for k, p in ps.items()} for n, ps in params.items()}
    before = initial or start  # one rank: its weights are whole
    sgd = OptimizerSettings(optimizer="sgd", lr=LR, clip_grad=1e9, mcore={"sgd_momentum": 0.0})
    run = sgd_steps(model, params, start, variable_batch(model.valid, packed), [microbatches], sgd)[microbatches]
    updated = {}
    for name, ps in params.items():
        tp = model.pg_collection(name).tp
        whole = {k: unshard(p, before[name][k].shape, tp) for k, p in ps.items()}
        if model.valid.layouts[name].coords(dist.get_rank()) == {"tp": 0, "cp": 0, "dp": 0, "pp": 0}:
            updated[name] = whole
    return run["loss"], run["norm"], updated, before
