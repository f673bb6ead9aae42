"""Pipelined vs sequential GraphSchedule on sleeping nodes: how close the step gets to 1F1B's bound.

Every node of a disjoint chain (S = 4 nodes, node i alone on rank i) sleeps forward_ms (20) in its
forward and backward_ms (40) in its backward (a custom autograd Function) on [batch, 4, 4] tensors,
so a step's time is the schedule's, not the 2-core CPU's. With M microbatches 1F1B's bound is
ideal = (M + S - 1) x (forward + backward); the sequential schedule (max_in_flight=1) needs
M x S x (forward + backward). Both schedules drive the same built model in the same processes,
alternated (order reversed every round, a barrier before each step); a step takes as long as
its slowest rank; medians over rounds, next to the plan's prediction. Also: the 4 stages as 2
nodes at pp=2 (M = 8); the avlm demo graph (disjoint4): each rank group's idle fraction in the
plans (unit costs F=1, B=2) and its measured step at M = 8 (real modules, gloo on 2 cores:
indicative only). Target: pipelined / ideal <= 1.10 at M = 8. The excess over ideal is the
runtime's fixed cost per operation (near-zero sleeps: ~45 ms per pipelined M = 8 step here), so
it shrinks relative to longer sleeps.

Run: .venv/bin/python benchmarks/bench_pipeline.py [--json out.json] [--rounds N]
     [--forward-ms F] [--backward-ms B] [--avlm-rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from mimo_builder._internal.platform.compat import quiet_dependency_warnings  # noqa: E402

quiet_dependency_warnings()  # before MCore's imports below

import torch  # noqa: E402
from megatron.core.transformer import MegatronModule, TransformerConfig  # noqa: E402
from pydantic import NonNegativeFloat, PositiveInt  # noqa: E402

from common import report  # noqa: E402
from mimo_builder._internal.kinds.builder import ModelBuilder, Port, Ports  # noqa: E402
from mimo_builder._internal.kinds.config import ModelConfig  # noqa: E402
from mimo_builder._internal.kinds.registry import allow_modules  # noqa: E402

STAGES, WORLD, BATCH, TOKENS = 4, 4, 8, 4
MICROBATCHES = (1, 4, 8)
HEADLINE_M = 8
AVLM_BATCH = 16  # M = 8 microbatches of 2: the encoders' dp=2 needs even microbatches
allow_modules("bench_pipeline")  # graphs name the node kind 'bench_pipeline:SleepBuilder'; ranks import this


# --- the cost-model node kind --------------------------------------------------------------------

class SleepConfig(ModelConfig):
    """A node that only takes time: its forward sleeps ``forward_ms``, its backward ``backward_ms``."""

    builder: str = "bench_pipeline:SleepBuilder"
    """Builder of this node."""

    features: PositiveInt = 4
    """Last axis of the input and output ports (tiny: communication stays negligible)."""

    forward_ms: NonNegativeFloat = 20.0
    """Sleep in each forward of each pipeline stage."""

    backward_ms: NonNegativeFloat = 40.0
    """Sleep in each backward of each pipeline stage."""

    per_sample_ms: NonNegativeFloat = 0.0
    """Further sleep per sample of the call, in the forward (twice that in the backward)."""

    def tp_problems(self, tp: int) -> list[str]:
        return [] if tp == 1 else [f"a sleep node runs at tp=1 only, got {tp}"]


class SleepBuilder(ModelBuilder):
    """One :class:`SleepModule` per pipeline stage; ports ``input`` -> ``output`` (x * scale) and
    ``loss`` (mean of ``output``, for the graph output the schedule backpropagates from)."""

    config_class = SleepConfig

    def ports(self) -> Ports:
        f, dims = self.config.features, ("batch", "tokens", "features")
        return Ports.of([Port("input", dims, f)], [Port("output", dims, f), Port("loss", (), doc="mean of output")])

    def synthetic_inputs(self, batch_size, generator, tokens):
        return {"input": torch.randn((batch_size, TOKENS, self.config.features), generator=generator)}

    def output_tokens(self, input_tokens):
        return {"output": input_tokens["input"]}  # x * scale keeps the tokens

    def make_transformer_config(self, pg_collection) -> TransformerConfig:
        pp = pg_collection.pp.size()  # one layer per stage; MCore wants only what DDP reads
        return TransformerConfig(num_layers=pp, hidden_size=self.config.features, num_attention_heads=1,
                                 pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
                                 use_cpu_initialization=True)

    def build_model(self, pg_collection, pre_process=None, post_process=None, vp_stage=None) -> "SleepModule":
        cfg = self.config
        return SleepModule(self.transformer_config(pg_collection), cfg.forward_ms / 1e3, cfg.backward_ms / 1e3,
                           cfg.per_sample_ms / 1e3)

    def run_stage(self, model, inputs, hidden, first, last):
        out = model(inputs["input"] if first else hidden)
        return {"output": out, "loss": out.float().mean()} if last else {"hidden": out}


class SleepModule(MegatronModule):
    """``x * scale`` (one parameter, so autograd and DDP have work), after sleeping; its backward sleeps."""

    def __init__(self, config: TransformerConfig, forward_s: float, backward_s: float, per_sample_s: float = 0.0):
        super().__init__(config)
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.forward_s, self.backward_s, self.per_sample_s = forward_s, backward_s, per_sample_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.forward_s + self.per_sample_s * x.shape[0])
        return _SleepInBackward.apply(x * self.scale, self.backward_s + 2 * self.per_sample_s * x.shape[0])


class _SleepInBackward(torch.autograd.Function):
    """Identity whose backward sleeps ``seconds`` before passing the gradient on."""

    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.seconds)
        return grad, None


# --- measurement (on every rank) -----------------------------------------------------------------

def chain(nodes: int, pp: int, forward_ms: float, backward_ms: float):
    """``nodes`` sleep nodes in a chain, node i on ranks [i * pp, (i + 1) * pp) at pipeline size ``pp``."""
    from mimo_builder._internal.document.graph import Graph, Placement

    graph = Graph()
    for i in range(nodes):
        graph.add(f"s{i}", SleepConfig(forward_ms=forward_ms, backward_ms=backward_ms),
                  placement=Placement(offset=i * pp, size=pp, pp=pp))
        if i:
            graph.connect(f"s{i - 1}.output", f"s{i}.input")
    return graph.bind("x", "s0.input").output(f"s{nodes - 1}.loss")


def _rounds(steps: dict, rounds: int) -> dict:
    """This rank's time of each step: one warm-up each, then ``rounds`` rounds, order reversed
    every round, a barrier before each step."""
    import torch.distributed as dist

    for fn in steps.values():
        fn()
    times, order = {key: [] for key in steps}, list(steps)
    for i in range(rounds):
        for key in order if i % 2 == 0 else order[::-1]:
            dist.barrier()
            start = time.perf_counter()
            steps[key]()
            times[key].append(time.perf_counter() - start)
    return times


def _measure(forward_ms, backward_ms, rounds, avlm_rounds):
    from megatron.core.distributed import DistributedDataParallelConfig

    from graphs.avlm import avlm
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch
    from mimo_builder._internal.assembly.walker import CompositeBuilder

    allow_modules("bench_pipeline")
    compat.init_runtime("cpu")

    def steps(graph, batch_size, microbatches, prefix=""):
        (model,) = CompositeBuilder(graph).build_distributed_models(ddp_config=DistributedDataParallelConfig())
        batch = synthetic_batch(model.valid, batch_size, seed=0)
        schedules = {"pipelined": GraphSchedule(model), "sequential": GraphSchedule(model, max_in_flight=1)}
        plans = {(prefix + kind, m): s.plan(m) for kind, s in schedules.items() for m in microbatches}
        fns = {(prefix + kind, m): (lambda s=s, m=m: s.forward_backward(batch, m))
               for m in microbatches for kind, s in schedules.items()}
        return fns, plans

    fns, plans = steps(chain(STAGES, 1, forward_ms, backward_ms), BATCH, MICROBATCHES)
    fns_pp, plans_pp = steps(chain(STAGES // 2, 2, forward_ms, backward_ms), BATCH, (HEADLINE_M,), "pp2 ")
    times = _rounds({**fns, **fns_pp}, rounds)
    fns_av, plans_av = steps(avlm("disjoint4"), AVLM_BATCH, (1, HEADLINE_M), "avlm ")
    if avlm_rounds:
        times.update(_rounds({k: f for k, f in fns_av.items() if k[1] == HEADLINE_M}, avlm_rounds))
    all_plans = {**plans, **plans_pp, **plans_av}
    return times, {k: (p.makespan, [p.idle_fraction(r) for r in range(WORLD)]) for k, p in all_plans.items()}


# --- report --------------------------------------------------------------------------------------

def _rank_groups() -> list[tuple[str, list[int]]]:
    """avlm disjoint4's ranks grouped by the nodes they host, with a label."""
    from graphs.avlm import avlm
    from mimo_builder._internal.validation import validate_graph

    valid, groups = validate_graph(avlm("disjoint4"), world_size=WORLD), {}
    for r in range(WORLD):
        groups.setdefault(tuple(n for n in valid.order if r in valid.layouts[n].ranks), []).append(r)
    return [(f"ranks {r[0]}-{r[-1]} ({'lm' if nodes == ('lm',) else 'encoders+projectors'})", r)
            for nodes, r in groups.items()]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after the warm-up (>= 3)")
    parser.add_argument("--forward-ms", type=float, default=20.0)
    parser.add_argument("--backward-ms", type=float, default=40.0)
    parser.add_argument("--avlm-rounds", type=int, default=3, help="timed avlm steps per schedule (0: plans only)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.rounds < 3 or min(args.forward_ms, args.backward_ms) <= 0:
        parser.error("--rounds must be >= 3, --forward-ms and --backward-ms > 0")

    from mimo_builder._internal.platform.launch import launch

    results = launch(_measure, WORLD, args.forward_ms, args.backward_ms, args.rounds, args.avlm_rounds,
                     timeout_s=600)
    plans = results[0][1]
    # A step takes as long as its slowest rank; the median over rounds of that.
    step = {key: statistics.median(map(max, zip(*(r[0][key] for r in results)))) for key in results[0][0]}
    slot_ms = args.forward_ms + args.backward_ms
    rows = [("chain", f"{STAGES} sleep nodes, one per rank; forward {args.forward_ms:g} ms, "
                      f"backward {args.backward_ms:g} ms; median of {args.rounds} rounds")]
    ratios = {}
    for prefix, ms in (("", MICROBATCHES), ("pp2 ", (HEADLINE_M,))):
        for m in ms:
            ideal = (m + STAGES - 1) * slot_ms / 1e3
            label = f"M={m}" + (" (2 nodes x pp=2)" if prefix else "")
            rows.append((f"{label}: ideal (M+S-1)(F+B)", f"{ideal * 1e3:.0f} ms"))
            for kind in ("sequential", "pipelined"):
                t, units = step[(prefix + kind, m)], plans[(prefix + kind, m)][0]
                ratios[(prefix + kind, m)] = t / ideal
                rows.append((f"{label}: {kind}", f"{t * 1e3:.0f} ms = {t / ideal:.3f} x ideal "
                                                 f"(plan {units / ((m + STAGES - 1) * 3):.3f})"))
    for label, ranks in _rank_groups():
        for m in (1, HEADLINE_M):
            idle = {kind: max(plans[("avlm " + kind, m)][1][r] for r in ranks) for kind in ("pipelined", "sequential")}
            rows.append((f"avlm plan idle, {label}, M={m}",
                         f"pipelined {idle['pipelined']:.2f}, sequential {idle['sequential']:.2f}"))
    if args.avlm_rounds:
        p, s = step[("avlm pipelined", HEADLINE_M)], step[("avlm sequential", HEADLINE_M)]
        rows.append((f"avlm disjoint4 M={HEADLINE_M} step (gloo, 2 cores)",
                     f"pipelined {p * 1e3:.0f} ms, sequential {s * 1e3:.0f} ms, ratio {p / s:.3f} "
                     f"(median of {args.avlm_rounds})"))
    ratio = ratios[("pipelined", HEADLINE_M)]
    result = report(f"Pipelined vs sequential GraphSchedule, {STAGES}-stage chain of sleep nodes on {WORLD} gloo ranks",
                    rows, "pipelined/ideal", ratio, "<= 1.10", args.json)
    print(f"pipelined/ideal = {ratio:.3f}")
    return result


if __name__ == "__main__":
    main()
