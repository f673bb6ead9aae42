"""A graph that binds no labels generates: each row's prompt ends at its last token other than
the padding id (or where a bound loss mask says), and the tokens are the labelled graph's."""

import torch

from multirank import run_ranks

PROMPTS = ([5, 9, 13, 2, 7], [11, 4, 4, 8, 30, 31, 6, 19])
ROW, NEW, PAD = 16, 4, 0


def _graphs():
    from graphs.mamba_lm import mamba_lm

    labelled = mamba_lm()
    free = mamba_lm()
    free.inputs = {"input_ids": "lm.input_ids"}
    free.outputs = ["lm.logits"]
    return labelled, free


def _generated() -> dict:
    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.schedule import GraphSchedule

    compat.init_runtime("cpu")
    ids = torch.full((len(PROMPTS), ROW), PAD)
    mask = torch.zeros(len(PROMPTS), ROW)
    for row, prompt in enumerate(PROMPTS):
        ids[row, :len(prompt)] = torch.tensor(prompt)
        mask[row, len(prompt) - 1] = 1.0
    out = {}
    for name, graph in zip(("labelled", "free"), _graphs()):
        (model,) = CompositeBuilder(graph, seed=3).build_distributed_models(wrap_with_ddp=False)
        with model:
            schedule = GraphSchedule(model)
            if name == "labelled":
                positions = torch.arange(ROW).expand_as(ids)
                out[name] = schedule.generate({"input_ids": ids, "labels": ids, "loss_mask": mask,
                                               "position_ids": positions}, NEW)
            else:
                out[name] = schedule.generate({"input_ids": ids}, NEW, pad_id=PAD)
                out["whole_rows"] = schedule.generate({"input_ids": ids}, NEW)
    return out


def test_a_label_free_graph_generates_the_labelled_graphs_tokens():
    (out,) = run_ranks(1, _generated)
    assert out["free"].shape == (len(PROMPTS), NEW)
    assert torch.equal(out["free"], out["labelled"]), out
    assert not torch.equal(out["whole_rows"], out["free"])  # without pad_id each whole row is the prompt
