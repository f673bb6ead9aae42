"""The graph's own tokenizer (``tokenizer:`` in the document): loading it, naming placeholder ids
by their token, and the text node's vocabulary checked against it."""

from __future__ import annotations

from mimo_builder._internal.data.tokenizer import ByteTokenizer, load_tokenizer
from mimo_builder._internal.errors import ConfigError


def graph_tokenizer(graph):
    """The tokenizer ``graph.tokenizer`` names (None without one)."""
    spec = graph.tokenizer
    if spec is None:
        return None
    if spec.bytes is not None:
        try:
            return ByteTokenizer(spec.bytes.reserved, spec.bytes.pad_id, spec.bytes.eos_id)
        except ValueError as err:
            raise ConfigError(f"tokenizer.bytes: {err}") from None
    try:
        return load_tokenizer(spec.hf)
    except ConfigError as err:
        raise ConfigError(f"tokenizer.hf: {str(err).removeprefix('--tokenizer ')}") from None


def token_lookup(tokenizer, where: str):
    """``lookup(name) -> id`` for a token named in a config (a ConfigError naming ``where`` for a
    name the tokenizer does not hold as one token)."""
    def lookup(name: str) -> int:
        hf = getattr(tokenizer, "tokenizer", None)
        if tokenizer is None:
            raise ConfigError(f"{where} names the token {name!r}; give the graph a tokenizer ({{hf: DIR}}) "
                              f"to look it up, or give its id")
        if hf is None:
            raise ConfigError(f"{where} names the token {name!r}; the byte tokenizer names no tokens: give its id")
        token = hf.convert_tokens_to_ids(name)
        if token is None or (token == hf.unk_token_id and name != hf.unk_token):
            raise ConfigError(f"{where} names the token {name!r}, which the graph's tokenizer does not hold as one "
                              f"token (add it as a special token, or give its id)")
        return int(token)
    return lookup


def vocabulary_problems(graph, configs: dict, text_node: str | None, tokenizer) -> list[str]:
    """The text node's ``vocab_size`` must cover the tokenizer's ids."""
    if tokenizer is None or text_node is None or text_node not in configs:
        return []
    size = getattr(configs[text_node], "vocab_size", None)
    if size is not None and size < tokenizer.vocab_size:
        return [f"node '{text_node}' config.vocab_size {size} is smaller than the graph's tokenizer ({tokenizer.vocab_size} "
                f"ids): raise vocab_size to at least {tokenizer.vocab_size}"]
    return []
