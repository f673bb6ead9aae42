"""``mimo-builder generate FILE --load DIR --data MODULE:FUNCTION`` (or ``--prompt TEXT [--image
PATH] [--audio PATH]``): answers a trained graph generates for the prompts of a dataset (or one
prompt), each printed with its prompt, and the exact-match share where the samples hold answers."""

from __future__ import annotations

import dataclasses

import torch.distributed as dist

from mimo_builder._internal.assembly.trained import build_trained
from mimo_builder._internal.checkpoint.files import read_manifest, resolve
from mimo_builder._internal.data.collate import reference_answer
from mimo_builder._internal.data.graph_tokenizer import graph_tokenizer
from mimo_builder._internal.data.prompt import PromptRequest
from mimo_builder._internal.data.spec import GraphData, load_data, load_tokenizer
from mimo_builder._internal.data.tokenizer import ByteTokenizer
from mimo_builder._internal.document.graph import Graph
from mimo_builder._internal.platform.cpu_rng import offset_seed
from mimo_builder._internal.kinds.registry import active_registry, allow_modules, allowed_prefixes, import_roots
from mimo_builder._internal.runtime.generation import GenerationOptions, generating_node
from mimo_builder._internal.runtime.schedule import GraphSchedule

DEFAULT_NEW_TOKENS = 32
"""``--max-new-tokens`` when not given (or the generating node's seq_length where smaller)."""


def generate_answers(graph: Graph, load: str, data_ref: str | PromptRequest, options: GenerationOptions, batch_size: int,
                     samples: int, allowed: tuple[str, ...] = (), roots: tuple[str, ...] = (),
                     image_root: str | None = None, tokenizer: str | None = None) -> list[str]:
    """Run in every rank; on rank 0 the lines to print (one per sample, then the share right).
    ``allowed`` and ``roots``: the launcher's module allowlist and import roots (as ``train``);
    ``image_root`` and ``tokenizer``: for ``llava:`` data and a prompt (``--image-root``, ``--tokenizer``)."""
    allow_modules(*allowed)  # a spawned rank starts with the default allowlist
    active_registry().add_roots(*roots)
    with build_trained(graph, load) as model:
        data = _data(data_ref, model.valid, image_root, tokenizer)
        steps = max(1, -(-samples // batch_size))
        loader = data.loader(model.valid, dist.get_rank(), batch_size, last_step=steps, shuffle=False, generation=True)
        schedule, tokenizer = GraphSchedule(model), data.tokenizer
        if options.eos_id is None:
            options = dataclasses.replace(options, eos_id=tokenizer.eos_id)
        lines, right, counted = [], 0, 0
        for step, batch in loader:
            new = schedule.generate(batch, options.max_new_tokens, temperature=options.temperature,
                                    top_k=options.top_k, seed=offset_seed(options.seed, step), eos_id=options.eos_id,
                                    pad_id=tokenizer.pad_id)
            if new is None:
                continue
            for row, tokens in enumerate(new.tolist()):
                index = (step - 1) * batch_size + row
                if index >= samples:
                    break
                text = tokenizer.decode([t for t in tokens if t >= 0 and t != options.eos_id])
                answer = _answer(data, index)
                right, counted = right + (answer == text), counted + (answer is not None)
                lines.append(f"sample {index}: {_asked(data, index)}{text!r}"
                             + (f" (answer {answer!r})" if answer is not None else ""))
    if dist.get_rank() != 0:
        return []
    return lines + ([f"exact match: {right / counted:.1%} of {counted} samples"] if counted else [])


def _data(ref: str | PromptRequest, valid, image_root: str | None, tokenizer: str | None) -> GraphData:
    """The GraphData of ``--data`` or of ``--prompt`` (one sample)."""
    if isinstance(ref, PromptRequest):
        words = load_tokenizer(tokenizer) if tokenizer else graph_tokenizer(valid.graph) or ByteTokenizer()
        return GraphData([ref.sample(valid, words)], words, num_workers=0)
    return load_data(ref, "--data", valid, image_root=image_root, tokenizer=tokenizer)


def _asked(data, index: int) -> str:
    """``prompt TEXT -> `` for a sample of a map-style dataset (its last user turn in a conversation)."""
    if hasattr(data.dataset, "samples"):
        return ""
    sample = data.dataset[index]
    text = sample.get("prompt") if isinstance(sample, dict) else None
    messages = sample.get("messages") if isinstance(sample, dict) else None
    if isinstance(messages, list):
        users = [t.get("content") for t in messages if isinstance(t, dict) and t.get("role") == "user"]
        text = users[-1] if users else None
    return f"prompt {text!r} -> " if isinstance(text, str) else ""


def _answer(data, index: int) -> str | None:
    """The sample's answer text (its ``answer``, or its final assistant turn), where a map-style
    dataset gives it."""
    if hasattr(data.dataset, "samples"):
        return None
    return reference_answer(data.dataset[index])


def _max_new_tokens(valid, node: str, asked: int | None) -> int:
    """``--max-new-tokens``: new tokens take positions after the prompt's, so no more than the
    node's ``seq_length`` (None: DEFAULT_NEW_TOKENS, or ``seq_length`` where smaller)."""
    from mimo_builder._internal.errors import ConfigError

    seq_length = getattr(valid.configs[node], "seq_length", None)
    if asked is None:
        return min(DEFAULT_NEW_TOKENS, seq_length or DEFAULT_NEW_TOKENS)
    if seq_length is not None and asked > seq_length:
        raise ConfigError(f"generate --max-new-tokens {asked}: node '{node}' holds sequences of at most "
                          f"config.seq_length {seq_length} tokens, the prompt's included; give at most {seq_length}")
    return asked


def _check_samples(data, samples: int) -> None:
    """``--samples`` names the dataset's first samples: no more than it has (a stream is not counted)."""
    from mimo_builder._internal.errors import ConfigError

    if not hasattr(data.dataset, "samples") and samples > len(data.dataset):
        raise ConfigError(f"generate --samples {samples}: the --data dataset has {len(data.dataset)} samples; "
                          f"give at most {len(data.dataset)}")


def run_generate(graph: Graph, args) -> list[str]:
    """Check the request before any rank starts (options, checkpoint, data), then generate on
    ``args.nproc`` ranks (default: the checkpoint's world size)."""
    from mimo_builder._internal.checkpoint.checkpointer import check_resumable
    from mimo_builder._internal.errors import ConfigError
    from mimo_builder._internal.platform.launch import launch
    from mimo_builder._internal.validation import validate_graph

    if args.prompt is None and (args.image or args.audio or args.chat):
        raise ConfigError("generate --image, --audio and --chat go with --prompt; --data samples bring their own")
    options = GenerationOptions(args.max_new_tokens or DEFAULT_NEW_TOKENS, args.temperature, args.top_k, args.seed)
    if options.problems():
        raise ConfigError("generate: " + "; ".join(options.problems()))
    nproc = args.nproc or read_manifest(resolve(args.load)).world_size
    valid = validate_graph(graph, nproc)
    node = generating_node(valid)
    options = dataclasses.replace(options, max_new_tokens=_max_new_tokens(valid, node, args.max_new_tokens))
    asked = args.data
    if args.prompt is not None:
        asked = PromptRequest(args.prompt, tuple(args.image), tuple(args.audio), args.chat)
        args.samples = args.batch_size = 1
    data = _data(asked, valid, args.image_root, args.tokenizer)
    data.check(valid, "--prompt" if args.prompt is not None else "--data", generation=True)
    _check_samples(data, args.samples)
    check_resumable(valid, args.load)
    return launch(generate_answers, nproc, graph, args.load, asked, options, args.batch_size, args.samples,
                  allowed_prefixes(), import_roots(), args.image_root, args.tokenizer)[0]
