"""The Triton kernels of Pattention (l2_norm_gelu) against the formula in float64: on the CPU
through Triton's interpreter, so on every machine that has triton (the test extra brings it),
and on a CUDA GPU when there is one. The interpreter test runs in a subprocess: TRITON_INTERPRET
is read when triton is imported. The checks live in ``triton_checks.py``."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton_checks

from tokenformer.pattention import triton_available

needs_triton = pytest.mark.skipif(
    not triton_available(), reason="triton is not installed (pip install 'tokenformer[triton]')"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _interpreter_runs_tile_loops() -> bool:
    # Triton 3.6's interpreter cannot iterate `range(0, K, BLOCK)` over a runtime argument
    # (compiled kernels can); 3.9's can.
    import triton

    return tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 9)


@needs_triton
def test_kernels_under_interpreter():
    if not _interpreter_runs_tile_loops():
        pytest.skip("this Triton's interpreter cannot run the kernels' tile loops; Triton >= 3.9 can")
    checks = Path(triton_checks.__file__)
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, str(checks), "cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_triton
@needs_cuda
def test_kernels_on_cuda():
    triton_checks.check_kernels("cuda")


@needs_triton
@needs_cuda
def test_auto_choice_and_bf16_on_cuda():
    triton_checks.check_cuda_auto_choice_and_bf16()


@needs_triton
@needs_cuda
def test_compiled_model_on_cuda_matches_eager():
    triton_checks.check_compiled_model_on_cuda()
