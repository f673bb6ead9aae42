"""Where a training step's device time goes, by kernel class: a torch.profiler trace of a few
steps, each kernel's time added to the first class whose pattern its name matches.

On CUDA the kernels' own times count (CPU-side operator events are ignored) and ``idle`` is the
steps' wall time the device spent in no kernel (launch overhead, synchronisation, host work). On
CPU each operator's self time counts, so the table shows the same classes for a test run.
"""

from __future__ import annotations

import re
import time

# (class, pattern) in the order they are tried; names are matched lower-case. Convolutions come
# before GEMMs (cuDNN's conv kernels are "implicit GEMMs"), attention before norms and GEMMs.
CLASSES = (
    ("communication", r"nccl|all_?reduce|all_?gather|reduce_?scatter|sendrecv|c10d::|gloo"),
    ("optimizer", r"multi_tensor|adam|sgd|_foreach"),
    ("SSD scan", r"chunk_scan|chunk_state|state_passing|bmm_chunk|chunk_cumsum|ssd_|selective_scan"),
    ("conv", r"causal_conv|conv1d|conv2d|convolution|conv_depthwise|dgrad|wgrad|fprop"),
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("norm", r"layer_?norm|rms_?norm|rmsnorm|_norm_"),
    ("GEMM", r"gemm|matmul|cublas|cutlass|xmma|nvjet|aten::mm$|aten::addmm$|aten::bmm$|aten::baddbmm$"),
    ("copies", r"copy|contiguous|clone|aten::cat$|catarray|aten::stack$|memcpy"),
)
OTHER = "other element-wise"
IDLE = "idle"
ORDER = tuple(name for name, _ in CLASSES) + (OTHER, IDLE)
_COMPILED = tuple((name, re.compile(pattern)) for name, pattern in CLASSES)


def classify(kernel: str) -> str:
    """The class of a kernel or operator named ``kernel``."""
    lower = kernel.lower()
    return next((name for name, pattern in _COMPILED if pattern.search(lower)), OTHER)


def class_times(events: list[tuple[str, float]], wall: float, device_busy: bool) -> dict[str, float]:
    """Seconds per class from (name, seconds) events over ``wall`` seconds; with
    ``device_busy`` (one device's kernels) the rest of the wall time is ``idle``."""
    times = dict.fromkeys(ORDER, 0.0)
    for name, seconds in events:
        times[classify(name)] += seconds
    times[IDLE] = max(wall - sum(times.values()), 0.0) if device_busy else 0.0
    return times


def profile_step(step, steps: int, sync, cuda: bool) -> dict[str, float]:
    """Milliseconds per step and class over ``steps`` calls of ``step`` under torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = time.perf_counter() - start
    if cuda:
        events = [(e.name, e.time_range.elapsed_us() / 1e6) for e in prof.events() if e.device_type == DeviceType.CUDA]
    else:
        events = [(e.name, e.self_cpu_time_total / 1e6) for e in prof.events() if e.device_type == DeviceType.CPU]
    return {name: 1e3 * seconds / steps for name, seconds in class_times(events, wall, cuda).items()}


def table_rows(sides: dict[str, dict[str, float]]) -> list[tuple[str, str]]:
    """One report row per class: each side's milliseconds per step and share."""
    totals = {side: sum(ms.values()) or 1.0 for side, ms in sides.items()}
    return [(f"  {name} (ms/step, share)", ", ".join(f"{side} {ms[name]:.1f} ({ms[name] / totals[side]:.0%})"
                                                      for side, ms in sides.items()))
            for name in ORDER]
