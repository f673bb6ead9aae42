"""One GPU: ViT-B/16 encoder + projector + ~1B-parameter Mamba hybrid backbone (bf16, ``impl: auto``:
Transformer Engine where installed, else MCore's local layers with attention through SDPA on CUDA),
a training step through GraphSchedule (composite) against the same modules as one plain autograd
graph (monolithic), measured in the same run.

Both sides use the SAME DDP-wrapped chunks built by CompositeBuilder and the same batch already on
the device; each step starts with zero_grad_buffer() on every chunk and is forward+backward (no
optimizer). Composite: ``GraphSchedule.forward_backward(batch)``. Monolithic:
``lm.run(proj.run(vision.run(pixels)))['loss'].backward()`` in one autograd graph, no bridge.
Steps are timed between ``torch.cuda.synchronize()`` calls after warm-up, in ``--rounds`` rounds of
``--steps`` steps per side, the sides alternating step by step; each side's time is the median of
its round medians, and the spread is that of the per-round ratios (max - min over their median).

Also reported: a kernel-class table of each side's step (``kernel_classes``: GEMM, SSD scan, conv,
copies, norms, attention, optimizer, communication, other, idle) and the plan's memory estimate
for this step (parameters + gradient buffer + activations of one microbatch, no optimizer state:
the benchmark does not step it) against ``torch.cuda.max_memory_allocated``.

Tokens/s counts the backbone's tokens (batch x sequence, image placeholders included).
MFU = model FLOPs per step / (step time x peak), model FLOPs = 6 * sum over nodes of (parameters
without embedding lookups x tokens the node processes) + 12 * layers * hidden * tokens^2 * batch
for every attention layer (vision and backbone; causal masking not discounted; the SSD scan's own
FLOPs not counted). Peak: the bf16 dense datasheet figure of :mod:`mimo_builder._internal.platform.peak` (989
TFLOP/s for H100 SXM / H200), else no MFU.

Run: python benchmarks/bench_gpu.py [--tiny] [--json out.json] [--rounds N] [--steps N] [--warmup N]
[--no-profile] (--tiny: small sizes that also run on CPU, for tests). The last two lines read
``composite MFU = X%`` and ``composite/monolithic = R``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import report  # noqa: E402
from kernel_classes import profile_step, table_rows  # noqa: E402

IMAGE_TOKEN = 1
SIZES = {
    "full": dict(image=224, patch=16, vit_layers=12, vit_hidden=768, vit_heads=12, hidden=2048, heads=16,
                 pattern="MMMMMMM*" * 4, vocab=32000, seq=2048, batch=4, state=128, head_dim=64, groups=8),
    "tiny": dict(image=32, patch=8, vit_layers=2, vit_hidden=64, vit_heads=4, hidden=64, heads=4,
                 pattern="MM*M", vocab=256, seq=128, batch=2, state=16, head_dim=16, groups=2),
}


def make_graph(s: dict):
    from mimo_builder._internal.document.graph import Graph
    from submodels.mamba import MambaConfig
    from submodels.projector import ProjectorConfig
    from submodels.vision import VisionConfig

    common = dict(dtype="bf16", impl="auto")
    vision = VisionConfig(image_size=s["image"], patch_size=s["patch"], num_layers=s["vit_layers"],
                          hidden_size=s["vit_hidden"], num_attention_heads=s["vit_heads"], **common)
    proj = ProjectorConfig(input_size=s["vit_hidden"], output_size=s["hidden"], **common)
    lm = MambaConfig(num_layers=len(s["pattern"]), hidden_size=s["hidden"], num_attention_heads=s["heads"],
                     hybrid_layer_pattern=s["pattern"], vocab_size=s["vocab"], seq_length=s["seq"],
                     mamba_state_dim=s["state"], mamba_head_dim=s["head_dim"], mamba_num_groups=s["groups"],
                     modality_token_ids={"image": IMAGE_TOKEN}, **common)
    graph = (Graph().add("vision", vision).add("proj", proj).add("lm", lm)
             .connect("vision.embeddings", "proj.input").connect("proj.output", "lm.image")
             .bind("pixel_values", "vision.pixel_values"))
    for key in ("input_ids", "labels", "loss_mask"):
        graph.bind(key, f"lm.{key}")
    return graph.output("lm.loss"), vision.num_tokens


def make_batch(s: dict, image_tokens: int, device, seed: int = 0) -> dict:
    """Random tokens after one run of image placeholders per sample; no loss on the placeholders."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(IMAGE_TOKEN + 1, s["vocab"], (s["batch"], s["seq"] + 1), generator=gen)
    ids[:, :image_tokens] = IMAGE_TOKEN
    mask = torch.ones(s["batch"], s["seq"])
    mask[:, :image_tokens] = 0.0
    pixels = torch.randn(s["batch"], 3, s["image"], s["image"], generator=gen)
    batch = {"pixel_values": pixels, "input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": mask}
    return {k: v.contiguous().to(device) for k, v in batch.items()}


def model_flops(model, s: dict, image_tokens: int) -> float:
    """FLOPs of one forward+backward step (see the module docstring)."""
    tokens = {"vision": image_tokens, "proj": image_tokens, "lm": s["seq"]}
    dense = 0
    for name, per_sample in tokens.items():
        params = sum(p.numel() for k, p in model.chunks(name)[0].named_parameters()
                     if "word_embeddings" not in k and "position_embeddings" not in k)
        dense += 6 * params * per_sample * s["batch"]
    attention = 12 * s["vit_layers"] * s["vit_hidden"] * image_tokens ** 2 * s["batch"]
    attention += 12 * s["pattern"].count("*") * s["hidden"] * s["seq"] ** 2 * s["batch"]
    return float(dense + attention)


def _steps(model, schedule, batch):
    """(composite, monolithic) step functions over the same chunks and batch."""
    names = ("vision", "proj", "lm")
    chunks = {n: model.chunks(n)[0] for n in names}
    run = {n: model.valid.builders[n].run for n in names}
    text = {k: batch[k] for k in ("input_ids", "labels", "loss_mask")}

    def zero():
        for chunk in chunks.values():
            chunk.zero_grad_buffer()

    def composite():
        zero()
        return schedule.forward_backward(batch)

    def monolithic():
        zero()
        emb = run["vision"](chunks["vision"], {"pixel_values": batch["pixel_values"]})["embeddings"]
        image = run["proj"](chunks["proj"], {"input": emb})["output"]
        loss = run["lm"](chunks["lm"], {**text, "image": image})["loss"]
        loss.backward()
        return float(loss.detach())

    return composite, monolithic


def _timed(fn, sync) -> tuple[float, float]:
    sync()
    start = time.perf_counter()
    value = fn()
    sync()
    return time.perf_counter() - start, value


def _rounds(sides: dict, sync, rounds: int, steps: int) -> dict[str, list[float]]:
    """Per side, the median step time of each round; within a round the sides alternate step by
    step, the order reversed every step."""
    medians = {name: [] for name in sides}
    for _ in range(rounds):
        times = {name: [] for name in sides}
        for i in range(steps):
            for name, fn in list(sides.items())[:: 1 if i % 2 == 0 else -1]:
                times[name].append(_timed(fn, sync)[0])
        for name, values in times.items():
            medians[name].append(statistics.median(values))
    return medians


def _measure(size: str, rounds: int, steps: int, warmup: int, profile: bool) -> dict:
    import torch
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.assembly.walker import CompositeBuilder

    compat.quiet_dependency_warnings()
    device = compat.init_runtime("auto")
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    s = SIZES[size]
    graph, image_tokens = make_graph(s)
    start = time.perf_counter()
    (model,) = CompositeBuilder(graph, seed=0).build_distributed_models(ddp_config=DistributedDataParallelConfig())
    print(f"built in {time.perf_counter() - start:.1f} s", flush=True)
    composite, monolithic = _steps(model, GraphSchedule(model, device=device), make_batch(s, image_tokens, device))
    sides = {"composite": composite, "monolithic": monolithic}
    start = time.perf_counter()
    losses = {"composite": [], "monolithic": []}
    for _ in range(warmup):  # the first step compiles the Triton kernels
        for name, fn in sides.items():
            losses[name].append(_timed(fn, sync)[1])
    print(f"warm-up ({warmup} steps each) in {time.perf_counter() - start:.1f} s", flush=True)
    medians = _rounds(sides, sync, rounds, steps)
    kernels = {name: profile_step(fn, 2, sync, cuda) for name, fn in sides.items()} if profile else None
    params = {n: sum(p.numel() for p in model.chunks(n)[0].parameters()) for n in model.valid.order}
    return dict(device=torch.cuda.get_device_name() if cuda else "cpu", round_seconds=medians,
                seconds={k: statistics.median(v) for k, v in medians.items()},
                first_losses={k: v[0] for k, v in losses.items()}, params=params,
                flops=model_flops(model, s, image_tokens), image_tokens=image_tokens, kernel_classes=kernels,
                peak_memory_bytes=torch.cuda.max_memory_allocated() if cuda else None)


def memory_estimate(size: str) -> int:
    """The plan's bytes on the one rank for the benchmark's step: parameters, gradient buffer and
    the activations of one microbatch of the whole batch (no optimizer state)."""
    from mimo_builder._internal.planning.estimate import estimate_plan
    from mimo_builder._internal.planning.plan import make_plan
    from mimo_builder._internal.runtime.pipeline import plan_graph

    graph, _ = make_graph(SIZES[size])
    plan = make_plan(graph, 1)
    memory = estimate_plan(plan, plan_graph(plan.valid, 1), micro_batch_size=SIZES[size]["batch"]).memory[0]
    return memory.params + memory.grads + memory.activations


def _peak(device_name: str) -> float | None:
    """One device's bf16 peak from the project's datasheet table (None off the known GPUs)."""
    import torch

    from mimo_builder._internal.platform.peak import device_peak_flops

    return device_peak_flops(device_name, torch.bfloat16)


def _size(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def _spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values)


def summarize(m: dict, size: str) -> dict:
    """The report rows, the ratio and the metrics, as printed and written to JSON."""
    s, sec, peak = SIZES[size], m["seconds"], _peak(m["device"])
    tokens = s["batch"] * s["seq"]
    tps = {k: tokens / v for k, v in sec.items()}
    mfu = {k: m["flops"] / v / peak if peak else None for k, v in sec.items()}
    pct = {k: "n/a (no peak for this device)" if v is None else f"{100 * v:.1f} %" for k, v in mfu.items()}
    ratios = [c / r for c, r in zip(m["round_seconds"]["composite"], m["round_seconds"]["monolithic"])]
    measured, estimate = m["peak_memory_bytes"], m["memory_estimate_bytes"]
    error = None if measured is None else estimate / measured - 1
    rows = [("device", m["device"]), ("parameters", ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in m["params"].items())),
            ("batch x sequence (image tokens)", f"{s['batch']} x {s['seq']} ({m['image_tokens']})"),
            ("model TFLOP per step", f"{m['flops'] / 1e12:.2f}"),
            ("monolithic", f"{sec['monolithic'] * 1e3:.1f} ms/step, {tps['monolithic']:,.0f} tokens/s, MFU {pct['monolithic']}"),
            ("composite", f"{sec['composite'] * 1e3:.1f} ms/step, {tps['composite']:,.0f} tokens/s, MFU {pct['composite']}"),
            ("ratio per round", f"{', '.join(f'{r:.3f}' for r in ratios)} (spread {_spread(ratios):.1%})"),
            ("first loss (composite, monolithic)", "{composite:.4f}, {monolithic:.4f}".format(**m["first_losses"])),
            ("peak GPU memory (max allocated)", "n/a" if measured is None else _size(measured)),
            ("plan's estimate (params + grads + activations)", _size(estimate)
             + ("" if error is None else f" (error {error:+.1%})")),
            ("rounds x timed steps per side", f"{len(ratios)} x {m['steps']}"),
            ("MAMBA_DETERMINISTIC", os.environ.get("MAMBA_DETERMINISTIC", "unset"))]
    if m["kernel_classes"]:
        rows += [("kernel classes (2 profiled steps)", "")] + table_rows(m["kernel_classes"])
    title = f"Composite vs monolithic training step on one GPU ({size}: ViT + projector + Mamba hybrid, bf16)"
    result = report(title, rows, "ratio composite / monolithic", statistics.median(ratios), "<= 1.02")
    result["metrics"] = dict(m, tokens_per_s=tps, mfu=mfu, peak_flops=peak, round_ratios=ratios,
                             ratio_spread=_spread(ratios), memory_error=error)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes (runs on CPU too)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of timed steps (at least 3 for a spread)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per side and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip the kernel-class table")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    size = "tiny" if args.tiny else "full"

    import torch

    from mimo_builder._internal.platform.launch import launch

    if size == "full" and not torch.cuda.is_available():
        parser.error("the full-size benchmark needs a CUDA device; use --tiny on CPU")
    estimate = memory_estimate(size)  # here: the plan counts on a fake world, before any group exists
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    measured = launch(_measure, 1, size, args.rounds, args.steps, args.warmup, args.profile, backend=backend,
                      timeout_s=900)[0]
    result = summarize(dict(measured, steps=args.steps, memory_estimate_bytes=estimate), size)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result))
    composite_mfu = result["metrics"]["mfu"]["composite"]
    print(f"composite MFU = {'n/a (no peak for this device)' if composite_mfu is None else f'{100 * composite_mfu:.1f}%'}")
    print(f"composite/monolithic = {result['ratio']:.3f}")
    return result


if __name__ == "__main__":
    main()
