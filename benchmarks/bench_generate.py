"""Generation: incremental decoding vs recomputing the whole forward for every new token.

The ``mamba_lm`` graph (hybrid ``M*-M``, hidden 64, fp32) on one CPU rank, 4 prompts of 128
tokens (and, for comparison, of 16), 64 new tokens each, greedy. Incremental: ``GraphSchedule.generate`` (the prompts
prefilled once, then one step per token through MCore's static inference context). Recompute:
the same argmax chain by a full forward over the prompt and the tokens so far, per new token.
Both give the same tokens (checked here). Target: incremental / recompute speed-up >= 5 at
128-token prompts; at 16 tokens the recomputed forwards are short and per-step overheads weigh.

Run: .venv/bin/python benchmarks/bench_generate.py [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from common import interleaved_medians, report  # noqa: E402

BATCH, PROMPTS, NEW = 4, (128, 16), 64


def _measure(prompt: int) -> dict:
    import torch

    from graphs.mamba_lm import mamba_lm
    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.schedule import GraphSchedule

    compat.init_runtime("cpu")
    graph = mamba_lm()
    graph.nodes["lm"].config["seq_length"] = prompt + NEW
    (model,) = CompositeBuilder(graph, seed=1).build_distributed_models(wrap_with_ddp=False)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 256, (BATCH, prompt + NEW), generator=generator)
    mask = torch.zeros(BATCH, prompt + NEW)
    mask[:, prompt - 1:] = 1.0  # the first `prompt` tokens are the prompt
    batch = {"input_ids": ids, "labels": ids, "loss_mask": mask,
             "position_ids": torch.arange(prompt + NEW).expand(BATCH, -1).contiguous()}
    schedule, lm, builder = GraphSchedule(model), model.chunks("lm")[0].eval(), model.valid.builders["lm"]
    tokens = {}

    def incremental():
        tokens["incremental"] = schedule.generate(batch, NEW)

    def recompute():
        current, out = ids[:, :prompt].clone(), []
        with torch.no_grad():
            for _ in range(NEW):
                logits = builder.run(lm, {"input_ids": current})["logits"]
                out.append(logits[:, -1, :256].argmax(dim=-1))
                current = torch.cat([current, out[-1][:, None]], dim=1)
        tokens["recompute"] = torch.stack(out, dim=1)

    times = interleaved_medians({"incremental": incremental, "recompute": recompute}, repeats=3)
    same = bool(torch.equal(tokens["incremental"], tokens["recompute"]))
    model.close()
    return {**times, "same": same}


def main(argv=None) -> dict:
    from mimo_builder._internal.platform.launch import launch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows, ratios = [], {}
    for prompt in PROMPTS:
        result = launch(_measure, 1, prompt, timeout_s=900)[0]
        if not result["same"]:
            raise SystemExit("incremental and recomputed generation gave different tokens")
        ratios[prompt] = result["recompute"] / result["incremental"]
        rows += [(f"{prompt}-token prompts: incremental (prefill + {NEW} steps)", f"{result['incremental'] * 1e3:.0f} ms"),
                 (f"{prompt}-token prompts: recompute ({NEW} full forwards)", f"{result['recompute'] * 1e3:.0f} ms"),
                 (f"{prompt}-token prompts: speed-up (the same tokens)", f"{ratios[prompt]:.2f}")]
    return report(f"generation: {BATCH} prompts, {NEW} new tokens (mamba_lm, 1 CPU rank)", rows,
                  "incremental/recompute speed-up", ratios[PROMPTS[0]], ">= 5", args.json)


if __name__ == "__main__":
    main()
