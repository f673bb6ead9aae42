"""``tokenizer: {hf: DIR}`` / ``{bytes: {}}`` in the document: validate checks the text node's
vocabulary against it and looks up placeholder ids named by token; data without its own
tokenizer takes it; export copies it next to the weights."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from mimo_builder import train_chat_tokenizer

    texts = [f"How many digits? {i} plus {i + 1}" for i in range(200)]
    return train_chat_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=300, tags=("<image>",))


def _graph(tokenizer, token="<image>", vocab=300):
    from graphs.vlm import vlm

    graph = vlm("single")
    graph.nodes["lm"].config = {**graph.nodes["lm"].config, "vocab_size": vocab,
                                "modality_token_ids": {"image": token}}
    return type(graph).model_validate({**graph.model_dump(), "tokenizer": tokenizer})


def test_placeholders_named_by_token_take_the_tokenizers_id(folder):
    from mimo_builder import validate

    valid = validate(_graph({"hf": str(folder)}), 1)
    assert valid.configs["lm"].modality_token_ids == {"image": 4}  # after the 4 special tokens
    assert valid.builders["lm"].mimo_special_token_ids() == {"image": 4}


@pytest.mark.parametrize("tokenizer, token, vocab, message", [
    ("hf", "<image>", 200, r"node 'lm' config.vocab_size 200 is smaller than the graph's tokenizer \(\d+ ids\)"),
    ("hf", "<video>", 300, r"node 'lm' config names the token '<video>', which the graph's tokenizer does not hold"),
    (None, "<image>", 300, r"node 'lm' config names the token '<image>'; give the graph a tokenizer"),
    ({"bytes": {}}, "<image>", 300, r"the byte tokenizer names no tokens: give its id"),
    ({"hf": "/no/such/folder"}, 1, 300, r"tokenizer.hf: '/no/such/folder' is not a folder"),
])
def test_a_tokenizer_the_graph_cannot_use_is_named(folder, tokenizer, token, vocab, message):
    from mimo_builder import GraphError, validate

    spec = {"hf": str(folder)} if tokenizer == "hf" else tokenizer
    with pytest.raises(GraphError, match=message):
        validate(_graph(spec, token, vocab), 1)


def test_exactly_one_kind_of_tokenizer():
    from mimo_builder import ConfigError, Graph

    with pytest.raises(ConfigError, match=r"exactly one of 'hf: DIR'"):
        Graph.from_dict({"nodes": {}, "tokenizer": {}}, where="doc")


def test_data_without_a_tokenizer_takes_the_graphs(folder):
    from mimo_builder import ByteTokenizer, GraphData, HFTokenizer, validate

    valid = validate(_graph({"hf": str(folder)}), 1)
    assert isinstance(GraphData([]).words(valid), HFTokenizer)
    assert isinstance(GraphData([], ByteTokenizer()).words(valid), ByteTokenizer)  # the data's own wins
    bytes_graph = validate(_graph({"bytes": {"eos_id": 2}}, 1, 300), 1)
    assert GraphData([]).words(bytes_graph) == ByteTokenizer(eos_id=2)


def test_export_copies_the_tokenizer_and_names_the_copy(folder, tmp_path):
    from mimo_builder._internal.hf.graph_export import _with_tokenizer

    graph = _with_tokenizer(_graph({"hf": str(folder)}), tmp_path)
    assert graph.tokenizer.hf == str(tmp_path / "tokenizer")
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()
