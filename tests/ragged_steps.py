"""Rank bodies of the per-token loss tests: the vlm graph's step on ragged samples (loss masks of
very different lengths, three samples without any loss token), under any placement, one sample
per row or packed (run inside rank processes)."""

from __future__ import annotations

from parity_steps import global_params

BATCH, LR = 12, 0.5
LENGTHS = (48, 20, 33, 17, 40, 25, 46, 18, 30, 44, 22, 36)  # tokens per sample; rows are 48 wide
ANSWERS = (31, 1, 12, 1, 20, 2, 30, 1, 6, 0, 0, 0)  # loss tokens per sample: the last ones of it


def ragged_batch(valid, packed: bool) -> dict:
    """The vlm synthetic batch with each sample cut to its length (padding after it: id 0, no loss)
    and its loss mask on its last ``ANSWERS`` tokens only. Packed, it brings ``seq_lengths``."""
    import torch

    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    batch = synthetic_batch(valid, BATCH, seed=11)
    lengths, answers = torch.tensor(LENGTHS), torch.tensor(ANSWERS)
    at = torch.arange(batch["input_ids"].shape[1])[None]
    pad = at >= lengths[:, None]
    batch["input_ids"] = batch["input_ids"].masked_fill(pad, 0)
    batch["labels"] = batch["labels"].masked_fill(pad, 0)
    batch["loss_mask"] = ((at >= (lengths - answers)[:, None]) & ~pad).float()
    batch.pop("seq_lengths", None)
    if packed:
        batch["seq_lengths"] = lengths
    return batch


def _load(model, params: dict, initial: dict) -> None:
    """This rank's TP shard of every full (TP=1) tensor in ``initial`` into ``params``."""
    import torch

    from mimo_builder._internal.assembly.tp_shard import shard

    with torch.no_grad():
        for node, named in params.items():
            tp = model.pg_collection(node).tp
            for key, param in named.items():
                param.copy_(shard(initial[node][key], param, tp.rank(), tp.size()))


def _whole(model, params: dict, initial: dict) -> dict:
    """Every node's full tensors (TP pieces joined; a collective in each TP group) on the node's
    ranks at TP, CP and DP coordinate 0 (each pipeline stage gives its own layers)."""
    import torch.distributed as dist

    from mimo_builder._internal.assembly.tp_shard import unshard

    out = {}
    for node, named in params.items():
        tp = model.pg_collection(node).tp
        whole = {k: unshard(p, initial[node][k].shape, tp) for k, p in sorted(named.items())}
        coords = model.valid.layouts[node].coords(dist.get_rank())
        if coords["tp"] == coords["cp"] == coords["dp"] == 0:
            out[node] = whole
    return out


def build(graph, **ddp):
    """``graph`` built and wrapped on this spawn's ranks from seed 3, with these DDP options."""
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.platform import compat

    compat.init_runtime("cpu")
    (model,) = CompositeBuilder(graph, seed=3).build_distributed_models(ddp_config=DistributedDataParallelConfig(**ddp))
    return model


def ragged_steps(graph, packed: bool, counts, initial: dict | None = None, by_rank: bool = False,
                 overlap: bool = False, batch_of=None) -> dict:
    """From ``initial`` full weights (None: the build's, on one rank), for each microbatch count:
    ``evaluate``'s loss, then one SGD step (no clipping): its loss, grad norm and the full weights
    after it. ``by_rank``: each rank is given only its share of the batch (a RankBatch, as from a
    per-rank loader); ``overlap``: DDP's ``overlap_grad_reduce`` (its grad sync starts from the
    gradient hooks after the first step); ``batch_of(valid, packed)`` makes the global batch (default
    :func:`ragged_batch`). Returns the weights it started from and the runs by count."""
    import torch
    import torch.distributed as dist

    from mimo_builder._internal.document.optimizer import OptimizerSettings
    from mimo_builder._internal.runtime.optim import GraphOptimizer
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.shards import RankBatch

    model = build(graph.packed() if packed else graph, overlap_grad_reduce=overlap)
    params = {n: global_params(model, n) for n in model.valid.order if model.hosts(n)}
    if initial is None:
        initial = {n: {k: p.detach().clone() for k, p in ps.items()} for n, ps in params.items()}
    batch = (batch_of or ragged_batch)(model.valid, packed)
    sgd = OptimizerSettings(optimizer="sgd", lr=LR, clip_grad=1e9, mcore={"sgd_momentum": 0.0})
    schedule, optimizer = GraphSchedule(model), GraphOptimizer(model, sgd)
    runs = {}
    for m in counts:
        _load(model, params, initial)
        feed = RankBatch.from_global(model.valid, batch, dist.get_rank(), m) if by_rank else batch
        evaluated = schedule.evaluate(feed, m)["lm.loss"]
        optimizer.zero_grad()
        loss = schedule.forward_backward(feed, m)
        norm = optimizer.step(loss).grad_norm
        runs[m] = dict(loss=loss, norm=norm, evaluated=evaluated, updated=_whole(model, params, initial))
    model.close()
    assert torch.isfinite(torch.tensor([r["loss"] for r in runs.values()])).all()
    return dict(rank=dist.get_rank(), initial=initial, runs=runs)


def check_runs(results: list[dict], reference: dict, counts, rtol: float) -> None:
    """Every rank's loss and norm, and the union of the ranks' full weights, at every count, equal
    ``reference``'s one-microbatch step (``reference["runs"][1]``) within ``rtol``; ``evaluate``
    gives the same loss; every parameter is compared, and the step moved the backbone."""
    import pytest
    import torch

    expected = reference["runs"][1]
    for m in counts:
        seen = set()
        for r in results:
            got = r["runs"][m]
            for name, value in (("loss", got["loss"]), ("norm", got["norm"]), ("evaluated", got["evaluated"])):
                want = expected["norm" if name == "norm" else "loss"]
                assert value == pytest.approx(want, rel=rtol), (m, r["rank"], name, value)
            for node, params in got["updated"].items():
                for key, value in params.items():
                    want = expected["updated"][node][key]
                    diff = float((value - want).abs().max())
                    assert diff <= rtol * max(float(want.abs().max()), 1e-3), (m, node, key, diff)
                    seen.add((node, key))
        assert seen == {(n, k) for n, ps in expected["updated"].items() for k in ps}, m  # every parameter
    start = reference["initial"]["lm"]
    assert any(not torch.equal(start[k], v) for k, v in expected["updated"]["lm"].items())  # the step moved
