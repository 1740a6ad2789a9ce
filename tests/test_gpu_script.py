"""benchmarks/gpu.sh stays ready for the next GPU: its smoke run (every stage on the CPU at tiny
sizes, the Triton kernels through the interpreter) passes and writes every report."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tokenformer.pattention import triton_available

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install 'tokenformer[triton]')")
def test_smoke_run_passes_every_stage(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT / "src"))
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu.sh"), "--smoke", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    stages = re.findall(r"^\| (\S+) \| (ok|failed.*?|timed out.*?) \|", summary, flags=re.M)
    assert [name for name, _ in stages] == ["kernels", "pattention", "train_step-150M", "train_step-450M"]
    assert all(status == "ok" for _, status in stages), summary
    layer = (tmp_path / "pattention.md").read_text()
    assert all(f"| {arm} |" in layer for arm in ("floor", "mlp", "reference", "fused", "triton"))
    for preset in ("150M", "450M"):
        report = (tmp_path / f"train_step-{preset}.md").read_text()
        for mode, model in (
            ("eager", "tokenformer"),
            ("compiled-blocks", "tokenformer"),
            ("compiled-blocks", "transformer"),
        ):
            assert f"| {mode} | {model} |" in report, (preset, mode, model)
        assert "## Generation" in report and "peak GiB" in report
