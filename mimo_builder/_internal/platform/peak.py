"""Peak dense matmul FLOP/s of one accelerator, the denominator of model FLOPs utilisation (MFU).

Figures are NVIDIA's datasheet numbers without sparsity. A device not in the table has no peak
(MFU is not reported; the user can give one with ``--peak-tflops``). fp32 parameters count at the
TF32 tensor-core peak when torch lets matmuls use TF32, else at the plain fp32 peak.
"""

from __future__ import annotations

import torch

TERA = 1e12

# device-name substring -> (bf16/fp16, tf32, fp32) dense TFLOP/s; the first match wins, so the
# more specific names come first.
DATASHEET = (
    ("H100 PCIe", (756.0, 378.0, 51.2)),
    ("H100 NVL", (835.0, 418.0, 60.0)),
    ("H100", (989.4, 494.7, 66.9)),
    ("H200", (989.4, 494.7, 66.9)),
    ("A100", (312.0, 156.0, 19.5)),
)


def device_peak_flops(device_name: str, dtype: torch.dtype, tf32: bool | None = None) -> float | None:
    """Peak FLOP/s of the device called ``device_name`` for matmuls in ``dtype`` (None: unknown).
    ``tf32``: whether fp32 matmuls run on TF32 tensor cores (default: torch's current setting)."""
    for key, (half, tf32_peak, fp32_peak) in DATASHEET:
        if key in device_name:
            if dtype in (torch.bfloat16, torch.float16):
                return half * TERA
            allowed = torch.backends.cuda.matmul.allow_tf32 if tf32 is None else tf32
            return (tf32_peak if allowed else fp32_peak) * TERA
    return None


def device_name(device: torch.device) -> str:
    """The accelerator's marketing name ('NVIDIA H200'), or 'cpu'."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
