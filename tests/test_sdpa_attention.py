"""``impl: sdpa``: core attention through PyTorch's scaled_dot_product_attention computes what
MCore's local attention computes: the same loss and gradients for causal (the hybrid
backbone's attention layer, with grouped-query heads) and unmasked (the ViT) attention."""

import pytest
import torch

from multirank import run_ranks

BATCH = 4


def _graph(impl: str, dtype: str):
    from graphs.vlm import vlm
    from mimo_builder._internal.document.graph import Graph

    data = vlm("single").as_dict()
    for name in ("vision", "lm"):
        data["nodes"][name]["config"].update(impl=impl, dtype=dtype)
    data["nodes"]["lm"]["config"]["num_query_groups"] = 2  # 4 query heads share 2 key/value heads
    return Graph.from_dict(data)


def _step(impl: str, dtype: str) -> dict:
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    compat.init_runtime("cpu")
    (model,) = CompositeBuilder(_graph(impl, dtype), seed=2).build_distributed_models(
        ddp_config=DistributedDataParallelConfig())
    kinds = sorted({type(m).__name__ for n in ("vision", "lm") for m in model.chunks(n)[0].modules()
                    if type(m).__name__.endswith("Attention") and "Self" not in type(m).__name__})
    loss = GraphSchedule(model).forward_backward(synthetic_batch(model.valid, BATCH, seed=5))
    grads = {f"{n}.{k}": p.main_grad.float().clone() for n in ("vision", "lm")
             for k, p in model.chunks(n)[0].named_parameters() if "linear_qkv.weight" in k}
    model.close()
    return dict(kinds=kinds, loss=loss, grads=grads)


def _both(dtype: str) -> dict:
    return {impl: _step(impl, dtype) for impl in ("local", "sdpa")}


@pytest.mark.parametrize("dtype, tolerance", [
    ("fp32", 1e-5),   # the same sums in another order
    ("bf16", 2e-2),   # bf16 keeps 8 bits: each softmax weight is rounded to 2^-8 in one path, not the other
])
def test_sdpa_attention_gives_the_local_attentions_loss_and_gradients(dtype, tolerance):
    runs = run_ranks(1, _both, dtype)[0]
    local, sdpa = runs["local"], runs["sdpa"]
    assert local["kinds"] == ["ContextParallelAttention", "DotProductAttention"], local["kinds"]
    assert sdpa["kinds"] == ["SDPAttention"], sdpa["kinds"]
    assert abs(sdpa["loss"] - local["loss"]) <= tolerance * abs(local["loss"]), (sdpa["loss"], local["loss"])
    for key, grad in local["grads"].items():
        diff = float((sdpa["grads"][key] - grad).abs().max())
        assert diff <= tolerance * float(grad.abs().max()), (key, diff)


def test_auto_picks_sdpa_only_where_it_helps():
    from submodels.context_parallel import ContextParallelAttention
    from submodels.sdpa_attention import SDPAttention, core_attention

    assert core_attention("sdpa") is SDPAttention and core_attention("local") is ContextParallelAttention
    assert core_attention("auto") is (SDPAttention if torch.cuda.is_available() else ContextParallelAttention)
