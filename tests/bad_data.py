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
                  "small_image": torch.randn(3, 16, 16)}.get(self.mistake, torch.randn(IMAGE))
        answer = 7 if self.mistake == "integer_answer" else "seven"
        return {"prompt": "<image> what is it?", "answer": answer, "pixel_values": pixels}


def _data(mistake):
    return lambda: GraphData(_Samples(mistake), num_workers=0)


def factory_raises():
    raise ValueError("no such split")


item_raises, string_pixels, nan_pixels = _data("item_raises"), _data("string_pixels"), _data("nan_pixels")
integer_pixels, small_image, integer_answer = _data("integer_pixels"), _data("small_image"), _data("integer_answer")
