"""The GPU kit's causal-conv1d build narrows the package's architecture list to one GPU's."""

import pathlib
import re
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))

from build_causal_conv1d import compressed_kernels, cuda_toolkit, main, only_architecture  # noqa: E402

# causal-conv1d 1.7.0's setup.py, where it chooses the architectures (abridged around them)
SETUP = '''        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_75,code=sm_75")
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_80,code=sm_80")
        if bare_metal_version >= Version("11.8"):
            cc_flag.append("-gencode")
            cc_flag.append("arch=compute_90,code=sm_90")
        if bare_metal_version >= Version("12.8"):
            cc_flag.append("-gencode")
            cc_flag.append("arch=compute_100,code=sm_100")
    extra_compile_args = {"nvcc": ["-O3"] + cc_flag}
'''


def _architectures(text: str) -> list[str]:
    return re.findall(r'"-gencode"\)\n\s*cc_flag\.append\("arch=compute_(\d+),code=sm_(\d+)"\)', text)


@pytest.mark.parametrize("arch", ["90", "100", "89"])
def test_only_the_gpus_architecture_is_left(arch):
    patched = only_architecture(SETUP, arch)
    assert _architectures(patched) == [(arch, arch)]
    assert 'extra_compile_args = {"nvcc": ["-O3"] + cc_flag}' in patched
    compile("def setup():\n    if True:\n" + patched, "setup.py", "exec")  # an emptied `if` keeps a body


def test_kernels_are_compressed_instead_of_carrying_line_tables():
    flags = '"nvcc": ["-O3", "--use_fast_math", "--ptxas-options=-v", "-lineinfo", ] + cc_flag'
    assert compressed_kernels(flags) == ('"nvcc": ["-O3", "--use_fast_math", "--ptxas-options=-v", '
                                         '"-Xfatbin", "-compress-all", ] + cc_flag')


def test_a_setup_py_without_gencode_pairs_is_refused():
    with pytest.raises(ValueError, match="chooses its architectures another way"):
        only_architecture("cc_flag = ['-arch=native']\n", "90")


def test_without_a_sdist_a_cuda_toolkit_or_a_gpu_it_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "absent.tar.gz"), "--out", str(tmp_path)]) == 2
    assert "no sdist at" in capsys.readouterr().err
    sdist = tmp_path / "causal_conv1d-1.7.0.tar.gz"
    sdist.write_bytes(b"")
    import torch

    if not torch.cuda.is_available():  # this machine: nothing to build for (with or without nvcc)
        assert main([str(sdist), "--out", str(tmp_path)]) == 2
        assert re.search(r"no CUDA toolkit \(nvcc and the runtime headers\) found|no CUDA device to build for; say --arch",
                         capsys.readouterr().err)


def test_the_toolkit_is_the_first_with_nvcc_and_runtime_headers(tmp_path, monkeypatch):
    """A wrapper script for nvcc (/usr/local/bin/nvcc here) makes torch guess /usr/local, which has
    no headers: the build must not take a folder without them."""
    wrapper, toolkit = tmp_path / "wrapper", tmp_path / "cuda-13.0"
    (wrapper / "bin").mkdir(parents=True)
    (wrapper / "bin" / "nvcc").write_text("#!/bin/sh\n")
    for part in ("bin/nvcc", "include/cuda_runtime_api.h"):
        (toolkit / part).parent.mkdir(parents=True, exist_ok=True)
        (toolkit / part).write_text("")
    monkeypatch.setenv("CUDA_HOME", str(wrapper))
    monkeypatch.setenv("CUDA_PATH", str(toolkit))
    assert cuda_toolkit() == toolkit
