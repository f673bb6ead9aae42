"""The GPU benchmark's kernel-class table: kernel names as CUDA profiles show them go to the
right class, and idle time is what the kernels leave of the wall time."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

from kernel_classes import IDLE, ORDER, class_times, classify  # noqa: E402


@pytest.mark.parametrize(("kernel", "expected"), [
    ("nvjet_hsh_128x256_64x4_1x2_h_bz_coopA_NNT", "GEMM"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "GEMM"),
    ("cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8", "GEMM"),
    ("aten::addmm", "GEMM"),
    ("_chunk_scan_fwd_kernel", "SSD scan"),
    ("_bmm_chunk_bwd_kernel", "SSD scan"),
    ("_chunk_state_bwd_db_kernel", "SSD scan"),
    ("void causal_conv1d_fwd_kernel<Causal_conv1d_fwd_kernel_traits<128, 4, true, __nv_bfloat16>>", "conv"),
    ("void cudnn::cnn::conv2d_grouped_direct_kernel<false, true, false, false, 0, 0, int, float>", "conv"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "conv"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>", "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", "attention"),
    ("_layer_norm_fwd_1pass_kernel", "norm"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>", "norm"),
    ("void at::native::elementwise_kernel<128, 4, at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)>",
     "copies"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<float, unsigned int, 3, 128, 1>", "copies"),
    ("Memcpy DtoD (Device -> Device)", "copies"),
    ("aten::copy_", "copies"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "communication"),
    ("void at::native::multi_tensor_apply_kernel<at::native::TensorListMetadata<4>, AdamFunctor<float>>",
     "optimizer"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "other element-wise"),
    ("aten::mul", "other element-wise"),
])
def test_kernels_go_to_their_class(kernel, expected):
    assert classify(kernel) == expected


def test_idle_is_the_wall_time_no_kernel_covers_on_a_device():
    events = [("nvjet_hsh_gemm", 0.004), ("_chunk_scan_fwd_kernel", 0.002), ("aten::mul", 0.001)]
    times = class_times(events, wall=0.010, device_busy=True)
    assert list(times) == list(ORDER)
    assert times["GEMM"] == pytest.approx(0.004) and times["SSD scan"] == pytest.approx(0.002)
    assert times[IDLE] == pytest.approx(0.003) and sum(times.values()) == pytest.approx(0.010)
    assert class_times(events, wall=0.010, device_busy=False)[IDLE] == 0.0  # CPU operators: no idle
