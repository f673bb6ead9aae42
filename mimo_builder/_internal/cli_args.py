"""The ``mimo-builder`` command line's shape: its commands, flags and argument types (no torch or
Megatron-Core import: ``--help`` and argument errors stay instant)."""

from __future__ import annotations

import argparse


def _count(text: str) -> int:
    """An argparse type: a positive integer (steps, ranks, batch sizes, microbatches)."""
    value = int(text) if text.strip().lstrip("+").isdecimal() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _seed(text: str) -> int:
    """An argparse type: an integer in [0, 2**64), the seeds torch's generators take."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**64 - 1 (a generator's seed), got {text!r}")
    return value


def _positive(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text!r}")
    return value


def _seconds(text: str) -> float | None:
    """An argparse type: seconds >= 0; 0 means no limit (None)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}")
    return value or None


def _learning_rate(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _memory_size(text: str) -> tuple[int, str]:
    """An argparse type: a memory size in bytes, with the text as the user wrote it."""
    from mimo_builder._internal.planning.estimate import parse_bytes

    try:
        return parse_bytes(text), text.strip()
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser(commands: dict) -> argparse.ArgumentParser:
    """The ``mimo-builder`` argument parser; ``commands`` maps each command (``"ckpt inspect"`` for the
    subcommand) to the function that runs it."""
    parser = argparse.ArgumentParser(prog="mimo-builder", description="Compose multi-module models on Megatron-Core: validate, plan, draw, train, generate, export.")
    parser.add_argument("--allow", action="append", default=[], metavar="PREFIX",
                        help="also accept module:attr references under this module prefix")
    parser.add_argument("--traceback", action="store_true",
                        help="print the full traceback of a failure, a rank's included (also MIMO_BUILDER_TRACEBACK=1)")
    parser.add_argument("--version", action="version", version=f"mimo-builder {_version()}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check a graph document; exit 0 when valid")
    p.add_argument("file")
    p.add_argument("--world-size", type=_count, help="also check placements for this many ranks")
    _colocate_flag(p)
    p.set_defaults(func=commands["validate"])

    p = sub.add_parser("plan", help="show what every rank would host (no processes started)")
    p.add_argument("file")
    p.add_argument("--world-size", type=_count, required=True)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--no-params", action="store_true", help="skip the meta-device parameter counts")
    p.add_argument("--microbatches", type=_count, default=1, help="microbatches per step, for the schedule")
    p.add_argument("--micro-batch-size", type=_count, default=1, metavar="B",
                   help="samples per microbatch on each DP rank of the node with the most DP ranks "
                        "(a microbatch holds B x lcm(DP sizes) samples), for memory and FLOPs")
    p.add_argument("--gpu-memory", type=_memory_size, metavar="SIZE",
                   help="memory of one GPU (80GB, 80GiB, 512MB, 80e9): flag the ranks that do not fit")
    p.add_argument("--costs", metavar="COSTS.json",
                   help="predict the step time and idle shares from costs `mimo-builder profile` measured")
    p.add_argument("--batch-size", type=_count, default=8, help="global batch size, for --costs (default 8)")
    _workload_flags(p)
    _colocate_flag(p)
    p.set_defaults(func=commands["plan"])

    p = sub.add_parser("profile", help="measure each node's forward, backward and optimizer time, the link and "
                                       "the runtime's own time on this machine: a cost table for plan and place")
    p.add_argument("file")
    p.add_argument("--world-size", type=_count, default=1, help="the world the costs are for (TP sizes up to it)")
    p.add_argument("--batch-size", type=_count, default=8, help="global batch size the document trains with")
    p.add_argument("-o", "--output", metavar="COSTS.json", help="write the cost table here")
    _rounds_flag(p)
    _colocate_flag(p)
    p.set_defaults(func=commands["profile"], launches=True)

    p = sub.add_parser("place", help="search placements (colocated, disjoint, mixed; tp, pp, microbatches) and "
                                     "rank them by predicted step time")
    p.add_argument("file")
    p.add_argument("--world-size", type=_count, required=True)
    p.add_argument("--gpu-memory", type=_memory_size, metavar="SIZE", help="drop placements whose estimate exceeds it")
    p.add_argument("--costs", metavar="COSTS.json", help="measured costs (default: profile this machine first)")
    p.add_argument("--batch-size", type=_count, default=8, help="global batch size (default 8)")
    p.add_argument("--top", type=_count, default=5, help="how many placements to show (default 5)")
    p.add_argument("-o", "--output", metavar="BEST.yaml", help="write the best placement as a document")
    _rounds_flag(p)
    _workload_flags(p)
    p.set_defaults(func=commands["place"])

    p = sub.add_parser("schema", help="print the JSON Schema of the graph document (node configs checked "
                                      "per builder), or of one builder's config")
    p.add_argument("--builder", metavar="NAME", help="print only this builder's config schema (a registered "
                                                     "name or module:Class)")
    p.set_defaults(func=commands["schema"])

    p = sub.add_parser("render", help="the document as YAML/JSON, or pictures of the graph and its placement")
    p.add_argument("file")
    p.add_argument("--format", metavar="{yaml,json,dot,mermaid,svg,png}",
                   help="default: from -o's suffix, else yaml; dot/mermaid draw the graph, svg/png the graph "
                        "and the placement grid")
    p.add_argument("-o", "--output", metavar="OUT",
                   help="write to OUT (default: stdout; svg/png need it on a terminal)")
    p.add_argument("--world-size", type=_count, metavar="N", help="ranks to place on (default: the smallest world the "
                                                     "placements need)")
    p.add_argument("--view", metavar="{graph,placement,both}", help="what svg/png show (default: both)")
    p.add_argument("--json", action="store_true", help="the same as --format json")
    _colocate_flag(p)
    p.set_defaults(func=commands["render"])

    p = sub.add_parser("run", help="train a graph on N ranks (spawned gloo processes, or the current "
                                   "torchrun job), on synthetic data or --data")
    p.add_argument("file")
    p.add_argument("--nproc", type=_count, default=1, help="ranks to spawn (ignored under torchrun)")
    p.add_argument("--steps", type=_count, default=20)
    p.add_argument("--batch-size", type=_count, default=8, help="global batch size")
    p.add_argument("--microbatches", type=_count, default=1)
    p.add_argument("--seed", type=_seed, help="seeds the weights' initialisation and the order of the training "
                   "samples (default: TrainOptions.seed); a resumed run keeps its data seed")
    p.add_argument("--lr", type=_learning_rate, default=None,
                   help="peak learning rate for every node (default: the document's optimizer.lr)")
    p.add_argument("--data", metavar="MODULE:FUNCTION|llava:JSON",
                   help="train on the samples this function's GraphData gives, or a LLaVA-format JSON/JSONL "
                        "file's (default: synthetic batches); each rank reads only its nodes' shards")
    p.add_argument("--eval-data", metavar="MODULE:FUNCTION|llava:JSON",
                   help="held-out GraphData: its loss and accuracy before and after training")
    p.add_argument("--eval-interval", type=_count, metavar="N",
                   help="also evaluate --eval-data every N steps during training")
    _llava_flags(p)
    p.add_argument("--pack", action="store_true",
                   help="pack the backbone's samples several to a row of its seq_length (the batch binds "
                        "seq_lengths to the node that reads input_ids)")
    p.add_argument("--save", metavar="DIR", help="write checkpoints into DIR (the last step always)")
    p.add_argument("--save-interval", type=_count, metavar="N", help="also save every N steps")
    p.add_argument("--save-interval-minutes", type=_positive, metavar="M",
                   help="also save once M minutes of wall time passed since the last save (rank 0's clock)")
    p.add_argument("--save-frozen", action="store_true",
                   help="also save frozen nodes (by default they come back from their init: source)")
    p.add_argument("--async-save", action="store_true",
                   help="write each save but the last in the background while training goes on (MCore's async "
                        "save: a forked writer); a step is published once every rank's writer is done")
    p.add_argument("--load", metavar="DIR", help="resume from DIR (its latest step, or a step folder); "
                                                 "--steps is the step to finish at")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest complete step under --save DIR if there is one, else start "
                        "fresh (the same command starts and resumes a job)")
    p.add_argument("--step-timeout", type=_seconds, default=60.0, metavar="S",
                   help="end the run, naming the silent ranks, when a step phase makes no progress for "
                        "S seconds (default 60; 0: no limit)")
    p.add_argument("--first-step-timeout", type=_seconds, default=600.0, metavar="S",
                   help="the same for the first step, which compiles and warms up (default 600)")
    p.add_argument("--log-interval", type=_count, metavar="N",
                   help="print a summary (means, each node's time split) every N steps "
                        "(default: about 50 lines per run)")
    p.add_argument("--tensorboard", metavar="DIR",
                   help="write every step's scalars for TensorBoard into DIR (needs the tensorboard extra)")
    p.add_argument("--peak-tflops", type=_positive, metavar="X",
                   help="one device's peak TFLOP/s for the MFU figures (default: the datasheet's for a known "
                        "GPU, e.g. 989 bf16 on H100/H200; none on CPU)")
    _colocate_flag(p)
    p.set_defaults(func=commands["run"], launches=True)

    p = sub.add_parser("generate", help="answers a trained graph generates for a prompt or a dataset's prompts")
    p.add_argument("file")
    p.add_argument("--load", metavar="DIR", required=True, help="the checkpoint (its latest step, or a step folder)")
    asked = p.add_mutually_exclusive_group(required=True)
    asked.add_argument("--data", metavar="MODULE:FUNCTION|llava:JSON", help="GraphData whose prompts to answer, in order")
    asked.add_argument("--prompt", metavar="TEXT", help="one prompt to answer (with --image, --audio)")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image file for --prompt (repeatable; PNG, JPEG: resized and normalised for the vision node)")
    p.add_argument("--audio", action="append", default=[], metavar="PATH",
                   help="a clip's log-mel features [frames, mels] for --prompt (.npy or .pt; repeatable)")
    p.add_argument("--chat", action="store_true",
                   help="--prompt as a user turn of a conversation (the default with a chat-template tokenizer)")
    _llava_flags(p)
    p.add_argument("--max-new-tokens", type=_count, metavar="N",
                   help="new tokens per sample at most (default: 32, or the generating node's seq_length where "
                        "smaller; more than seq_length is refused)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0: sampling")
    p.add_argument("--top-k", type=_count, help="sample among the k most likely tokens")
    p.add_argument("--seed", type=_seed, default=0, help="seeds the sampling")
    p.add_argument("--samples", type=_count, default=8, help="how many samples to answer (default 8)")
    p.add_argument("--batch-size", type=_count, default=8)
    p.add_argument("--nproc", type=_count, help="ranks to build on (default: the checkpoint's world size)")
    _colocate_flag(p)
    p.set_defaults(func=commands["generate"], launches=True)

    p = sub.add_parser("export", help="write a trained graph's nodes as Hugging Face folders (LoRA merged), "
                                      "with the graph document")
    p.add_argument("file")
    p.add_argument("--load", metavar="DIR", required=True, help="the checkpoint (its latest step, or a step folder)")
    p.add_argument("-o", "--output", metavar="OUT", required=True, help="folder to write: OUT/<node>/, OUT/graph.yaml")
    p.add_argument("--nproc", type=_count, help="ranks to build on (default: the checkpoint's world size)")
    p.add_argument("--as", dest="as_format", metavar="FORMAT",
                   help="write the whole model as one Hugging Face folder of this format (e.g. llava) "
                        "instead of a folder per node")
    _colocate_flag(p)
    p.set_defaults(func=commands["export"], launches=True)

    p = sub.add_parser("import-hf", help="write the graph document of a whole Hugging Face model folder "
                                         "(LLaVA, ...): its nodes read the folder")
    p.add_argument("folder", metavar="DIR", help="the Hugging Face model folder (config.json + safetensors)")
    p.add_argument("-o", "--output", metavar="GRAPH.yaml", required=True, help="the graph document to write")
    p.set_defaults(func=commands["import-hf"])

    for command in sub.choices.values():
        _allow_flag(command)
    p = sub.add_parser("ckpt", help="checkpoint tools")
    ckpt = p.add_subparsers(required=True, metavar="ACTION")
    p = ckpt.add_parser("inspect", help="print a checkpoint's steps, nodes, placements and sizes")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=commands["ckpt inspect"])
    return parser


def _allow_flag(parser) -> None:
    parser.add_argument("--allow", action="append", default=[], dest="allow_here", metavar="PREFIX",
                        help="also accept module:attr references under this module prefix (also before the command)")


def _llava_flags(parser) -> None:
    parser.add_argument("--image-root", metavar="DIR", help="folder of llava: data's images (default: the JSON's)")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="Hugging Face tokenizer folder for llava: data or --prompt (default: bytes)")


def _workload_flags(parser) -> None:
    parser.add_argument("--items-per-sample", action="append", default=[], metavar="KEY=SPEC",
                        help="items per sample of a batch key bound to an encoder input (repeatable): a mean "
                             "(pixel_values=3.5) or COUNT:SHARE,... (pixel_values=0:0.2,1:0.5,4:0.3); "
                             "default: one; over --data's counts for the keys it names")
    parser.add_argument("--data", metavar="MODULE:FUNCTION|llava:JSON",
                        help="count the items per sample in this dataset's first --sample-count samples")
    parser.add_argument("--sample-count", type=_count, metavar="N", help="samples of --data to count (default 64)")
    parser.add_argument("--image-root", metavar="DIR", help="folder of llava: data's images (default: the JSON's)")


def _rounds_flag(parser) -> None:
    parser.add_argument("--rounds", type=_count, default=3,
                        help="profile runs per measurement, in fresh processes; each cost is the fastest "
                             "round's and the spread between rounds gives each prediction its range (default 3)")


def _colocate_flag(parser) -> None:
    parser.add_argument("--colocate", action="store_true",
                        help="put every node on all ranks, keeping its tp/cp/pp/ep where they divide the world "
                             "(larger ones shrink): any graph on fewer ranks, e.g. one GPU")


def _version() -> str:
    """The installed distribution's version (single-sourced in pyproject.toml)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mimo-builder")
    except PackageNotFoundError:
        return "unknown (not installed: run ./scripts/bootstrap)"
