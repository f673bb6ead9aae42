"""Data modules with one mistake each, for ``run --data tests.bad_data:NAME`` (test_prelaunch.py)."""

import torch

from mimo_builder._internal.data import GraphData

IMAGE = (3, 32, 32)  # graphs/vlm.yaml's vision node


class _Samples:
    def __init__(self, mistake: str):
        self.mistake = mistake

    def __len__(self):
        return 8

    def __getitem__(self, i):
        if self.mistake == "item_raises":
            raise RuntimeError("the shard is gone")
        pixels = {"string_pixels": "pixels", "nan_pixels": torch.full(IMAGE, float("nan")),
                  "integer_pixels": torch.zeros(IMAGE, dtype=torch.long),
                  "small_image": torch.randn(3, 12, 16)}.get(self.mistake, torch.randn(IMAGE))
        answer = 7 if self.mistake == "integer_answer" else "seven"
        return {"prompt": "<image> what is it?", "answer": answer, "pixel_values": pixels}


def _data(mistake):
    return lambda: GraphData(_Samples(mistake), num_workers=0)


def factory_raises():
    raise ValueError("no such split")


item_raises, string_pixels, nan_pixels = _data("item_raises"), _data("string_pixels"), _data("nan_pixels")
integer_pixels, small_image, integer_answer = _data("integer_pixels"), _data("small_image"), _data("integer_answer")


# --- item 5 of eight is bad (test_bad_inputs.py): found by a DataLoader worker during the run ---
# graphs/mamba_lm.yaml has 256 token ids; with 200 reserved ids a byte from '8' (56) on is outside them.

class _LaterItem:
    def __init__(self, mistake: str):
        self.mistake = mistake

    def __len__(self):
        return 8

    def __getitem__(self, i):
        if i == 5 and self.mistake == "raises":
            raise RuntimeError("the shard is gone")
        answer = {"integer": 7, "out_of_vocabulary": "79"}.get(self.mistake) if i == 5 else "7"
        return {"prompt": "3 4 ", "answer": answer}


def _later(mistake):
    from mimo_builder._internal.data import ByteTokenizer

    return lambda: GraphData(_LaterItem(mistake), ByteTokenizer(reserved=200), num_workers=1)


item5_raises, item5_integer, item5_out_of_vocabulary = _later("raises"), _later("integer"), _later("out_of_vocabulary")
