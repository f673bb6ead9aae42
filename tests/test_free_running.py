"""``lm.free_running``: greedy decoding from the prompt alone, each predicted token fed back. It
never reads the answer's own input tokens, and for whole-answer exact match it agrees with the
teacher-forced ``correct`` sample by sample (both fail at the first wrong token)."""

import torch

from multirank import run_ranks

ANSWER = 3  # the last 3 labels of each sample are its answer


def _model():
    from megatron.core.distributed import DistributedDataParallelConfig

    from graphs.mamba_lm import mamba_lm
    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.platform import compat

    compat.init_runtime("cpu")
    graph = mamba_lm()
    graph.outputs += ["lm.correct", "lm.free_running"]
    (model,) = CompositeBuilder(graph, seed=1).build_distributed_models(ddp_config=DistributedDataParallelConfig())
    return model


def _checks() -> dict:
    from mimo_builder._internal.document.optimizer import OptimizerSettings
    from mimo_builder._internal.runtime.optim import GraphOptimizer
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    model = _model()
    schedule, optimizer = GraphSchedule(model), GraphOptimizer(model, OptimizerSettings(lr=1e-2))
    for step in range(40):  # the counting sequences are learnable
        optimizer.zero_grad()
        optimizer.step(schedule.forward_backward(synthetic_batch(model.valid, 8, seed=step)))
    batch = synthetic_batch(model.valid, 16, seed=99)
    batch["loss_mask"] = torch.zeros_like(batch["loss_mask"])
    batch["loss_mask"][:, -ANSWER:] = 1.0
    refs = ["lm.correct", "lm.free_running"]
    clean = schedule.evaluate(batch, outputs=refs)
    scrambled = dict(batch, input_ids=batch["input_ids"].clone())
    scrambled["input_ids"][:, -ANSWER + 1:] = 7  # the answer's own input tokens (after its first)
    after = schedule.evaluate(scrambled, outputs=refs)
    model.close()
    return {"clean": {r: clean[r] for r in refs}, "scrambled": {r: after[r] for r in refs}}


def test_free_running_never_reads_the_answer_and_agrees_with_exact_match():
    r = run_ranks(1, _checks)[0]
    clean, scrambled = r["clean"], r["scrambled"]
    assert clean["lm.free_running"].sum() >= 4, clean  # the model answers some samples right
    assert torch.equal(clean["lm.free_running"], clean["lm.correct"])
    assert torch.equal(scrambled["lm.free_running"], clean["lm.free_running"])
    assert not torch.equal(scrambled["lm.correct"], clean["lm.correct"])  # teacher forcing reads them


def test_free_running_judges_the_last_learned_span():
    """A conversation's final assistant turn is decoded from everything before it (the earlier
    turns as they are): the last run of learned positions."""
    from submodels.mamba import last_span

    learned = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 0], [1, 1, 0, 0, 0, 0, 0, 0], [0] * 8, [1] * 8]).bool()
    expected = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 0], [1, 1, 0, 0, 0, 0, 0, 0], [0] * 8, [1] * 8]).bool()
    assert torch.equal(last_span(learned), expected)
