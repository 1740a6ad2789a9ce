"""Tokenizing a corpus into token shards: throughput and peak memory of the streaming build,
by number of workers, against the path that read the corpus whole (an older commit).

The corpus is generated: the King James Bible's verses in a seeded random order, in paragraphs
of one to eight verses, one document per file of ``--file-mb`` MB. Each arm runs in a fresh
process (so that its peak RSS is its own) on a fresh cache directory, and reports wall-clock and
CPU seconds, MB of text per second, peak RSS and the RSS before the corpus was read (Python,
torch and the tokenizer). The arms on the smaller subset are checked to store the same ids.

    python benchmarks/tokenization.py --tokenizer PATH/tokenizer.json --size-mb 2048 --old-size-mb 256 \\
        --work-dir /tmp/tokenize-bench --out benchmarks/results/tokenize-cpu.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def generate(directory: Path, size_mb: int, file_mb: int, seed: int = 0) -> list[Path]:
    """Files of about ``file_mb`` MB of shuffled KJV verses, ``size_mb`` MB in all (written once)."""
    sys.path.insert(0, str(ROOT / "src"))
    from tokenformer.data import kjv_documents

    verses = [line for doc in kjv_documents() for line in doc.text.splitlines() if line.strip()]
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for index in range(max(1, size_mb // file_mb)):
        path = directory / f"part-{index:04d}.txt"
        files.append(path)
        if path.is_file() and path.stat().st_size >= file_mb << 20:
            continue
        with open(path, "w", encoding="utf-8") as f:
            written = 0
            while written < file_mb << 20:
                paragraph = "\n".join(rng.choice(verses) for _ in range(rng.randint(1, 8))) + "\n\n"
                written += f.write(paragraph)
    return files


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(spec: dict) -> None:
    """One arm, in its own process: prints a JSON line of measurements."""
    sys.path.insert(0, spec["src"])
    from tokenformer.data import build_shards, load_tokenizer

    tokenizer = load_tokenizer(spec["tokenizer"])
    tokenizer.encode("warm up")
    before = rss_mib()
    start, cpu_start = time.perf_counter(), time.process_time()
    fingerprint_s = None
    if spec["arm"] == "old":
        from tokenformer.data import load_documents

        directory = build_shards(load_documents(spec["files"]), tokenizer, spec["cache"])
    else:
        from tokenformer.data import Corpus

        corpus = Corpus(spec["files"])
        corpus.fingerprint()
        fingerprint_s = time.perf_counter() - start
        directory = build_shards(corpus, tokenizer, spec["cache"], workers=spec["workers"])
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    meta = json.loads((Path(directory) / "meta.json").read_text())
    digests = {}
    for split in ("train", "val"):
        digest = hashlib.sha256()
        for name, *_ in meta["files"][split]:
            digest.update((Path(directory) / name).read_bytes())
        digests[split] = digest.hexdigest()
    tokens = sum(entry[1] for split in ("train", "val") for entry in meta["files"][split])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(dict(seconds=seconds, cpu=cpu, fingerprint_s=fingerprint_s, rss_before=before, peak=peak,
                          tokens=tokens, digests=digests)))  # fmt: skip


def run_arm(name: str, spec: dict, env: dict[str, str]) -> dict:
    shutil.rmtree(spec["cache"], ignore_errors=True)
    load = os.getloadavg()[0]
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    shutil.rmtree(spec["cache"], ignore_errors=True)
    if done.returncode != 0:
        raise SystemExit(f"arm {name} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(name=name, load_before=load, load_after=os.getloadavg()[0])
    result["mb"] = sum(Path(f).stat().st_size for f in spec["files"]) / 1e6
    print(f"{name}: {result['mb'] / result['seconds']:.2f} MB/s, peak {result['peak']:.0f} MiB", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help="tokenizer.json to tokenize with")
    parser.add_argument("--size-mb", type=int, default=2048, help="generated corpus size")
    parser.add_argument("--file-mb", type=int, default=128, help="size of each generated file (one document)")
    parser.add_argument("--old-size-mb", type=int, default=256, help="the subset that every arm tokenizes")
    parser.add_argument("--old-commit", default="6a324ec", help="commit of the path that read the corpus whole")
    parser.add_argument("--workers", default="1,2", help="streaming arms: worker counts (one core per worker)")
    parser.add_argument("--work-dir", required=False, help="corpus and caches go here; deleted at the end")
    parser.add_argument("--keep", action="store_true", help="keep the generated corpus")
    parser.add_argument("--out", default=None, help="write the markdown report here")
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if not args.tokenizer or not args.work_dir:
        parser.error("--tokenizer and --work-dir are required")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import command_line, runner

    launched_at = runner.source_version()
    work = Path(args.work_dir)
    files = generate(work / "corpus", args.size_mb, args.file_mb)
    subset = files[: max(1, args.old_size_mb // args.file_mb)]
    old_src = work / "old"
    shutil.rmtree(old_src, ignore_errors=True)
    old_src.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", args.old_commit, "src"], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(old_src)], input=archive.stdout, check=True)

    def spec(arm: str, chosen: list[Path], workers: int | None = None, src: Path = ROOT / "src") -> dict:
        return dict(arm=arm, src=str(src), tokenizer=args.tokenizer, files=[str(f) for f in chosen],
                    cache=str(work / "cache"), workers=workers)  # fmt: skip

    subset_mb = sum(f.stat().st_size for f in subset) / 1e6
    one_core = {"TOKENIZERS_PARALLELISM": "false"}
    results = []
    try:
        results.append(run_arm("old path (reads it whole)", spec("old", subset, src=old_src / "src"), {}))
        results.append(run_arm("streaming, 2 workers, library threads", spec("new", subset, 2), {}))
        for workers in (int(w) for w in args.workers.split(",")):
            results.append(run_arm(f"streaming, {workers} worker(s)", spec("new", subset, workers), one_core))
        for workers in (int(w) for w in args.workers.split(",")):
            results.append(run_arm(f"streaming, {workers} worker(s)", spec("new", files, workers), one_core))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    # Arms on the subset, grouped by the ids they stored.
    groups: dict[str, list[str]] = {}
    for r in results:
        if r["mb"] == subset_mb:
            groups.setdefault(json.dumps(r["digests"]), []).append(r["name"])
    agreement = (
        "all stored the same ids"
        if len(groups) == 1
        else "stored different ids: " + "; ".join(" = ".join(names) for names in groups.values())
    )
    rows = [
        [
            r["name"],
            f"{r['mb']:.0f}",
            f"{r['tokens'] / 1e6:.1f}",
            f"{r['seconds']:.1f}",
            "" if r["fingerprint_s"] is None else f"{r['fingerprint_s']:.1f}",
            f"{r['mb'] / r['seconds']:.2f}",
            f"{r['mb'] / r['cpu']:.2f}",
            f"{r['rss_before']:.0f}",
            f"{r['peak']:.0f}",
            f"{r['load_before']:.1f} / {r['load_after']:.1f}",
        ]
        for r in results
    ]
    headers = ["arm", "MB", "M tokens", "wall s", "of which hashing s", "MB/s", "MB per CPU-s",
               "RSS before MiB", "peak RSS MiB", "load avg before / after"]  # fmt: skip
    body = (
        "The machine is shared with other jobs (1-minute load averages in the table).\n\n"
        f"Tokenizer: {Path(args.tokenizer).name}. Old path: commit {args.old_commit}. "
        f"Arms on the {subset_mb:.0f} MB subset: {agreement}.\n\n" + runner.markdown_table(headers, rows)
    )
    text = runner.write_report(
        args.out, "Tokenizing a corpus into token shards (CPU)", body, command_line(), "cpu", launched_at
    )
    print(text)


if __name__ == "__main__":
    main()
