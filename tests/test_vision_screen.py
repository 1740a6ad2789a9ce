"""The recipe screen: variants, their training options, the summary, and a tiny run with two workers."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_vision_data import fake_fashion_mnist

from tokenformer.train import TrainConfig

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def screen():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("vision_screen")
    finally:
        sys.path.remove(str(BENCHMARKS))


def write_variants(path, variants):
    path.write_text(json.dumps(variants))
    return str(path)


def test_shipped_variants_give_valid_training_options(screen, tmp_path):
    args = screen.build_parser().parse_args(
        ["--variants", str(BENCHMARKS / "vision_screen_variants.json"), "--seeds", "3,4", "--epochs", "14"]
    )
    runs = screen.jobs(screen.load_variants(args.variants), args, tmp_path)
    assert [(v["name"], seed) for v, seed, _ in runs[:2]] == [
        ("base", 3),
        ("lr7e-4", 3),
    ]  # every variant's first seed first
    for _, _, options in runs:
        TrainConfig.from_dict(options)


def test_shipped_augmentation_variants_reach_the_run(screen, tmp_path):
    args = screen.build_parser().parse_args(
        ["--variants", str(BENCHMARKS / "vision_screen_aug_variants.json"), "--seeds", "0", "--epochs", "30"]
    )
    runs = {
        variant["name"]: options
        for variant, _, options in screen.jobs(screen.load_variants(args.variants), args, tmp_path)
    }
    for options in runs.values():
        TrainConfig.from_dict(options)
    augmentation = {name: (o["crop_padding"], o["hflip"], o["erase_prob"]) for name, o in runs.items()}
    assert augmentation == {
        "base": (0, False, 0.0),
        "crop2": (2, False, 0.0),
        "crop2_hflip": (2, True, 0.0),
        "crop2_erase0.25": (2, False, 0.25),
    }


def test_variant_changes_reach_the_run(screen, tmp_path):
    variants = write_variants(
        tmp_path / "v.json",
        [
            {"name": "base"},
            {
                "name": "big",
                "lr": 2e-3,
                "epochs": 2,
                "model": {"n_heads": 2},
                "options": {"batch_size": 256, "min_lr": 0.0, "val_fraction": 0.001},
            },
        ],
    )
    args = screen.build_parser().parse_args(
        ["--variants", variants, "--model-overrides", '{"lsa": true}', "--device", "cuda:1", "--lrs", "1e-3,2e-3"]
    )
    (_, _, base), (_, _, big) = screen.jobs(screen.load_variants(variants), args, tmp_path)
    assert (base["lr"], base["batch_size"], base["max_steps"], base["val_fraction"]) == (
        1e-3,
        128,
        round(9 * 57000 / 128),
        0.05,
    )
    assert (big["lr"], big["batch_size"], big["max_steps"], big["min_lr"]) == (2e-3, 256, round(2 * 59940 / 256), 0.0)
    assert big["model_overrides"] == {"lsa": True, "n_heads": 2} and base["model_overrides"] == {"lsa": True}
    assert base["device"] == big["device"] == "cuda:1" and base["out_dir"] != big["out_dir"]


@pytest.mark.parametrize(
    "variants, message",
    [
        ({"name": "base"}, "a JSON list of objects"),
        ([{"name": "x"}], "include 'base'"),
        ([{"name": "base"}, {"name": "base"}], "distinct"),
        ([{"name": "base", "epoch": 3}], r"keys \['epoch'\]; allowed: name, lr, epochs, model, options"),
    ],
)
def test_bad_variants_files_are_refused(screen, tmp_path, variants, message):
    with pytest.raises(ValueError, match=message):
        screen.load_variants(write_variants(tmp_path / "v.json", variants))


def result(variant, seed, accuracy):
    return dict(
        variant=variant,
        seed=seed,
        epochs=1,
        parameters=1000,
        steps=10,
        test_accuracy=accuracy,
        val_accuracy=accuracy,
        wall_s=5.0,
    )


def test_summary_pairs_each_variant_with_base_by_seed(screen):
    records = [
        result("base", 0, 0.80),
        result("base", 1, 0.82),
        result("x", 0, 0.81),
        result("x", 1, 0.85),
        result("y", 1, 0.80),
    ]
    rows = {line.split(" | ")[0].strip("| "): line for line in screen.summary(records, ["base", "x", "y"]).splitlines()}
    assert "| 81.00 | 80.00 / 82.00 |  |" in rows["base"]
    assert "| 83.00 | 81.00 / 85.00 | +2.00 (s.e. 1.00), 2 seed(s) |" in rows["x"]
    assert "| 80.00 | 80.00 | -2.00, 1 seed(s) |" in rows["y"]


def test_two_workers_share_the_runs_and_a_rerun_skips_them(screen, tmp_path):
    data = fake_fashion_mnist(tmp_path / "fm", n_train=200, n_test=20)
    variants = write_variants(tmp_path / "v.json", [{"name": "base"}, {"name": "lr", "lr": 3e-3}])
    command = [
        sys.executable,
        str(BENCHMARKS / "vision_screen.py"),
        "--variants",
        variants,
        "--out",
        str(tmp_path / "out"),
        "--workers",
        "2",
        "--data-path",
        str(data),
        "--epochs",
        "0.02",
        "--batch-size",
        "16",
        "--model-overrides",
        '{"n_layers": 1, "d_model": 16, "n_heads": 2}',
    ]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    results = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert sorted((r["variant"], r["seed"]) for r in results) == [("base", 0), ("lr", 0)]
    assert {r["lr"] for r in results} == {1e-3, 3e-3} and all(0 <= r["test_accuracy"] <= 1 for r in results)
    assert "| lr |" in (tmp_path / "out" / "summary.md").read_text()
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 2
