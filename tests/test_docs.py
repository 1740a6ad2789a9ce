"""The README stays a front page: short, every link alive, every quoted figure tied to its report."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_LIMIT_BYTES = 15_000
RESULTS = "benchmarks/results/"

# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# A measured figure: a digit followed by a percent sign, a ratio ("0.95x ") or a loss in nats.
FIGURE = re.compile(r"\d(?:%|x\s|x$|\s?nats\b)")


def markdown_files() -> list[Path]:
    files = [README, *sorted((ROOT / "docs").glob("*.md"))]
    index = ROOT / RESULTS / "README.md"
    return files + [index] if index.is_file() else files


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def relative_links(path: Path) -> list[str]:
    targets = LINK.findall(path.read_text(encoding="utf-8"))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_readme_is_a_front_page():
    size = README.stat().st_size
    assert size <= README_LIMIT_BYTES, (
        f"README.md is {size} bytes; keep it at most {README_LIMIT_BYTES}, move depth to docs/"
    )


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_a_file_that_exists(path):
    missing, bad_anchors = [], []
    for target in relative_links(path):
        file, _, anchor = target.partition("#")
        linked = path.parent / file
        if not linked.exists():
            missing.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
            bad_anchors.append(target)
    assert not missing, f"{path.relative_to(ROOT)} links to files that do not exist: {missing}"
    assert not bad_anchors, f"{path.relative_to(ROOT)} links to headings that do not exist: {bad_anchors}"


def test_the_link_checker_sees_links():
    # Guards the checker itself: the README links to the docs and to the results.
    links = relative_links(README)
    assert "docs/README.md" in links and any(t.startswith(RESULTS) for t in links), links


def test_every_figure_in_the_readme_links_to_its_report():
    unlinked = [
        f"line {number}: {line.strip()}"
        for number, line in enumerate(README.read_text(encoding="utf-8").splitlines(), start=1)
        if FIGURE.search(line) and f"({RESULTS}" not in line
    ]
    assert not unlinked, "README lines quoting a figure without a link to benchmarks/results/:\n" + "\n".join(unlinked)


@pytest.mark.parametrize(
    ("line", "figure"),
    [
        ("reached 90.25% on average", True),
        ("at 0.89x the throughput", True),
        ("ended 0.044 nats below", True),
        ("a 4x4 patch and 2-core CPU", False),
        ("python -m pytest -x", False),
    ],
)
def test_figure_pattern_tells_figures_from_other_digits(line, figure):
    assert bool(FIGURE.search(line)) is figure
