"""``mimo-builder export FILE --load DIR -o OUT``: the trained nodes as folders transformers loads
(LoRA adapters merged), plus the graph document; nodes without a counterpart are named."""

import torch
import yaml

from cli_in_process import main_in_process
from multirank import run_ranks

MAMBA = dict(builder="mamba", num_layers=2, hybrid_layer_pattern="MM", hidden_size=64, num_attention_heads=1,
             vocab_size=100, seq_length=32, mamba_state_dim=16, mamba_head_dim=16, mamba_num_groups=2,
             mamba_num_heads=8)
IDS = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))


def _graph():
    from mimo_builder._internal.document.graph import Graph

    graph = Graph().add("lm", MAMBA, lora={"rank": 4, "alpha": 8})
    return graph.bind("input_ids", "lm.input_ids").output("lm.logits")


def _trained_checkpoint(root: str) -> torch.Tensor:
    """Build, give the adapters values (as training would), save; the node's logits."""
    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.checkpoint import Checkpointer
    from mimo_builder._internal.platform import compat

    compat.init_runtime("cpu")
    (model,) = CompositeBuilder(_graph(), seed=4).build_distributed_models(wrap_with_ddp=False)
    with torch.no_grad():
        for name, p in model.chunks("lm")[0].named_parameters():
            if name.endswith("lora_b"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
        logits = model.valid.builders["lm"].run(model.chunks("lm")[0], {"input_ids": IDS})["logits"][..., :100]
    Checkpointer(model).save(root, 1)
    model.close()
    return logits


def test_export_writes_merged_folders_transformers_loads(tmp_path):
    import transformers

    logits = run_ranks(1, _trained_checkpoint, str(tmp_path / "ckpt"))[0]
    doc = tmp_path / "lm.yaml"
    doc.write_text(_graph().to_yaml())
    out = tmp_path / "out"
    result = main_in_process("export", str(doc), "--load", str(tmp_path / "ckpt"), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert f"node 'lm': {out / 'lm'}" in result.stdout and f"graph document: {out / 'graph.yaml'}" in result.stdout
    assert yaml.safe_load((out / "graph.yaml").read_text())["nodes"]["lm"]["lora"] == {"rank": 4, "alpha": 8.0}
    hf = transformers.Mamba2ForCausalLM.from_pretrained(str(out / "lm")).eval()
    with torch.no_grad():
        got = hf(IDS).logits
    assert float((got - logits).abs().max() / logits.abs().max()) <= 1e-5


def test_export_names_a_bad_checkpoint_and_an_output_that_is_a_file(tmp_path):
    doc = tmp_path / "lm.yaml"
    doc.write_text(_graph().to_yaml())
    result = main_in_process("export", str(doc), "--load", str(tmp_path / "nothing"), "-o", str(tmp_path / "out"))
    assert result.returncode == 2 and "no checkpoint at" in result.stderr and "Traceback" not in result.stderr
