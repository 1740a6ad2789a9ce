"""The Fashion-MNIST experiment: options, seeds, means and paired differences in the report (no
training), and a tiny run end to end on fake data with its resume."""

import argparse
import json
import shlex

import pytest
from test_vision_data import fake_fashion_mnist

from tokenformer.experiments import runner, vision
from tokenformer.train import TrainConfig


def parse(*argv):
    return vision.build_parser().parse_args(list(argv))


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


def test_seeds_option_parses_and_refuses_bad_lists():
    assert vision.parse_seeds("0,1,2") == [0, 1, 2]
    for bad in ("0,x", "1,1", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"--seeds must be .*{bad!r}"):
            vision.parse_seeds(bad)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--lrs", "1e-3,x", "--lrs must be comma-separated learning rates, got '1e-3,x'"),
        ("--lrs", "0,1e-3", "--lrs must be distinct learning rates > 0"),
        ("--grow_to", "ffn_tokens", "--grow_to must be comma-separated KIND_tokens=COUNT"),
        ("--pairs", "main,grid", "--pairs must be main, growth or main,growth; got 'main,grid'"),
        ("--model_overrides", "[1]", "--model_overrides must be a JSON object of VisionConfig fields"),
        ("--epochs", "0", "must be a number of epochs > 0, got '0'"),
    ],
)
def test_bad_options_are_refused_with_the_value_given(capsys, flag, value, message):
    with pytest.raises(SystemExit):
        parse(flag, value)
    assert message in capsys.readouterr().err


def test_bad_training_options_stop_before_any_arm_runs(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"training option weight_decay=-1.0 is invalid"):
        vision.main(["--out_dir", str(tmp_path / "out"), "--weight_decay", "-1"])
    with pytest.raises(SystemExit, match=r"unknown field\(s\) \['colour'\]"):
        vision.main(["--out_dir", str(tmp_path / "out"), "--model_overrides", '{"colour": 1}'])
    assert not (tmp_path / "out").exists()


def test_the_former_flag_spellings_give_the_same_options():
    # A command of benchmarks/results/vision_cpu.md, as it was run (with hyphens), and as
    # `tokenformer train` names the options.
    old = parse(
        *shlex.split(
            "--out runs/v --lrs 5e-4,1e-3 --grid-epochs 1 --epochs 30 --grow-epochs 2 --batch-size 128 --threads 2 "
            "--weight-decay 0.1 --label-smoothing 0.1 --grad-clip 0 --final-val-fraction 0.001 --crop-padding 2 "
            "--compile --ema-decay 0.999 --model-overrides '{\"patch_shift\": 3}' --seeds 1,2 --jobs 2 "
            "--preset fmnist-1M --grow-to qkv_tokens=96"
        )
    )
    new = parse(
        *shlex.split(
            "--out_dir runs/v --lrs 5e-4,1e-3 --grid_epochs 1 --epochs 30 --grow_epochs 2 --batch_size 128 "
            "--threads 2 --weight_decay 0.1 --label_smoothing 0.1 --grad_clip 0 --final_val_fraction 0.001 "
            "--crop_padding 2 --compile --ema_decay 0.999 --model_overrides '{\"patch_shift\": 3}' --seeds 1,2 "
            "--workers 2 --model fmnist-1M --grow_to qkv_tokens=96"
        )
    )
    assert vars(old) == vars(new)
    assert new.grow_to == {"qkv_tokens": 96} and new.lrs == [5e-4, 1e-3] and new.workers == 2


def test_arm_options_carry_the_seed(tmp_path):
    args = parse("--seeds", "3,4")
    options = vision.arm_options("tokenformer", 1e-3, 1.0, args, tmp_path, seed=4)
    assert options["seed"] == 4 and options["max_steps"] == round(57000 / 128)


def test_arms_are_the_matched_linear_vit_and_the_grown_shape_from_scratch(tmp_path):
    from tokenformer.vision import VisionConfig

    args = parse("--grow_to", "qkv_tokens=96,ffn_tokens=512", "--model_overrides", '{"patch_shift": 3}')
    linear = vision.arm_options("linear", 1e-3, 1.0, args, tmp_path)["model_overrides"]
    scratch = vision.arm_options("scratch", 1e-3, 1.0, args, tmp_path)["model_overrides"]
    matched = VisionConfig.from_preset("fmnist-0.3M", patch_shift=3).parameter_matched_linear()
    assert linear == {"patch_shift": 3, "projection": "linear", "ffn_tokens": matched.ffn_tokens}
    assert scratch == {"patch_shift": 3, "qkv_tokens": 96, "ffn_tokens": 512}


def test_main_pair_can_train_on_the_grid_validation_images(tmp_path):
    args = parse("--final_val_fraction", "0.001", "--grad_clip", "0", "--crop_padding", "2", "--label_smoothing", "0.1")
    grid = vision.arm_options("tokenformer", 1e-3, 2.0, args, tmp_path)
    main = vision.arm_options("tokenformer", 1e-3, 2.0, args, tmp_path, val_fraction=args.final_val_fraction)
    # Epochs count the arm's own training images: 57,000 for the grid, 59,940 with 60 held out.
    assert (grid["val_fraction"], grid["max_steps"]) == (0.05, round(2 * 57000 / 128))
    assert (main["val_fraction"], main["max_steps"]) == (0.001, round(2 * 59940 / 128))
    assert grid["grad_clip"] == main["grad_clip"] == 0.0
    config = TrainConfig.from_dict(main)  # valid training options
    assert (config.vision.crop_padding, config.vision.label_smoothing) == (2, 0.1)
    text = vision.data_split(args)
    assert "the grid and the growth pair 57,000 training images (3,000 held out" in text
    assert "the main pair, its rates chosen, 59,940 training images (60 held out" in text
    assert "no gradient clipping" in vision.recipe(args)
    default = parse()
    assert vision.data_split(default) == "57,000 training images (3,000 held out, evenly spaced, for validation)"
    assert "gradient norm clipped to 1" in vision.recipe(default)


def test_one_seed_reports_the_single_difference():
    lines = vision.main_section([record("tokenformer", 0, 0.8983, 871), record("linear", 0, 0.8948, 785)], threads=2)
    text = "\n".join(lines)
    assert "TokenFormer − linear test accuracy: +0.35 points" in text
    assert "not reached with 2 thread(s): 89.83% in 14.5 min" in text


def test_several_seeds_report_means_standard_errors_and_paired_differences():
    pair = [
        # Results written before seeds were recorded are seed 0.
        {k: v for k, v in record("tokenformer", 0, 0.900).items() if k != "seed"},
        record("linear", 0, 0.895),
        record("tokenformer", 1, 0.904),
        record("linear", 1, 0.897),
        record("tokenformer", 2, 0.899, wall=880),
        record("linear", 2, 0.896),
    ]
    text = "\n".join(vision.main_section(pair, threads=2))
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
    assert "judged on the mean over seeds: not reached" in "\n".join(vision.main_section(slow, threads=2))


def test_growth_pairs_over_seeds_report_each_growth_and_the_paired_difference():
    args = parse("--seeds", "0,1", "--lrs", "1e-3")
    moment = {"val_accuracy": 0.8, "val_loss": 0.5}
    growth = [
        dict(record("grown", 0, 0.860), growth={"step": 5, "before": moment, "after": moment}),
        record("scratch", 0, 0.866),
        dict(record("grown", 1, 0.864), growth={"step": 5, "before": moment, "after": moment}),
        record("scratch", 1, 0.862),
    ]
    text = vision.render(args, "now", {"tokenformer": [], "linear": []}, [], growth)
    assert "grown − scratch, paired by seed: -0.60, +0.20; mean -0.20 points (s.e. 0.40)" in text
    assert "Validation right before growth (seed 1) (step 5): accuracy 0.8000, loss 0.500000" in text
    assert "then grown to qkv_tokens=96,proj_tokens=96,ffn_tokens=512" in text
    assert "No learning-rate grid: every arm uses lr 0.001, tuned for neither." in text


def test_report_names_the_commit_at_launch_when_the_tree_moved_during_the_run():
    now = runner.source_version()
    moved = runner.write_report(None, "T", "body", "python -m x", "cpu", launched_at="abc1234")
    assert f"at commit abc1234 when it started, {now} when it finished):\n\n    python -m x\n" in moved
    same = runner.write_report(None, "T", "body", "python -m x", "cpu", launched_at=now)
    assert f"at commit {now}):" in same
    assert "- CPU: " in same and "vector flags: " in same and same.endswith("body\n")


@pytest.mark.slow
def test_a_tiny_experiment_chooses_rates_on_the_grid_and_a_rerun_skips_finished_arms(tmp_path, capsys):
    data = fake_fashion_mnist(tmp_path / "fm", n_train=200, n_test=20)
    out = tmp_path / "out"
    tiny = {"n_layers": 1, "d_model": 16, "n_heads": 2, "qkv_tokens": 8, "proj_tokens": 8, "ffn_tokens": 16}
    tiny |= {"patch_tokens": 8, "head_tokens": 8}
    argv = ["--out_dir", str(out), "--data_path", str(data), "--model_overrides", json.dumps(tiny)]
    argv += ["--lrs", "1e-3,3e-3", "--grid_epochs", "0.002", "--epochs", "0.004", "--grow_epochs", "0.004"]
    argv += ["--batch_size", "16", "--grow_to", "qkv_tokens=12,ffn_tokens=24", "--workers", "2"]
    vision.main(argv)
    printed = capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert printed.strip() == report.strip()
    assert report.startswith("# Fashion-MNIST on CPU: TokenFormer-ViT vs the linear ViT, grown vs scratch")
    assert f"    python -m tokenformer.experiments.vision {shlex.join(argv)}\n" in report

    def stored(tag):
        return json.loads((out / tag / runner.RESULT).read_text())

    # Each main arm trains at the rate of its best validation accuracy on the grid (the first on a tie).
    for arm in vision.MAIN_ARMS:
        grid = {lr: stored(f"grid-{arm}-{runner.lr_name(lr)}")["val_accuracy"] for lr in (1e-3, 3e-3)}
        best = max(grid, key=grid.get)
        main = stored(arm)
        assert main["lr"] == best and main["steps"] == vision.steps_for_epochs(0.004, 16)
        row = " | ".join(f"{grid[lr]:.4f}" for lr in (1e-3, 3e-3))
        assert f"| {arm} | {row} | {best:g} * |" in report  # both rates are edges of a grid of two
        assert f"| {arm} | 0 | {main['parameters']:,} | {best:g} | {main['steps']} |" in report
        tested = json.loads((out / arm / "test_metrics.json").read_text())
        assert (tested["accuracy"], tested["count"]) == (main["test_accuracy"], 20)
    tokenformer, linear = stored("tokenformer"), stored("linear")
    assert abs(linear["parameters"] - tokenformer["parameters"]) / tokenformer["parameters"] < 0.05
    # Growth keeps the function: validation right after equals right before; scratch starts at the grown size.
    grown, scratch = stored("grown"), stored("scratch")
    assert grown["growth"]["after"]["val_loss"] == pytest.approx(grown["growth"]["before"]["val_loss"], rel=1e-5)
    assert grown["parameters"] == scratch["parameters"] > tokenformer["parameters"]
    assert grown["lr"] == scratch["lr"] == tokenformer["lr"]
    assert "Validation right before growth (step " in report

    stamps = {path: path.stat().st_mtime_ns for path in out.glob(f"*/{runner.RESULT}")}
    assert len(stamps) == 8  # 2 arms x 2 rates on the grid, the main pair, the growth pair
    vision.main(argv)
    assert {path: path.stat().st_mtime_ns for path in out.glob(f"*/{runner.RESULT}")} == stamps
    again = (out / "report.md").read_text()
    assert again.split("## Learning-rate grid")[1] == report.split("## Learning-rate grid")[1]
