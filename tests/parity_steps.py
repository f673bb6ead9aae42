"""The step both parity suites take on every placement: the same start, one SGD step per
microbatch count, and what it produced (run inside rank processes)."""

from __future__ import annotations


def sgd_steps(model, params: dict, initial: dict, batch, microbatch_counts, settings) -> dict:
    """For each count in ``microbatch_counts``: copy ``initial`` into ``params`` (node -> name ->
    tensor), zero the gradients, run forward/backward and one step of the graph optimizer with
    ``settings``. Returns count -> loss, grad norm and the updated parameters."""
    import torch

    from mimo_builder._internal.runtime.optim import GraphOptimizer
    from mimo_builder._internal.runtime.schedule import GraphSchedule

    schedule, optimizer = GraphSchedule(model), GraphOptimizer(model, settings)
    runs = {}
    for m in microbatch_counts:
        with torch.no_grad():
            for n, ps in params.items():
                for k, p in ps.items():
                    p.copy_(initial[n][k])
        optimizer.zero_grad()
        loss = schedule.forward_backward(batch, m)
        result = optimizer.step(loss)
        runs[m] = dict(loss=loss, norm=result.grad_norm,
                       updated={n: {k: p.detach().clone() for k, p in ps.items()} for n, ps in params.items()})
    return runs


def load_initial(model, initial: dict) -> None:
    """Copy full (TP=1) weights ``initial`` (node -> name -> tensor) into this rank's shards of every hosted node."""
    from mimo_builder._internal.assembly.tp_shard import load_full_state, unwrap

    for name in model.valid.order:
        if model.hosts(name):
            tp = model.pg_collection(name).tp
            load_full_state(unwrap(model.chunks(name)[0]), initial[name], tp.rank(), tp.size())


def global_params(model, node: str) -> dict:
    """``node``'s parameters on this rank by pipeline-independent names (global layer index)."""
    from mimo_builder._internal.assembly.tp_shard import unwrap

    out = {}
    for chunk in model.chunks(node):
        core = unwrap(chunk)
        for key, param in core.named_parameters():
            parts = key.split(".")
            if parts[:2] == ["decoder", "layers"]:
                parts[2] = str(core.decoder.layers[int(parts[2])].layer_number - 1)
            out[".".join(parts)] = param
    return out
