"""The Fashion-MNIST benchmark's report: seeds, means and paired differences (no training)."""

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("vision_fmnist", BENCHMARKS / "vision_fmnist.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def record(arm, seed, accuracy, wall=800.0):
    return dict(
        arm=arm,
        seed=seed,
        lr=1e-3,
        steps=10,
        images=1280,
        flops=1e12,
        parameters=1000,
        val_accuracy=accuracy,
        val_loss=0.3,
        test_accuracy=accuracy,
        test_loss=0.3,
        test_accuracy_raw=None,
        train_s=wall,
        wall_s=wall,
        cpu_s=2 * wall,
        img_s_median=1000.0 if arm == "tokenformer" else 1100.0,
        started="10:00",
        load=(2.0, 2.0),
        resumed=False,
        growth=None,
    )


def test_seeds_option_parses_and_refuses_bad_lists(bench):
    assert bench.parse_seeds("0,1,2") == [0, 1, 2]
    for bad in ("0,x", "1,1", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"--seeds must be .*{bad!r}"):
            bench.parse_seeds(bad)


def test_arm_options_carry_the_seed(bench, tmp_path):
    args = bench.build_parser().parse_args(["--seeds", "3,4"])
    options = bench.arm_options("tokenformer", 1e-3, 1.0, args, {}, tmp_path, seed=4)
    assert options["seed"] == 4 and options["max_steps"] == round(57000 / 128)


def test_main_pair_can_train_on_the_grid_validation_images(bench, tmp_path):
    from tokenformer.train import TrainConfig

    args = bench.build_parser().parse_args(["--final-val-fraction", "0.001", "--grad-clip", "0"])
    grid = bench.arm_options("tokenformer", 1e-3, 2.0, args, {}, tmp_path)
    main = bench.arm_options("tokenformer", 1e-3, 2.0, args, {}, tmp_path, val_fraction=args.final_val_fraction)
    # Epochs count the arm's own training images: 57,000 for the grid, 59,940 with 60 held out.
    assert (grid["val_fraction"], grid["max_steps"]) == (0.05, round(2 * 57000 / 128))
    assert (main["val_fraction"], main["max_steps"]) == (0.001, round(2 * 59940 / 128))
    assert grid["grad_clip"] == main["grad_clip"] == 0.0
    TrainConfig.from_dict(main)  # valid training options
    text = bench.data_split(args)
    assert "the grid and the growth pair 57,000 training images (3,000 held out" in text
    assert "the main pair, its rates chosen, 59,940 training images (60 held out" in text
    assert "no gradient clipping" in bench.recipe(args)
    default = bench.build_parser().parse_args([])
    assert bench.data_split(default) == "57,000 training images (3,000 held out, evenly spaced, for validation)"
    assert "gradient norm clipped to 1" in bench.recipe(default)


def test_one_seed_reports_the_single_difference(bench):
    lines = bench.main_section([record("tokenformer", 0, 0.8983, 871), record("linear", 0, 0.8948, 785)], threads=2)
    text = "\n".join(lines)
    assert "TokenFormer − linear test accuracy: +0.35 points" in text
    assert "not reached with 2 thread(s): 89.83% in 14.5 min" in text


def test_several_seeds_report_means_standard_errors_and_paired_differences(bench):
    pair = [
        # Results written before seeds were recorded are seed 0.
        {k: v for k, v in record("tokenformer", 0, 0.900).items() if k != "seed"},
        record("linear", 0, 0.895),
        record("tokenformer", 1, 0.904),
        record("linear", 1, 0.897),
        record("tokenformer", 2, 0.899, wall=880),
        record("linear", 2, 0.896),
    ]
    text = "\n".join(bench.main_section(pair, threads=2))
    # means 90.10 / 89.60; differences +0.5, +0.7, +0.3: mean +0.50, s.e. 0.2 / sqrt(3) = 0.115
    assert "mean test accuracy: tokenformer 90.10% (s.e. 0.15), linear 89.60% (s.e. 0.06)" in text
    assert "paired by seed: +0.50, +0.70, +0.30; mean +0.50 points (s.e. 0.12)" in text
    assert (
        "judged on the mean over seeds: reached with 2 thread(s): 90.10% on average, the slowest seed in 14.7 min"
        in text
    )
    assert "2 of 3 seeds reached it alone" in text
    assert "| tokenformer | 2 |" in text  # the seed column
    slow = [dict(r, wall_s=901.0) if r["arm"] == "tokenformer" and r.get("seed") == 1 else r for r in pair]
    assert "judged on the mean over seeds: not reached" in "\n".join(bench.main_section(slow, threads=2))


def test_growth_pairs_over_seeds_report_each_growth_and_the_paired_difference(bench):
    args = bench.build_parser().parse_args(["--seeds", "0,1", "--lrs", "1e-3"])
    moment = {"val_accuracy": 0.8, "val_loss": 0.5}
    growth = [
        dict(record("grown", 0, 0.860), growth={"step": 5, "before": moment, "after": moment}),
        record("scratch", 0, 0.866),
        dict(record("grown", 1, 0.864), growth={"step": 5, "before": moment, "after": moment}),
        record("scratch", 1, 0.862),
    ]
    text = bench.render(args, "now", {"tokenformer": [], "linear": []}, [], growth)
    assert "grown − scratch, paired by seed: -0.60, +0.20; mean -0.20 points (s.e. 0.40)" in text
    assert "Validation right before growth (seed 1) (step 5): accuracy 0.8000, loss 0.500000" in text


def test_report_names_the_commit_at_launch_when_the_tree_moved_during_the_run(bench):
    import torch

    now = bench.source_version()
    moved = bench.write_report(None, "T", torch.device("cpu"), "wall", "body", launched_at="abc1234")
    assert f"at commit abc1234 when it started, {now} when it finished):" in moved
    same = bench.write_report(None, "T", torch.device("cpu"), "wall", "body", launched_at=now)
    assert f"at commit {now}):" in same
