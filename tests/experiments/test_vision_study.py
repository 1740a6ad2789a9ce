"""Studies of vision recipes: the shipped screens as study plans, variant changes reaching the runs,
the choice of rates and the pairing on an accuracy (higher is better), and a tiny vision study on
fake data with two workers, its report recomputed from the stored runs."""

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from test_vision_data import fake_fashion_mnist

from tokenformer.experiments import runner, study
from tokenformer.experiments.study import StudyPlan, load_plan, run_study
from tokenformer.experiments.vision import steps_for_epochs
from tokenformer.train import TrainConfig

STUDIES = Path(__file__).resolve().parents[2] / "configs" / "studies"
TINY_VIT = dict(
    n_layers=1, d_model=16, n_heads=2, qkv_tokens=8, proj_tokens=8, ffn_tokens=16, patch_tokens=8, head_tokens=8
)
# The variants of the GPU screen: (learning rate, epochs, batch size, share held out for validation).
SCREEN = {
    "base": (1e-3, 14, 128, 0.05),
    "lr7e-4": (7e-4, 14, 128, 0.05),
    "lr1.5e-3": (1.5e-3, 14, 128, 0.05),
    "lr2e-3": (2e-3, 14, 128, 0.05),
    "val60": (1e-3, 13.312, 128, 0.001),
    "heads2": (1e-3, 13.6, 128, 0.05),
    "batch256-lr2e-3": (2e-3, 14.6, 256, 0.05),
    "batch64-lr7e-4": (7e-4, 11.9, 64, 0.05),
    "3x80": (1e-3, 13, 128, 0.05),
    "3x64": (1e-3, 18, 128, 0.05),
    "cls": (1e-3, 11.9, 128, 0.05),
    "patch_tokens128": (1e-3, 13.3, 128, 0.05),
}


def vision_plan(out_dir, data_path=None, **changes) -> dict:
    plan = dict(
        out_dir=str(out_dir),
        baseline="base",
        metric="test_accuracy",
        lr_grid=[1e-3, 3e-3],
        seeds=[1, 2],
        variants=[{"name": "base"}, {"name": "crop", "train": {"vision": {"crop_padding": 2}}}],
        train=dict(
            task="vision",
            model="fmnist-0.3M",
            model_overrides=dict(TINY_VIT),
            vision={"data_path": None if data_path is None else str(data_path), "label_smoothing": 0.1},
            batch_size=16,
            max_steps=6,
            warmup_steps=1,
            eval_interval=3,
            ckpt_interval=3,
            device="cpu",
            threads=1,
        ),
    )
    return {**plan, **changes}


def test_the_gpu_screen_plan_expresses_the_screens_runs():
    plan = load_plan(STUDIES / "vision-screen.yaml")
    jobs = plan.jobs()
    assert len(jobs) == 22 * 2
    assert [(job["variant"], job["seed"]) for job in jobs[:2]] == [("base", 10), ("lr7e-4", 10)]  # first seeds first
    assert {job["seed"] for job in jobs[22:]} == {11}
    configs = {}
    for job in jobs:
        config = TrainConfig.from_dict(job["config"])  # every run's options are valid
        configs.setdefault(job["variant"], config)
    for name, (lr, epochs, batch_size, val_fraction) in SCREEN.items():
        config = configs[name]
        assert (config.lr, config.batch_size, config.val_fraction) == (lr, batch_size, val_fraction), name
        assert config.max_steps == steps_for_epochs(epochs, batch_size, val_fraction), name
        assert config.min_lr == pytest.approx(lr / 10)
    base = configs["base"]
    assert base.model_overrides == {"patch_shift": 3, "drop_path": 0.1, "lsa": True, "patch_bias": True}
    assert (base.weight_decay, base.grad_clip, base.ema_decay, base.vision.label_smoothing) == (0.1, 1.0, 0.999, 0.1)
    assert (base.warmup_steps, base.compile, base.device) == (200, False, "cuda")
    assert configs["min_lr0"].min_lr == 0.0 and configs["no_clip"].grad_clip == 0.0
    assert configs["smoothing0.2"].vision.label_smoothing == 0.2 and configs["wd0.2"].weight_decay == 0.2
    assert configs["ema0.998"].ema_decay == 0.998 and configs["drop_path0"].model_overrides["drop_path"] == 0.0
    assert configs["no_lsa"].model_overrides == {**base.model_overrides, "lsa": False}
    assert configs["3x64"].model_overrides["n_layers"] == 3 and configs["cls"].model_overrides["pool"] == "cls"
    assert plan.metric == "test_accuracy" and plan.baseline == "base"


def test_the_augmentation_screen_plan_reaches_the_runs():
    plan = load_plan(STUDIES / "vision-screen-aug.yaml")
    runs = {job["variant"]: TrainConfig.from_dict(job["config"]) for job in plan.jobs()}
    augmentation = {name: (c.vision.crop_padding, c.vision.hflip, c.vision.erase_prob) for name, c in runs.items()}
    assert augmentation == {
        "base": (0, False, 0.0),
        "crop2": (2, False, 0.0),
        "crop2_hflip": (2, True, 0.0),
        "crop2_erase0.25": (2, False, 0.25),
    }
    for config in runs.values():  # the other vision options stay the recipe's
        assert (config.vision.label_smoothing, config.max_steps) == (0.1, steps_for_epochs(30, 128))
        assert (config.lr, config.seed, config.compile, config.grad_clip) == (1e-3, 0, True, 0.0)


def test_variant_changes_reach_the_run(tmp_path):
    variants = [
        {"name": "base"},
        {
            "name": "big",
            "lr_grid": [2e-3],
            "min_lr_ratio": 0.0,
            "model_overrides": {"n_heads": 4},
            "train": {"batch_size": 32, "max_steps": 9, "val_fraction": 0.001, "vision": {"crop_padding": 1}},
        },
    ]
    plan = StudyPlan.from_dict(vision_plan(tmp_path / "out", variants=variants, lr_grid=[1e-3]))
    plan.train.device = "cuda:1"
    base = plan.run_config(plan.variant("base"), 1e-3, 1)
    big = plan.run_config(plan.variant("big"), 2e-3, 1)
    assert (base.lr, base.min_lr, base.batch_size, base.max_steps, base.val_fraction) == (1e-3, 1e-4, 16, 6, 0.05)
    assert (big.lr, big.min_lr, big.batch_size, big.max_steps, big.val_fraction) == (2e-3, 0.0, 32, 9, 0.001)
    assert big.model_overrides == {**TINY_VIT, "n_heads": 4} and base.model_overrides == TINY_VIT
    # A group of options changes only what it names: label smoothing stays the recipe's.
    assert (big.vision.crop_padding, big.vision.label_smoothing) == (1, 0.1)
    assert (base.vision.crop_padding, base.vision.label_smoothing) == (0, 0.1)
    assert base.device == big.device == "cuda:1" and base.out_dir != big.out_dir
    # An option of the group given ungrouped changes the run all the same.
    flat = StudyPlan.from_dict(
        vision_plan(tmp_path / "out", variants=[{"name": "base"}, {"name": "f", "train": {"hflip": True}}])
    )
    config = flat.run_config(flat.variant("f"), 1e-3, 1)
    assert (config.vision.hflip, config.vision.label_smoothing) == (True, 0.1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"metric": "accuracy"},
            "study field metric='accuracy' is invalid; allowed: val_loss, val_accuracy, test_loss",
        ),
        (
            {"variants": [{"name": "base", "min_lr_ratio": 2}, {"name": "b"}]},
            r"variants\[0\].min_lr_ratio=2 is invalid; allowed: a number in \[0, 1\]",
        ),
        (
            {"variants": [{"name": "base", "train": {"vision": {"crop_padding": -1}}}, {"name": "b"}]},
            "vision.crop_padding=-1 is invalid",
        ),
    ],
)
def test_plan_errors_name_the_field(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        StudyPlan.from_dict(vision_plan(tmp_path / "out", **change))


def run(variant, lr, seed, accuracy, loss=0.5):
    return {
        "variant": variant,
        "lr": lr,
        "seed": seed,
        "final_val_loss": loss,
        "final_val_accuracy": accuracy - 0.01,
        "test_accuracy": accuracy,
        "test_loss": loss,
        "curve": [],
    }


def test_an_accuracy_chooses_the_highest_rate_and_pairs_by_seed(tmp_path):
    data = vision_plan(tmp_path / "out", lr_grid=[1e-3, 2e-3])
    data["variants"] += [{"name": "y"}]
    plan = StudyPlan.from_dict(data)
    runs = [
        run("base", 1e-3, 1, 0.80, loss=0.1),  # the lowest loss, but not the highest accuracy
        run("base", 1e-3, 2, 0.82, loss=0.1),
        run("base", 2e-3, 1, 0.70),
        run("base", 2e-3, 2, 0.60),
        run("crop", 1e-3, 1, 0.70),
        run("crop", 1e-3, 2, 0.70),
        run("crop", 2e-3, 1, 0.81),
        run("crop", 2e-3, 2, 0.85),
        run("y", 1e-3, 2, 0.80),
    ]
    analysis = study.analyse(plan, runs)
    assert analysis["metric"] == "test_accuracy"
    base, crop, y = (analysis["variants"][name] for name in ("base", "crop", "y"))
    assert (base["best_lr"], crop["best_lr"], y["best_lr"]) == (1e-3, 2e-3, 1e-3)
    assert crop["mean"] == pytest.approx(0.83) and crop["se"] == pytest.approx(0.02)
    assert crop["vs_baseline"]["mean"] == pytest.approx(0.02) and crop["vs_baseline"]["se"] == pytest.approx(0.01)
    assert y["vs_baseline"]["n"] == 1 and y["vs_baseline"]["mean"] == pytest.approx(-0.02)
    assert crop["metrics"]["val_accuracy"] == pytest.approx(0.82)
    text = study.report(
        {
            "command": "c",
            "machine": runner.machine(1, "cpu", "fp32"),
            "plan": plan.to_dict(),
            "runs": runs,
            "analysis": analysis,
        }
    )
    assert "Best rate: the highest mean test accuracy over the seeds" in text
    assert "The rates were chosen on the test split" in text
    assert "| `crop` | — | 0.002* | 0.8300 ± 0.0200 | 0.8100 / 0.8500 | +0.0200 ± 0.0100 (n=2) |" in text
    assert "| `y` | — | 0.001* | 0.8000 | 0.8000 | -0.0200 (n=1) |" in text
    assert '`vision: {"label_smoothing": 0.1}`' in text  # the recipe: options not at their defaults
    # The same runs compared on the validation loss: the lowest wins.
    loss = study.analyse(StudyPlan.from_dict({**data, "metric": "val_loss"}), runs)
    assert loss["variants"]["base"]["best_lr"] == 1e-3 and loss["variants"]["crop"]["best_lr"] == 1e-3


def test_a_test_metric_of_a_task_without_a_test_split_is_refused(tmp_path):
    plan = StudyPlan.from_dict(vision_plan(tmp_path / "out"))
    language_model_run = {"variant": "base", "lr": 1e-3, "seed": 1, "final_val_loss": 4.0}
    with pytest.raises(
        ValueError, match=r"metric='test_accuracy' is invalid; allowed: a metric that run base .*: val_loss"
    ):
        study.analyse(plan, [language_model_run])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision-study")
    data = fake_fashion_mnist(root / "fm", n_train=200, n_test=20)
    path = root / "plan.yaml"
    plan = vision_plan(root / "out", data)
    # The first seed's runs in this process, then the study with the second seed added: its runs
    # in two worker processes.
    threads = torch.get_num_threads()
    path.write_text(yaml.safe_dump({**plan, "seeds": plan["seeds"][:1]}))
    run_study(load_plan(path), "tokenformer study plan.yaml")
    torch.set_num_threads(threads)
    path.write_text(yaml.safe_dump(plan))
    results = run_study(load_plan(path), "tokenformer study plan.yaml --workers 2", workers=2)
    return load_plan(path), results, path


@pytest.mark.slow
def test_a_vision_study_chooses_rates_on_test_accuracy_from_the_stored_runs(finished):
    plan, results, _ = finished
    stored = {}
    for variant in plan.variants:
        for lr in plan.grid(variant):
            for seed in plan.seeds:
                run_dir = plan.run_dir(variant, lr, seed)
                result = json.loads((run_dir / runner.RESULT).read_text())
                tested = json.loads((run_dir / "test_metrics.json").read_text())  # the run's test, written
                assert (
                    (result["test_accuracy"], result["test_count"])
                    == (tested["accuracy"], tested["count"])
                    == (
                        result["test_accuracy"],
                        20,
                    )
                )
                assert result["test_loss"] == tested["loss"] and 0 <= result["final_val_accuracy"] <= 1
                stored.setdefault(variant.name, {}).setdefault(lr, {})[seed] = result["test_accuracy"]
    analysis = results["analysis"]["variants"]
    for name, by_lr in stored.items():
        best = max(plan.lr_grid, key=lambda lr, by_lr=by_lr: statistics.fmean(by_lr[lr].values()))  # first on a tie
        assert analysis[name]["best_lr"] == best
        accuracies = [by_lr[best][s] for s in plan.seeds]
        assert analysis[name]["mean"] == pytest.approx(statistics.fmean(accuracies))
        assert analysis[name]["se"] == pytest.approx(statistics.stdev(accuracies) / math.sqrt(2))
    base = stored["base"][analysis["base"]["best_lr"]]
    crop = stored["crop"][analysis["crop"]["best_lr"]]
    diffs = [crop[s] - base[s] for s in plan.seeds]
    paired = analysis["crop"]["vs_baseline"]
    assert paired["diffs"] == pytest.approx(diffs) and paired["mean"] == pytest.approx(statistics.fmean(diffs))
    text = (Path(plan.out_dir) / "report.md").read_text()
    assert text == study.report(results)
    assert "## Test accuracy, each variant at its best learning rate" in text
    assert f"{paired['mean']:+.4f} ± {paired['se']:.4f} (n=2)" in text
    assert "## Every final metric at the best rate" in text


@pytest.mark.slow
def test_a_rerun_of_the_vision_study_skips_its_finished_runs(finished):
    plan, results, path = finished
    stamps = {d: (d / runner.RESULT).stat().st_mtime_ns for d in Path(plan.out_dir).glob("runs/*/*/*")}
    assert len(stamps) == 2 * 2 * 2
    again = run_study(load_plan(path), "again", workers=2)
    assert {d: (d / runner.RESULT).stat().st_mtime_ns for d in stamps} == stamps
    assert again["analysis"] == results["analysis"]
