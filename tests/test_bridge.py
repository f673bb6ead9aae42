"""The bridge's TP broadcast: the receivers get the sender's dtype, shape and values, whatever
buffer they hold (gloo would take a bf16 sender's bytes into an fp32 buffer as they come)."""

from tests.multirank import run_ranks


def _broadcast(receiver_buffer: str | None):
    import torch
    import torch.distributed as dist

    from mimo_builder._internal.runtime.bridge import broadcast_tensor

    sent = torch.tensor([[1.5, -2.25, 3.0], [4.5, 0.125, -8.0]], dtype=torch.bfloat16)
    if dist.get_rank() == 0:
        mine = sent
    else:
        mine = None if receiver_buffer is None else torch.zeros(2, 3, dtype=getattr(torch, receiver_buffer))
    got = broadcast_tensor(mine, 0, dist.group.WORLD, torch.device("cpu"))
    return got.dtype == torch.bfloat16 and got.shape == sent.shape and bool(torch.equal(got, sent))


def test_receivers_get_the_senders_tensor_whatever_buffer_they_hold():
    for buffer in (None, "float32"):
        assert run_ranks(2, _broadcast, buffer) == [True, True], buffer
