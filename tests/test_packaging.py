"""What a published package promises: its metadata, one version, shipped configs, a clean Makefile."""

import os
import shutil
import subprocess
import sys
from email.parser import Parser
from pathlib import Path

import pytest

import tokenformer
from tokenformer.cli import PACKAGED_CONFIGS, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    """The core metadata a wheel of this source tree gets, as setuptools writes it (a copy of the
    tree is built, so the checkout gains no egg-info)."""
    pytest.importorskip("setuptools", minversion="77")
    tree = tmp_path_factory.mktemp("tree")
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "configs"))
    out = tree / "out"
    out.mkdir()
    script = (
        "import sys; from setuptools import build_meta; print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(out)], cwd=tree, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    info = done.stdout.strip().splitlines()[-1]
    return Parser().parsestr((out / info / "METADATA").read_text())


def test_metadata_has_the_spdx_license_the_version_and_urls(metadata):
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert "License" not in metadata  # the deprecated free-text field
    assert metadata["Version"] == tokenformer.__version__  # one version source: tokenformer.__version__
    assert any(url.startswith("Paper, https://arxiv.org/abs/2410.23168") for url in metadata.get_all("Project-URL"))
    assert "Topic :: Scientific/Engineering :: Artificial Intelligence" in metadata.get_all("Classifier")
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()


def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"tokenformer {tokenformer.__version__}"


def test_every_config_of_the_repository_is_shipped_and_found_by_name(capsys):
    shipped = sorted(p.relative_to(PACKAGED_CONFIGS) for p in PACKAGED_CONFIGS.rglob("*.yaml"))
    assert shipped == sorted(p.relative_to(ROOT / "configs") for p in (ROOT / "configs").rglob("*.yaml"))
    with pytest.raises(SystemExit):
        main(["train", "--config", "cpu-5M", "--max_steps", "7", "--print_config"])
    printed = capsys.readouterr().out
    assert "model: cpu-5M" in printed and "max_steps: 7" in printed and "out_dir: runs/cpu-5M" in printed


def test_an_unknown_config_name_lists_the_shipped_ones(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--config", "cpu-6M"])
    err = capsys.readouterr().err
    assert (
        "--config 'cpu-6M' is neither a file nor a config shipped with tokenformer; "
        "shipped: cpu-5M, cpu-5M-memory, demo" in err
    )


def recipe_lines(makefile: Path) -> list[str]:
    return [line for line in makefile.read_text().splitlines() if line.startswith("\t")]


def test_make_never_calls_sudo():
    assert not [line for line in recipe_lines(ROOT / "Makefile") if "sudo" in line.split("#")[0]]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_fashion_mnist_target_skips_apt_get_unless_root(tmp_path):
    # Stand-ins for `id` (a user who is not root) and `apt-get` (which records that it was called).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "id").write_text("#!/bin/sh\necho 1000\n")
    (bin_dir / "apt-get").write_text(f"#!/bin/sh\ntouch {tmp_path / 'apt-get-called'}\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    done = subprocess.run(
        ["make", "-s", "-f", str(ROOT / "Makefile"), "fashion-mnist", f"FASHION_MNIST_DIR={tmp_path / 'absent'}"],
        cwd=tmp_path,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "the tests that need it will be skipped" in done.stdout
    assert not (tmp_path / "apt-get-called").exists()
