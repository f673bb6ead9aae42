"""``mimo-builder``: validate | plan | schema | render | run | ckpt.

FILE is a YAML/JSON graph document or ``module:attr`` naming a Python Graph under the allowed
module prefixes (``--allow PREFIX`` trusts more).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from mimo_builder.platform.environment import quiet_dependency_warnings
from mimo_builder.errors import MimoError


def main(argv: list[str] | None = None) -> int:
    """Run one command: 0 on success, 2 with a one-line ``error: ...`` for any named error."""
    quiet_dependency_warnings()
    # stdout carries only the command's output (JSON, tables); log records go to stderr. Set up
    # first: importing Megatron's training module would point the root logger at stdout.
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(levelname)s:%(name)s:%(message)s")
    args = _parser().parse_args(argv)
    args.allow = [*args.allow, *getattr(args, "allow_here", [])]  # --allow before or after the command
    if args.traceback:
        os.environ["MIMO_BUILDER_TRACEBACK"] = "1"  # the ranks inherit it
    from mimo_builder.kinds.registry import default_registry, using

    try:
        # this command's registry: messages speak --allow; packages in the current folder import
        registry = default_registry().derive(allow=args.allow, audience="cli", roots=[os.getcwd()])
        with using(registry):
            code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except MimoError as err:
        if os.environ.get("MIMO_BUILDER_TRACEBACK") == "1":
            import traceback

            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _stdout_closed()


def _stdout_closed() -> int:
    """The reader of stdout went away (``schema | head``): stop quietly, as unix tools do."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # nothing left to flush at exit
    return 128 + 13  # what a shell reports for a tool ended by SIGPIPE


def _count(text: str) -> int:
    """An argparse type: a positive integer (steps, ranks, batch sizes, microbatches)."""
    value = int(text) if text.strip().lstrip("+").isdecimal() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
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


def _writable_folder(path: str, flag: str) -> None:
    """A folder a run will create or write into: none of it may be a file (named before any rank starts)."""
    from pathlib import Path

    from mimo_builder.errors import ConfigError

    for part in (Path(path), *Path(path).parents):
        if part.exists() and not part.is_dir():
            what = "is a file" if part == Path(path) else f"lies under {part}, which is a file"
            raise ConfigError(f"{flag} {path}: {what}; give a folder")


def _memory_size(text: str) -> tuple[int, str]:
    """An argparse type: a memory size in bytes, with the text as the user wrote it."""
    from mimo_builder.planning.estimate import parse_bytes

    try:
        return parse_bytes(text), text.strip()
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mimo-builder", description=__doc__.splitlines()[0])
    parser.add_argument("--allow", action="append", default=[], metavar="PREFIX",
                        help="also accept module:attr references under this module prefix")
    parser.add_argument("--traceback", action="store_true",
                        help="print the full traceback of a failure, a rank's included (also MIMO_BUILDER_TRACEBACK=1)")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check a graph document; exit 0 when valid")
    p.add_argument("file")
    p.add_argument("--world-size", type=_count, help="also check placements for this many ranks")
    _colocate_flag(p)
    p.set_defaults(func=_validate)

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
    _colocate_flag(p)
    p.set_defaults(func=_plan)

    p = sub.add_parser("schema", help="print the JSON Schema of the graph document (node configs checked "
                                      "per builder), or of one builder's config")
    p.add_argument("--builder", metavar="NAME", help="print only this builder's config schema (a registered "
                                                     "name or module:Class)")
    p.set_defaults(func=_schema)

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
    p.set_defaults(func=_render)

    p = sub.add_parser("run", help="train a graph on N ranks (spawned gloo processes, or the current "
                                   "torchrun job), on synthetic data or --data")
    p.add_argument("file")
    p.add_argument("--nproc", type=_count, default=1, help="ranks to spawn (ignored under torchrun)")
    p.add_argument("--steps", type=_count, default=20)
    p.add_argument("--batch-size", type=_count, default=8, help="global batch size")
    p.add_argument("--microbatches", type=_count, default=1)
    p.add_argument("--seed", type=int, help="seeds the weights' initialisation and the order of the training "
                   "samples (default: TrainOptions.seed); a resumed run keeps its data seed")
    p.add_argument("--lr", type=_learning_rate, default=None,
                   help="peak learning rate for every node (default: the document's optimizer.lr)")
    p.add_argument("--data", metavar="MODULE:FUNCTION",
                   help="train on the samples this function's GraphData gives (default: synthetic batches); "
                        "each rank reads only its nodes' shards")
    p.add_argument("--eval-data", metavar="MODULE:FUNCTION",
                   help="held-out GraphData: its loss and accuracy before and after training")
    p.add_argument("--save", metavar="DIR", help="write checkpoints into DIR (the last step always)")
    p.add_argument("--save-interval", type=_count, metavar="N", help="also save every N steps")
    p.add_argument("--save-frozen", action="store_true",
                   help="also save frozen nodes (by default they come back from their init: source)")
    p.add_argument("--load", metavar="DIR", help="resume from DIR (its latest step, or a step folder); "
                                                 "--steps is the step to finish at")
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
    _colocate_flag(p)
    p.set_defaults(func=_run)

    p = sub.add_parser("export", help="write a trained graph's nodes as Hugging Face folders (LoRA merged), "
                                      "with the graph document")
    p.add_argument("file")
    p.add_argument("--load", metavar="DIR", required=True, help="the checkpoint (its latest step, or a step folder)")
    p.add_argument("-o", "--output", metavar="OUT", required=True, help="folder to write: OUT/<node>/, OUT/graph.yaml")
    p.add_argument("--nproc", type=_count, help="ranks to build on (default: the checkpoint's world size)")
    _colocate_flag(p)
    p.set_defaults(func=_export)

    for command in sub.choices.values():
        _allow_flag(command)
    p = sub.add_parser("ckpt", help="checkpoint tools")
    ckpt = p.add_subparsers(required=True, metavar="ACTION")
    p = ckpt.add_parser("inspect", help="print a checkpoint's steps, nodes, placements and sizes")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=_ckpt_inspect)
    return parser


def _allow_flag(parser) -> None:
    parser.add_argument("--allow", action="append", default=[], dest="allow_here", metavar="PREFIX",
                        help="also accept module:attr references under this module prefix (also before the command)")


def _colocate_flag(parser) -> None:
    parser.add_argument("--colocate", action="store_true",
                        help="put every node on all ranks, keeping its tp/cp/pp/ep where they divide the world "
                             "(larger ones shrink): any graph on fewer ranks, e.g. one GPU")


def _load(args, world_size: int | None, lead: bool = True):
    """The document FILE names, spread over ``world_size`` ranks with --colocate (what changed
    goes to stderr)."""
    from mimo_builder.errors import ConfigError
    from mimo_builder.document.graph import colocation_changes
    from mimo_builder.kinds.loading import load_graph

    graph = load_graph(args.file)
    if not args.colocate:
        return graph
    if world_size is None:
        raise ConfigError("--colocate spreads every node over the world: give its size (--world-size N)")
    colocated = graph.colocated(world_size)
    for line in colocation_changes(graph, colocated) if lead else ():
        print(f"colocate: {line} (every node on all {world_size} ranks)", file=sys.stderr)
    return colocated


def _validate(args) -> int:
    from mimo_builder.runtime.synthetic import check_token_budget
    from mimo_builder.validation import validate_graph

    valid = validate_graph(_load(args, args.world_size), args.world_size)
    check_token_budget(valid)
    where = f" for {args.world_size} ranks" if args.world_size else ""
    print(f"{args.file}: valid{where} ({len(valid.order)} nodes: {', '.join(valid.order)}; "
          f"{len(valid.edges)} edges)")
    return 0


def _plan(args) -> int:
    from mimo_builder.planning.estimate import estimate_plan
    from mimo_builder.planning.plan import make_plan
    from mimo_builder.planning.table import pipeline_plan, print_plan

    plan = make_plan(_load(args, args.world_size), args.world_size, count_params=not args.no_params)
    schedule = pipeline_plan(plan, args.microbatches)
    memory, label = args.gpu_memory or (None, None)
    estimates = estimate_plan(plan, schedule, args.micro_batch_size, memory, label)
    if args.json:
        print(_json_lines({**plan.as_dict(estimates), "schedule": _schedule_dict(plan, schedule)}))
    else:
        print_plan(plan, num_microbatches=args.microbatches, schedule=schedule, estimates=estimates)
    return 0


def _schedule_dict(plan, schedule) -> dict:
    num_microbatches = schedule.num_microbatches
    return {"microbatches": num_microbatches, "stages": len(schedule.stages), "slots": schedule.makespan,
            "ranks": [{"rank": r, "operations": [f"{op.kind}:{op.stage.node}:{op.stage.index}:{op.microbatch}"
                                                 for op in schedule.order.get(r, [])],
                       "warmup": schedule.warmup(r), "idle": round(schedule.idle_fraction(r), 4)}
                      for r in range(plan.world_size)]}


def _schema(args) -> int:
    from mimo_builder.kinds.schema import builder_schema, graph_schema

    print(json.dumps(builder_schema(args.builder) if args.builder else graph_schema(), indent=2))
    return 0


def _json_lines(data: dict) -> str:
    """``data`` as JSON, one top-level key per line and one item per line in its lists: readable,
    and written by json's C encoder (``indent`` would take the slow pure-Python one: seconds for
    the 16,384 rank entries of a large plan)."""
    def value(v):
        if isinstance(v, list) and v:
            return "[\n" + ",\n".join(f"    {json.dumps(item)}" for item in v) + "\n  ]"
        return json.dumps(v)
    return "{\n" + ",\n".join(f"  {json.dumps(k)}: {value(v)}" for k, v in data.items()) + "\n}"


def _render(args) -> int:
    from mimo_builder.render import check_request, choose_format, render, write

    fmt = choose_format(args.format, args.json, args.output)
    check_request(fmt, out=args.output, world_size=args.world_size, view=args.view, stdout=sys.stdout)
    data = render(_load(args, args.world_size), fmt, world_size=args.world_size, view=args.view or "both")
    write(data, args.output, sys.stdout)
    if args.output:
        print(f"wrote {args.output} ({fmt}, {len(data):,} bytes)", file=sys.stderr)
    return 0


def _run(args) -> int:
    import os
    import time

    from mimo_builder.platform.launch import launch, under_torchrun
    from mimo_builder.planning.plan import make_plan
    from mimo_builder.planning.table import print_plan
    from mimo_builder.data.spec import load_data
    from mimo_builder.kinds.registry import allowed_prefixes
    from mimo_builder.runtime.monitor import check_tensorboard
    from mimo_builder.errors import ConfigError
    from mimo_builder.runtime.batch import split_problems
    from mimo_builder.runtime.optim import check_runnable
    from mimo_builder.runtime.synthetic import check_synthetic
    from mimo_builder.runtime.train import TrainOptions, train
    from mimo_builder.validation import validate_graph

    nproc = int(os.environ["WORLD_SIZE"]) if under_torchrun() else args.nproc
    lead = os.environ.get("RANK", "0") == "0"
    graph = _load(args, nproc, lead)
    valid = validate_graph(graph, nproc)
    check_runnable(valid)  # before any meta build or process
    problems = split_problems(valid, args.batch_size, args.microbatches)
    if problems:
        raise ConfigError("--batch-size / --microbatches:\n" + "\n".join(f"  - {p}" for p in problems))
    if not args.data:
        check_synthetic(valid)
    for ref, flag in ((args.data, "--data"), (args.eval_data, "--eval-data")):
        if ref:  # named before any rank starts: a typo, a module not allowed, a sample the graph cannot take
            load_data(ref, flag).check(valid, flag)
    _check_has_loss(graph)
    _check_checkpoint_args(args, valid)
    if args.tensorboard:
        check_tensorboard()
    plan = make_plan(graph, nproc)
    if lead:
        print_plan(plan, num_microbatches=args.microbatches)
    options = TrainOptions(steps=args.steps, batch_size=args.batch_size, num_microbatches=args.microbatches,
                           lr=args.lr, save=args.save, save_interval=args.save_interval, save_frozen=args.save_frozen,
                           load=args.load, step_timeout_s=args.step_timeout,
                           first_step_timeout_s=args.first_step_timeout,
                           log_interval=args.log_interval, tensorboard=args.tensorboard,
                           data=args.data, eval_data=args.eval_data,
                           allowed_modules=allowed_prefixes(),  # --allow reaches every rank
                           **({} if args.seed is None else {"seed": args.seed}))
    start = time.perf_counter()
    losses = launch(train, nproc, graph, options)[0]
    if lead and not losses:
        print(f"done: nothing to run, the checkpoint is at or past step {args.steps}")
    elif lead:
        print(f"done: {len(losses)} steps on {nproc} ranks in {time.perf_counter() - start:.1f} s; "
              f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return 0


def _check_has_loss(graph) -> None:
    """Training needs a loss: an output on a port named 'loss' (validate/plan accept graphs without one)."""
    from mimo_builder.errors import ConfigError, clip
    from mimo_builder.document.graph import parse_port_ref

    if not any(parse_port_ref(ref)[1] == "loss" for ref in graph.outputs):
        shown = clip(", ".join(graph.outputs), 200) or "none"
        raise ConfigError(f"outputs: run trains on the graph's loss outputs ('node.loss'), but the outputs are "
                          f"{shown}; add the loss port of a node (e.g. 'lm.loss') under 'outputs'")


def _check_checkpoint_args(args, valid) -> None:
    from mimo_builder.checkpoint.checkpointer import check_resumable
    from mimo_builder.errors import ConfigError

    if (args.save_interval is not None or args.save_frozen) and not args.save:
        raise ConfigError("--save-interval and --save-frozen need --save DIR")
    if args.load:  # a missing folder, a bad manifest, another graph or a damaged shard: before any rank starts
        from mimo_builder.runtime.train import TrainOptions

        check_resumable(valid, args.load, TrainOptions.seed if args.seed is None else args.seed)
    for folder, flag in ((args.save, "--save"), (args.tensorboard, "--tensorboard")):
        if folder:
            _writable_folder(folder, flag)


def _export(args) -> int:
    from mimo_builder.hf.graph_export import export

    if args.colocate and not args.nproc:
        raise MimoError("export --colocate needs --nproc N (the ranks to spread every node over)")
    for line in export(_load(args, args.nproc), args.load, args.output, args.nproc):
        print(line)
    return 0


def _ckpt_inspect(args) -> int:
    from mimo_builder.checkpoint.inspect import describe

    print(describe(args.dir, as_json=args.json))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
