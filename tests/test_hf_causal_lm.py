"""Whole causal language models: ``import-hf`` of a ``NemotronHForCausalLM`` / ``Mamba2ForCausalLM``
folder writes the one-node graph that reads it; after training, ``export --as nemotron_h`` (or
``mamba2``) writes the folder transformers loads, with the trained model's logits. A pattern the
format cannot hold is named."""


import pytest
import torch
import yaml

from cli_in_process import main_in_process, run_in_process
from multirank import run_ranks

pytestmark = pytest.mark.slow  # ranks and launched runs

VOCAB = 100
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def _save(folder: str) -> None:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.NemotronHConfig(vocab_size=VOCAB, hidden_size=64, layers_block_type=[
        "linear_attention", "full_attention", "mlp", "linear_attention"], num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=96, ssm_state_size=16, mamba_num_heads=8,
        mamba_head_dim=16, n_groups=2)
    tf.NemotronHForCausalLM(config).eval().save_pretrained(folder)


def _compare(doc: str, ckpt: str, out: str) -> float:
    """The largest logit difference between the trained node and the exported folder in transformers,
    relative to the largest logit."""
    import transformers as tf

    from mimo_builder._internal.assembly.trained import build_trained
    from mimo_builder._internal.kinds.loading import load_graph

    with build_trained(load_graph(doc), ckpt) as model, torch.no_grad():
        ours = model.valid.builders["lm"].run(model.chunks("lm")[0].eval(), {"input_ids": IDS})["logits"]
    with torch.no_grad():
        theirs = tf.AutoModelForCausalLM.from_pretrained(out).eval()(IDS, use_cache=False).logits
    return float((ours[..., :VOCAB] - theirs).abs().max() / ours.abs().max())


def test_import_train_export_as_nemotron_h(tmp_path, capfd):
    run_ranks(1, _save, str(tmp_path / "hf"))
    doc = tmp_path / "lm.yaml"
    result = main_in_process("import-hf", str(tmp_path / "hf"), "-o", str(doc))
    assert result.returncode == 0, result.stderr
    lm = yaml.safe_load(doc.read_text())["nodes"]["lm"]["config"]
    assert (lm["hybrid_layer_pattern"], lm["mlp_activation"]) == ("M*-M", "squared_relu")
    result = run_in_process(capfd, "run", str(doc), "--steps", "2", "--batch-size", "2", "--save", str(tmp_path / "ckpt"))
    assert result.returncode == 0, result.stderr
    # what init: loaded: the embedding, 2 x 9 of the Mamba layers, 5 of attention, 3 of the MLP, 2 at the end
    assert f"node 'lm': 29 tensors from hf:{tmp_path / 'hf'} (NemotronHForCausalLM)" in result.stdout, result.stdout
    result = main_in_process("export", str(doc), "--load", str(tmp_path / "ckpt"), "-o", str(tmp_path / "out"),
                             "--as", "mamba2")
    assert result.returncode == 2 and "node 'lm' hybrid_layer_pattern is written as nemotron_h, not mamba2" in \
        result.stderr, result.stderr
    result = main_in_process("export", str(doc), "--load", str(tmp_path / "ckpt"), "-o", str(tmp_path / "out"),
                             "--as", "nemotron_h")
    assert result.returncode == 0, result.stderr
    assert run_ranks(1, _compare, str(doc), str(tmp_path / "ckpt"), str(tmp_path / "out"))[0] <= 1e-5


def test_export_as_a_causal_lm_names_a_graph_of_several_nodes(tmp_path):
    doc = tmp_path / "vlm.yaml"
    doc.write_text(open("graphs/vlm.yaml").read())
    result = main_in_process("export", str(doc), "--load", str(tmp_path / "none"), "-o", str(tmp_path / "o"),
                             "--as", "nemotron_h")
    assert result.returncode == 2, result.stderr
    assert "export --as nemotron_h: the model is one 'mamba' node; the graph has {'vision': 'vision'" in result.stderr

