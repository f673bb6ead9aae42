"""Tiny text data for graphs/mamba_lm.yaml: ``run --data tests.digit_sums:train --eval-data
tests.digit_sums:held_out`` (test_eval_interval.py)."""

from mimo_builder._internal.data import ByteTokenizer, GraphData


class _Sums:
    def __init__(self, pairs: list[tuple[int, int]]):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        a, b = self.pairs[i]
        return {"prompt": f"{a}+{b}=", "answer": str(a + b)}


def train() -> GraphData:
    """Sixteen sums of two digits below four."""
    return GraphData(_Sums([(a, b) for a in range(4) for b in range(4)]), ByteTokenizer(), num_workers=0)


def held_out() -> GraphData:
    """Eight sums the training set does not hold."""
    return GraphData(_Sums([(a, b) for a in range(4, 8) for b in range(2)]), ByteTokenizer(), num_workers=0)
