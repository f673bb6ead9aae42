"""Build causal-conv1d's wheel on the GPU machine, for this GPU's architecture only (the GPU kit's
background step; docs/gpu.md).

causal-conv1d's CUDA kernels are what mamba-ssm's fused Mamba training path
(``mamba_split_conv1d_scan_combined``, MCore's ``use_mem_eff_path``) and its packed rows need;
without them the mixer runs ``torch.nn.functional.conv1d`` and more copies. No wheel of it
matches the GPU machine's torch, so the kit compiles the carried sdist there. Its ``setup.py``
compiles for nine architectures and first tries to download a wheel; this build patches the
architecture list down to the GPU's own, compresses the kernels instead of keeping line tables,
strips host debug sections and sets ``CAUSAL_CONV1D_FORCE_BUILD`` (no network), so it takes
minutes, not an hour, and the wheel fits the 16 MiB a file that comes back from the GPU machine. The wheel goes to ``--out``; carried back into ``.whl/``, later kit
runs install it instead of building.

  python scripts/build_causal_conv1d.py SDIST --out DIR [--arch 90] [--jobs 3]

Exit status: 0 with the wheel in DIR; 2 when it cannot start (no nvcc, no CUDA device, no sdist);
1 when the build fails (its output says why).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile
import time

GENCODE = re.compile(r'^(\s*)cc_flag\.append\("-gencode"\)\n\s*cc_flag\.append\("arch=compute_(\d+),code=sm_\d+"\)\n',
                     re.MULTILINE)


def only_architecture(setup_py: str, arch: str) -> str:
    """``setup_py`` with its ``-gencode`` pairs reduced to ``arch`` (e.g. '90' for sm_90): every
    pair becomes a ``pass`` (some sit alone in an ``if`` block), and the wanted pair goes where the
    first one was."""
    pairs = list(GENCODE.finditer(setup_py))
    if not pairs:
        raise ValueError("setup.py has no cc_flag.append(\"-gencode\") pairs: this causal-conv1d version "
                         "chooses its architectures another way")
    indent = pairs[0].group(1)
    wanted = (f'{indent}cc_flag.append("-gencode")\n'
              f'{indent}cc_flag.append("arch=compute_{arch},code=sm_{arch}")\n')
    first = pairs[0].start()
    passed = GENCODE.sub(lambda m: f"{m.group(1)}pass  # sm_{m.group(2)} left out\n", setup_py)
    return passed[:first] + wanted + passed[first:]


def compressed_kernels(setup_py: str) -> str:
    """``setup_py`` with nvcc's ``-lineinfo`` (line tables in every kernel) replaced by a
    compressed fat binary: the wheel must come back from the GPU machine in one file of at most
    16 MiB (25.5 MB for sm_90 as released, with line tables and uncompressed kernels)."""
    return setup_py.replace('"-lineinfo",', '"-Xfatbin", "-compress-all",')


def cuda_toolkit() -> pathlib.Path | None:
    """The CUDA toolkit to build with: the first of CUDA_HOME, CUDA_PATH, torch's guess (from
    ``nvcc`` on PATH, which a wrapper script can mislead) and /usr/local/cuda that has the runtime
    headers and nvcc."""
    from torch.utils.cpp_extension import CUDA_HOME

    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), CUDA_HOME, "/usr/local/cuda"):
        if root and (pathlib.Path(root) / "include" / "cuda_runtime_api.h").is_file() \
                and (pathlib.Path(root) / "bin" / "nvcc").is_file():
            return pathlib.Path(root)
    return None


def _gpu_architecture() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


def build(sdist: pathlib.Path, out: pathlib.Path, arch: str, jobs: int, toolkit: pathlib.Path) -> pathlib.Path:
    """Unpack, patch and build ``sdist`` into a wheel in ``out``; returns the wheel's path."""
    with tempfile.TemporaryDirectory(prefix="causal-conv1d-") as tmp:
        with tarfile.open(sdist) as archive:
            archive.extractall(tmp, filter="data")
        (source,) = [p for p in pathlib.Path(tmp).iterdir() if p.is_dir()]
        setup_py = source / "setup.py"
        setup_py.write_text(compressed_kernels(only_architecture(setup_py.read_text(), arch)))
        # and no host debug sections in the library (another 11 MB)
        ldflags = " ".join(filter(None, [os.environ.get("LDFLAGS"), "-Wl,--strip-debug"]))
        env = dict(os.environ, CAUSAL_CONV1D_FORCE_BUILD="TRUE", MAX_JOBS=str(jobs), LDFLAGS=ldflags,
                   CUDA_HOME=str(toolkit), PATH=f"{toolkit / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
        out.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                   "--no-cache-dir", "-w", str(out), str(source)]
        print("+", " ".join(command), flush=True)
        subprocess.run(command, env=env, check=True)
    (wheel,) = sorted(out.glob("causal_conv1d-*.whl"))[-1:]
    return wheel


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdist", type=pathlib.Path, help="causal_conv1d-VERSION.tar.gz")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="folder for the wheel")
    parser.add_argument("--arch", help="compute capability without the dot (default: this GPU's)")
    parser.add_argument("--jobs", type=int, default=3, help="parallel compile jobs (MAX_JOBS; default 3)")
    args = parser.parse_args(argv)
    if not args.sdist.is_file():
        print(f"build_causal_conv1d: no sdist at {args.sdist}", file=sys.stderr)
        return 2
    toolkit = cuda_toolkit()
    if toolkit is None:
        print("build_causal_conv1d: no CUDA toolkit (nvcc and the runtime headers) found: nothing to build with; "
              "set CUDA_HOME", file=sys.stderr)
        return 2
    arch = args.arch or _gpu_architecture()
    if arch is None:
        print("build_causal_conv1d: no CUDA device to build for; say --arch", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        wheel = build(args.sdist, args.out, arch, args.jobs, toolkit)
    except (subprocess.CalledProcessError, ValueError) as err:
        print(f"build_causal_conv1d: the build failed after {time.perf_counter() - start:.0f} s: {err}",
              file=sys.stderr)
        return 1
    print(f"built {wheel.name} for sm_{arch} with {toolkit} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
