"""The run-time port contract: a node whose forward breaks its declared output port is named at
that node, with the shape it returned and the shape its port declares, before anything
downstream sees the tensor."""

from typing import Literal

import pytest
import torch

from mimo_builder._internal.kinds.builder import ModelBuilder, Port, Ports
from mimo_builder._internal.kinds.config import ModelConfig
from multirank import run_ranks

HERE = __name__  # the module prefix the kind below is allowed under
HIDDEN, TOKENS, BATCH = 16, 4, 2


class EncoderConfig(ModelConfig):
    builder: str = f"{HERE}:Encoder"
    """Builder of this node."""

    mistake: Literal["none", "features", "transposed", "tuple", "tokens", "missing"] = "none"
    """How this node's forward breaks its port."""


class Encoder(ModelBuilder):
    """Token features [B, 4, 8] -> embeddings [B, 4, HIDDEN], or one mistake."""

    config_class = EncoderConfig

    def ports(self):
        return Ports.of([Port("features", ("batch", "tokens", "raw"), 8)],
                        [Port("embeddings", ("batch", "tokens", "hidden"), HIDDEN)])

    def output_tokens(self, input_tokens):
        return {"embeddings": input_tokens.get("features", TOKENS)}

    def synthetic_inputs(self, batch_size, generator, tokens):
        return {"features": torch.randn((batch_size, TOKENS, 8), generator=generator)}

    def build_model(self, pg_collection, pre_process=None, post_process=None, vp_stage=None):
        return torch.nn.Linear(8, 2 * HIDDEN)

    def run(self, model, inputs):
        out = model(inputs["features"])
        mistake = self.config.mistake
        if mistake == "features":
            return {"embeddings": out}  # 2 * HIDDEN features: the backbone would take it silently
        out = out[..., :HIDDEN]
        return {"none": {"embeddings": out}, "transposed": {"embeddings": out.transpose(0, 1)},
                "tuple": {"embeddings": (out, None)}, "tokens": {"embeddings": out[:, 1:]},
                "missing": {"other": out}}[mistake]


def _graph(mistake: str):
    from mimo_builder._internal.document.graph import Graph

    lm = dict(builder="mamba", num_layers=2, hidden_size=HIDDEN, num_attention_heads=4, hybrid_layer_pattern="M-",
              vocab_size=64, make_vocab_size_divisible_by=1, seq_length=32, mamba_state_dim=16, mamba_head_dim=16,
              mamba_num_groups=2, modality_token_ids={"image": 1})
    graph = Graph().add("encoder", {"builder": f"{HERE}:Encoder", "mistake": mistake}).add("lm", lm)
    graph.connect("encoder.embeddings", "lm.image").bind("features", "encoder.features")
    for key in ("input_ids", "labels", "loss_mask"):
        graph.bind(key, f"lm.{key}")
    return graph.output("lm.loss")


def _steps(mistakes: list[str]) -> dict[str, str]:
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.kinds.registry import Registry, using
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    compat.init_runtime("cpu")
    out = {}
    with using(Registry((HERE,))):
        for mistake in mistakes:
            (model,) = CompositeBuilder(_graph(mistake)).build_distributed_models(
                ddp_config=DistributedDataParallelConfig())
            try:
                loss = GraphSchedule(model).forward_backward(synthetic_batch(model.valid, BATCH, seed=1))
                out[mistake] = f"trained: loss {loss:.3f}"
            except Exception as err:  # noqa: BLE001 - the message is what the test reads
                out[mistake] = f"{type(err).__name__}: {err}"
            model.close()
    return out


MISTAKES = {
    "none": "trained",
    "features": f"node 'encoder' forward (microbatch 0): PortContractError: output 'embeddings' has shape "
                f"[{BATCH}, {TOKENS}, {2 * HIDDEN}] but its port declares [batch {BATCH}, tokens {TOKENS}, hidden {HIDDEN}]",
    "transposed": f"output 'embeddings' has shape [{TOKENS}, {BATCH}, {HIDDEN}] but its port declares "
                  f"[batch {BATCH}, tokens {TOKENS}, hidden {HIDDEN}]",
    "tuple": "output 'embeddings' is a tuple, not a tensor (a module returning (output, extra)?",
    "tokens": f"output 'embeddings' has shape [{BATCH}, {TOKENS - 1}, {HIDDEN}] but its port declares "
              f"[batch {BATCH}, tokens {TOKENS}, hidden {HIDDEN}]",
    "missing": "run() returned ['other'] without output 'embeddings', which feeds another node",
}


@pytest.fixture(scope="module")
def results():
    return run_ranks(1, _steps, list(MISTAKES))[0]


@pytest.mark.parametrize("mistake", MISTAKES)
def test_a_broken_output_port_is_named_at_the_producing_node(results, mistake):
    message = results[mistake]
    assert MISTAKES[mistake] in message, message
    if mistake != "none":
        assert "node 'encoder'" in message and "node 'lm'" not in message, message
