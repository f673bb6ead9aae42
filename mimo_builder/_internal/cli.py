"""``mimo-builder``: validate | plan | schema | render | run | generate | export | ckpt (the
commands; their flags are :mod:`mimo_builder._internal.cli_args`).

FILE is a YAML/JSON graph document or ``module:attr`` naming a Python Graph under the allowed
module prefixes (``--allow PREFIX`` trusts more).
"""

from __future__ import annotations

import json
import logging
import os
import sys

from mimo_builder._internal.platform.environment import quiet_dependency_warnings
from mimo_builder._internal.platform.rank_server import start_early
from mimo_builder._internal.cli_args import build_parser
from mimo_builder._internal.errors import MimoError


def main(argv: list[str] | None = None) -> int:
    """Run one command: 0 on success, 2 with a one-line ``error: ...`` for any named error."""
    quiet_dependency_warnings()
    # stdout carries only the command's output (JSON, tables); log records go to stderr. Set up
    # first: importing Megatron's training module would point the root logger at stdout.
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(levelname)s:%(name)s:%(message)s")
    args = build_parser(_COMMANDS).parse_args(argv)
    args.allow = [*args.allow, *getattr(args, "allow_here", [])]  # --allow before or after the command
    if args.traceback:
        os.environ["MIMO_BUILDER_TRACEBACK"] = "1"  # the ranks inherit it
    if getattr(args, "launches", False):  # its imports overlap this command's own validation
        start_early()
    from mimo_builder._internal.kinds.registry import default_registry, using

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
        code = getattr(err, "exit_code", 2)  # 2 for a mistake; a preempted run has its own
        print(f"{'error' if code == 2 else 'stopped'}: {err}", file=sys.stderr)
        return code
    except BrokenPipeError:
        return _stdout_closed()


def _stdout_closed() -> int:
    """The reader of stdout went away (``schema | head``): stop quietly, as unix tools do."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # nothing left to flush at exit
    return 128 + 13  # what a shell reports for a tool ended by SIGPIPE


def _writable_folder(path: str, flag: str) -> None:
    """A folder a run will create or write into: none of it a file, its nearest existing folder
    writable (named before any rank starts)."""
    from mimo_builder._internal.platform.output_paths import check_folder

    check_folder(path, flag)


def _writable_file(path: str | None, flag: str) -> None:
    """A file a command writes at its end (``-o``), checked before its work starts."""
    from mimo_builder._internal.platform.output_paths import check_file

    if path:
        check_file(path, flag)


def _load(args, world_size: int | None, lead: bool = True):
    """The document FILE names, spread over ``world_size`` ranks with --colocate (what changed
    goes to stderr)."""
    from mimo_builder._internal.errors import ConfigError
    from mimo_builder._internal.document.graph import colocation_changes
    from mimo_builder._internal.kinds.loading import load_graph

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
    from mimo_builder._internal.runtime.synthetic import check_token_budget
    from mimo_builder._internal.validation import validate_graph

    valid = validate_graph(_load(args, args.world_size), args.world_size)
    check_token_budget(valid)
    where = f" for {args.world_size} ranks" if args.world_size else ""
    print(f"{args.file}: valid{where} ({len(valid.order)} nodes: {', '.join(valid.order)}; "
          f"{len(valid.edges)} edges)")
    return 0


def _plan(args) -> int:
    from mimo_builder._internal.planning.estimate import estimate_plan
    from mimo_builder._internal.planning.plan import make_plan
    from mimo_builder._internal.planning.table import pipeline_plan, print_plan

    flags = _workload_flags(args)  # before anything else: a typo costs nothing
    graph = _load(args, args.world_size)
    workload = _workload(args, graph, flags)
    plan = make_plan(graph, args.world_size, count_params=not args.no_params)
    memory, label = args.gpu_memory or (None, None)
    schedule = pipeline_plan(plan, args.microbatches, memory, workload)
    estimates = estimate_plan(plan, schedule, args.micro_batch_size, memory, label, workload)
    lines = _predicted(args, plan.valid, schedule, workload) if args.costs else []
    if args.json:
        print(_json_lines({**plan.as_dict(estimates), "schedule": _schedule_dict(plan, schedule),
                           **({"predicted": lines} if lines else {})}))
    else:
        print_plan(plan, num_microbatches=args.microbatches, schedule=schedule, estimates=estimates)
        for line in lines:
            print(line)
    return 0


def _workload_flags(args):
    """``--items-per-sample`` parsed, and the flags that go with ``--data`` checked."""
    from mimo_builder._internal.errors import ConfigError
    from mimo_builder._internal.planning.workload import Workload

    lone = [flag for flag, value in (("--sample-count", args.sample_count), ("--image-root", args.image_root))
            if value is not None and not args.data]
    if lone:
        raise ConfigError(f"{' and '.join(lone)} go{'es' if len(lone) == 1 else ''} with --data REF "
                          "(the samples to count items in)")
    return Workload.parse(args.items_per_sample)


def _workload(args, graph, flags):
    """The items per sample of ``--data``'s first samples, the flags' over them; None for one item
    per sample everywhere. Checked against ``graph`` before any meta build or profile."""
    from mimo_builder._internal.planning.workload import from_data
    from mimo_builder._internal.validation import validate_graph

    if not flags.counts and not args.data:
        return None
    valid = validate_graph(graph)
    flags.check(valid)
    if not args.data:
        return flags
    return from_data(valid, args.data, args.sample_count or 64, args.image_root).merged(flags)


def _predicted(args, valid, schedule, workload=None) -> list[str]:
    from mimo_builder._internal.errors import ConfigError
    from mimo_builder._internal.planning.commands import prediction_lines
    from mimo_builder._internal.planning.cost_table import CostTable
    from mimo_builder._internal.runtime.batch import split_problems

    costs = CostTable.load(args.costs)
    costs.check_covers(valid.graph, f"--costs {args.costs}")
    problems = split_problems(valid, args.batch_size, args.microbatches)
    if problems:  # the step predicted would be one run refuses
        raise ConfigError("--batch-size / --microbatches:\n" + "\n".join(f"  - {p}" for p in problems))
    return prediction_lines(valid, costs, args.microbatches, args.batch_size, schedule.batched, workload)


def _profile(args) -> int:
    from mimo_builder._internal.planning.commands import profile_command

    _writable_file(args.output, "-o")
    profile_command(_load(args, args.world_size), args.world_size, args.batch_size, args.output, args.rounds)
    return 0


def _place(args) -> int:
    from mimo_builder._internal.kinds.loading import load_graph
    from mimo_builder._internal.planning.commands import place_command, profile_command
    from mimo_builder._internal.planning.cost_table import CostTable

    flags = _workload_flags(args)
    _writable_file(args.output, "-o")
    graph = load_graph(args.file)
    workload = _workload(args, graph, flags)
    if args.costs:
        costs = CostTable.load(args.costs)
        costs.check_covers(graph, f"--costs {args.costs}")
    else:
        costs = profile_command(graph, args.world_size, args.batch_size, None, args.rounds)
    memory = args.gpu_memory[0] if args.gpu_memory else None
    return place_command(graph, args.world_size, costs, args.batch_size, memory, args.top, args.output, workload)


def _schedule_dict(plan, schedule) -> dict:
    num_microbatches = schedule.num_microbatches
    return {"microbatches": num_microbatches, "stages": len(schedule.stages), "slots": schedule.makespan,
            "batched": sorted(schedule.batched),
            "ranks": [{"rank": r, "operations": [f"{op.kind}:{op.stage.node}:{op.stage.index}:{op.microbatch}"
                                                 for op in schedule.order.get(r, [])],
                       "warmup": schedule.warmup(r), "idle": round(schedule.idle_fraction(r), 4)}
                      for r in range(plan.world_size)]}


def _schema(args) -> int:
    from mimo_builder._internal.kinds.schema import builder_schema, graph_schema

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
    from mimo_builder._internal.render import check_request, choose_format, render, write

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

    from mimo_builder._internal.platform.launch import launch
    from mimo_builder._internal.platform.rank_server import under_torchrun
    from mimo_builder._internal.planning.plan import make_plan
    from mimo_builder._internal.planning.table import print_plan
    from mimo_builder._internal.data.spec import load_data
    from mimo_builder._internal.kinds.registry import allowed_prefixes
    from mimo_builder._internal.runtime.monitor import check_tensorboard
    from mimo_builder._internal.errors import ConfigError
    from mimo_builder._internal.runtime.batch import split_problems
    from mimo_builder._internal.runtime.optim import check_runnable, schedule_problems
    from mimo_builder._internal.runtime.synthetic import check_synthetic
    from mimo_builder._internal.runtime.train import TrainOptions, train
    from mimo_builder._internal.validation import validate_graph

    if args.eval_interval is not None and not args.eval_data:  # before reading the document
        raise ConfigError("--eval-interval evaluates the held-out set during training: "
                          "give one with --eval-data MODULE:FUNCTION|llava:JSON")
    nproc = int(os.environ["WORLD_SIZE"]) if under_torchrun() else args.nproc
    lead = os.environ.get("RANK", "0") == "0"
    graph = _load(args, nproc, lead)
    if args.pack:
        graph = graph.packed()
    valid = validate_graph(graph, nproc)
    check_runnable(valid)  # before any meta build or process
    problems = [p for n in valid.order if not graph.nodes[n].frozen
                for p in schedule_problems(n, valid.optimizer_settings(n), args.steps)]
    if problems:
        raise ConfigError("\n".join(problems))
    problems = split_problems(valid, args.batch_size, args.microbatches)
    if problems:
        raise ConfigError("--batch-size / --microbatches:\n" + "\n".join(f"  - {p}" for p in problems))
    if not args.data:
        check_synthetic(valid)
    if (args.image_root or args.tokenizer) and not (args.data or args.eval_data):
        raise ConfigError("--image-root and --tokenizer go with --data or --eval-data llava:JSON")
    for ref, flag in ((args.data, "--data"), (args.eval_data, "--eval-data")):
        if ref:  # named before any rank starts: a typo, a module not allowed, a sample the graph cannot take
            load_data(ref, flag, valid, image_root=args.image_root, tokenizer=args.tokenizer).check(valid, flag)
    _check_has_loss(graph)
    _check_checkpoint_args(args, valid)
    if args.tensorboard:
        check_tensorboard()
    plan = make_plan(graph, nproc)
    if lead:
        print_plan(plan, num_microbatches=args.microbatches)
    options = TrainOptions(steps=args.steps, batch_size=args.batch_size, num_microbatches=args.microbatches,
                           lr=args.lr, save=args.save, save_interval=args.save_interval,
                           save_interval_minutes=args.save_interval_minutes, save_frozen=args.save_frozen,
                           async_save=args.async_save, load=args.load, step_timeout_s=args.step_timeout,
                           first_step_timeout_s=args.first_step_timeout,
                           log_interval=args.log_interval, tensorboard=args.tensorboard,
                           peak_tflops=args.peak_tflops, data=args.data, eval_data=args.eval_data,
                           eval_interval=args.eval_interval,
                           image_root=args.image_root, tokenizer=args.tokenizer,
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
    from mimo_builder._internal.errors import ConfigError, clip
    from mimo_builder._internal.document.graph import parse_port_ref

    if not any(parse_port_ref(ref)[1] == "loss" for ref in graph.outputs):
        shown = clip(", ".join(graph.outputs), 200) or "none"
        raise ConfigError(f"outputs: run trains on the graph's loss outputs ('node.loss'), but the outputs are "
                          f"{shown}; add the loss port of a node (e.g. 'lm.loss') under 'outputs'")


def _check_checkpoint_args(args, valid) -> None:
    from mimo_builder._internal.checkpoint.checkpointer import check_resumable
    from mimo_builder._internal.errors import ConfigError

    if (args.save_interval is not None or args.save_interval_minutes is not None or args.save_frozen
            or args.async_save) and not args.save:
        raise ConfigError("--save-interval, --save-interval-minutes, --save-frozen and --async-save need --save DIR")
    if args.resume:
        args.load = _resume_from(args)
    if args.load:  # a missing folder, a bad manifest, another graph or a damaged shard: before any rank starts
        from mimo_builder._internal.runtime.train import TrainOptions

        check_resumable(valid, args.load, TrainOptions.seed if args.seed is None else args.seed, args.resume)
    for folder, flag in ((args.save, "--save"), (args.tensorboard, "--tensorboard")):
        if folder:
            _writable_folder(folder, flag)


def _resume_from(args) -> str | None:
    """``--resume``: the --save folder when it holds a complete step (its other checks follow as
    for --load), else None (a fresh start); rank 0 says which."""
    from mimo_builder._internal.checkpoint.files import is_project_checkpoint
    from mimo_builder._internal.errors import ConfigError

    if not args.save:
        raise ConfigError("--resume needs --save DIR: it continues from the latest step saved there")
    if args.load:
        raise ConfigError("--resume and --load both name where to start: --resume reads --save DIR, "
                          "--load DIR starts from another folder; give one")
    found = is_project_checkpoint(args.save)
    if os.environ.get("RANK", "0") == "0":
        print(f"--resume: {'a checkpoint' if found else 'no checkpoint yet'} under {args.save}; "
              + ("resuming from its latest step" if found else "starting at step 1"), flush=True)
    return args.save if found else None


def _generate(args) -> int:
    from mimo_builder._internal.runtime.generate_command import run_generate

    if args.colocate and not args.nproc:
        raise MimoError("generate --colocate needs --nproc N (the ranks to spread every node over)")
    for line in run_generate(_load(args, args.nproc), args):
        print(line)
    return 0


def _export(args) -> int:
    from mimo_builder._internal.hf.graph_export import export

    if args.colocate and not args.nproc:
        raise MimoError("export --colocate needs --nproc N (the ranks to spread every node over)")
    for line in export(_load(args, args.nproc), args.load, args.output, args.nproc, as_format=args.as_format):
        print(line)
    return 0


def _import_hf(args) -> int:
    from mimo_builder._internal.hf.import_command import import_folder

    for line in import_folder(args.folder, args.output):
        print(line)
    return 0


def _ckpt_inspect(args) -> int:
    from mimo_builder._internal.checkpoint.inspect import describe

    print(describe(args.dir, as_json=args.json))
    return 0


_COMMANDS = {"validate": _validate, "plan": _plan, "schema": _schema, "render": _render, "run": _run,
             "generate": _generate, "export": _export, "ckpt inspect": _ckpt_inspect, "profile": _profile,
             "place": _place, "import-hf": _import_hf}

