"""Recipe studies: a tiny study end to end, seeds as independent runs, resume, the report's numbers
recomputed from the stored runs, plan errors."""

import json
import math
import statistics
from pathlib import Path

import pytest
import yaml
from conftest import TINY_MODEL

from tokenformer.cli import main
from tokenformer.experiments import runner, study
from tokenformer.experiments.study import StudyPlan, load_plan, run_study

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_study(corpus_file, cache_dir, out_dir, **changes) -> dict:
    plan = dict(
        out_dir=str(out_dir),
        baseline="transformer",
        lr_grid=[0.003, 0.01],
        seeds=[1, 2],
        variants=[
            {"name": "transformer", "matched_linear": True},
            {"name": "tokenformer"},
            {"name": "small-values", "model_overrides": {"value_scale": 0.25}, "train": {"token_weight_decay": 0.0}},
        ],
        compare=[["small-values", "tokenformer"]],
        train=dict(
            model="cpu-0.3M",
            model_overrides=dict(TINY_MODEL),
            data=str(corpus_file),
            vocab_size=512,
            cache_dir=str(cache_dir),
            seq_len=32,
            batch_size=4,
            max_steps=4,
            warmup_steps=1,
            eval_interval=2,
            eval_batches=2,
            ckpt_interval=4,
            device="cpu",
            threads=1,
        ),
    )
    return {**plan, **changes}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus_file, cache_dir):
    out = tmp_path_factory.mktemp("study") / "out"
    path = out.parent / "plan.yaml"
    path.write_text(yaml.safe_dump(tiny_study(corpus_file, cache_dir, out)))
    main(["study", str(path)])
    return load_plan(path), json.loads((out / "results.json").read_text()), path


def test_every_variant_lr_and_seed_is_a_run_of_its_own(finished):
    plan, results, _ = finished
    runs = results["runs"]
    assert len(runs) == 3 * 2 * 2
    keys = {(r["variant"], r["lr"], r["seed"]) for r in runs}
    assert len(keys) == 12
    # Seeds are independent runs: the same variant and rate end differently with another seed.
    for variant in ("transformer", "tokenformer"):
        for lr in plan.lr_grid:
            losses = [r["final_val_loss"] for r in runs if r["variant"] == variant and r["lr"] == lr]
            assert len(set(losses)) == 2
    # Every run saw the same number of tokens; the matched Transformer has (almost) the TokenFormer's size.
    assert len({r["tokens"] for r in runs}) == 1
    sizes = {r["variant"]: r["non_embedding_parameters"] for r in runs}
    assert abs(sizes["transformer"] - sizes["tokenformer"]) / sizes["tokenformer"] < 0.01
    config = plan.run_config(plan.variant("small-values"), 0.01, 2)
    assert config.token_weight_decay == 0.0 and config.model_overrides["value_scale"] == 0.25
    assert config.seed == 2 and config.min_lr == pytest.approx(0.001)
    assert (plan.run_dir(plan.variant("tokenformer"), 0.003, 1) / runner.RESULT).is_file()


def test_report_numbers_are_recomputed_from_the_stored_runs(finished):
    plan, results, _ = finished
    stored = {}
    for run_dir in (plan.run_dir(v, lr, s) for v in plan.variants for lr in plan.lr_grid for s in plan.seeds):
        r = json.loads((run_dir / runner.RESULT).read_text())
        stored.setdefault(r["variant"], {}).setdefault(r["lr"], {})[r["seed"]] = r["final_val_loss"]
    analysis = results["analysis"]["variants"]
    for name, by_lr in stored.items():
        best = min(by_lr, key=lambda lr, by_lr=by_lr: statistics.fmean(by_lr[lr].values()))
        assert analysis[name]["best_lr"] == best
        losses = [by_lr[best][s] for s in (1, 2)]
        assert analysis[name]["mean"] == pytest.approx(statistics.fmean(losses))
        assert analysis[name]["se"] == pytest.approx(statistics.stdev(losses) / math.sqrt(2))
    base = stored["transformer"][analysis["transformer"]["best_lr"]]
    mine = stored["tokenformer"][analysis["tokenformer"]["best_lr"]]
    diffs = [mine[s] - base[s] for s in (1, 2)]
    paired = analysis["tokenformer"]["vs_baseline"]
    assert paired["mean"] == pytest.approx(statistics.fmean(diffs))
    assert paired["se"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(2))
    assert "vs_baseline" not in analysis["transformer"]
    small = stored["small-values"][analysis["small-values"]["best_lr"]]
    (pair,) = results["analysis"]["comparisons"]
    assert (pair["variant"], pair["other"]) == ("small-values", "tokenformer")
    assert pair["diffs"] == pytest.approx([small[s] - mine[s] for s in (1, 2)])
    text = study.report(results)
    assert f"{paired['mean']:+.4f} ± {paired['se']:.4f} (n=2)" in text
    assert "Variants per model family: Transformer 1, TokenFormer 2; learning rates per variant: 2." in text
    commit = runner.source_version()
    assert all(r["commit"] == commit for r in results["runs"])
    assert f"Runs trained at commit {commit}; report written at commit {commit}." in text
    assert f"| `small-values` | `tokenformer` | {pair['mean']:+.4f} | {pair['se']:.4f} | 2 |" in text
    # Size and compute beside each variant: FLOPs per token of its best-rate run.
    run = next(
        r for r in results["runs"] if r["variant"] == "tokenformer" and r["lr"] == analysis["tokenformer"]["best_lr"]
    )
    size_row = f"| `tokenformer` | {run['parameters']:,} | {run['non_embedding_parameters']:,} | "
    assert size_row + f"{run['flops'] / run['tokens'] / 1e6:.2f}M |" in text
    assert (Path(plan.out_dir) / "curves.png").stat().st_size > 0
    assert (Path(plan.out_dir) / "report.md").read_text() == text


def test_a_rerun_skips_finished_runs_and_resumes_unfinished_ones(finished, tmp_path):
    plan, results, path = finished
    run_dir = plan.run_dir(plan.variant("tokenformer"), 0.01, 2)
    stamp = (run_dir / runner.RESULT).stat().st_mtime_ns
    # An interrupted run: its result is gone, its checkpoints stay; the rerun continues it to the end.
    other = plan.run_dir(plan.variant("small-values"), 0.003, 1)
    before = json.loads((other / runner.RESULT).read_text())
    (other / runner.RESULT).unlink()
    again = run_study(load_plan(path), "again")
    assert (run_dir / runner.RESULT).stat().st_mtime_ns == stamp
    after = json.loads((other / runner.RESULT).read_text())
    assert after["final_val_loss"] == before["final_val_loss"]
    assert again["analysis"] == results["analysis"]


def test_edge_of_the_grid_is_flagged():
    assert runner.at_edge(0.01, [0.003, 0.01]) and not runner.at_edge(0.004, [0.002, 0.004, 0.008])
    # Only seeds that every rate has count: seed 2's loss at 0.1 does not count against it.
    assert runner.best_lr({0.1: {1: 2.0, 2: 9.0}, 0.2: {1: 2.5}}) == 0.1
    assert runner.best_lr({0.1: {1: 3.0, 2: 3.0}, 0.2: {1: 2.0, 2: 2.5}}) == 0.2


def test_matched_transformers_take_either_shape_and_their_own_fields(tmp_path, corpus_file, cache_dir):
    variants = [
        {"name": "mlp", "matched_linear": "mlp", "model_overrides": {"out_scale": 0.0}},
        {"name": "standard", "matched_linear": "standard"},
        {"name": "standard-h4", "matched_linear": "standard", "model_overrides": {"n_heads": 4, "linear_std": 0.01}},
        {"name": "tokenformer"},
    ]
    data = tiny_study(corpus_file, cache_dir, tmp_path / "out", baseline="mlp", variants=variants, compare=[])
    data["train"]["model_overrides"].update(qkv_tokens=32, proj_tokens=32, ffn_tokens=64)  # 12 x 32^2 a block
    plan = StudyPlan.from_dict(data)
    tokenformer = plan.run_config(plan.variant("tokenformer"), 0.01, 1).model_config()
    models = {v.name: plan.run_config(v, 0.01, 1).model_config() for v in plan.variants}
    assert models["mlp"] == tokenformer.parameter_matched_linear().replace(out_scale=0.0)
    assert models["standard"] == tokenformer.standard_linear()
    assert models["standard"].ffn_tokens == 4 * models["standard"].d_model
    assert models["standard"].d_model == 32 and models["standard"].n_heads == 2
    assert models["standard-h4"] == tokenformer.standard_linear().replace(n_heads=4, linear_std=0.01)
    assert study.variants_per_family(plan) == {"Transformer": 3, "TokenFormer": 1}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"variants": [{"name": "a", "matched_linear": "wide"}, {"name": "b"}]},
            r"variants\[0\].matched_linear='wide' is invalid; allowed: false, true, mlp or standard",
        ),
        ({"baseline": "nope"}, "study field baseline='nope' is invalid; allowed: one of the variants"),
        ({"seeds": [1, 1]}, r"study field seeds=\[1, 1\] is invalid; allowed: distinct seeds"),
        ({"lr_grid": [0.0]}, "study field lr_grid=.* learning rates > 0"),
        ({"variants": [{"name": "transformer"}]}, "at least two variants"),
        ({"variants": [{"name": "a"}, {"name": "a"}]}, "distinct names"),
        ({"variants": [{"name": "a b"}, {"name": "c"}]}, r"variants\[0\].name='a b' is invalid"),
        ({"variants": [{"name": "a", "train": {"lr": 1.0}}, {"name": "b"}]}, r"other than \['lr'\]"),
        ({"variants": [{"name": "a", "colour": 1}, {"name": "b"}]}, r"unknown variants\[0\] field"),
        ({"variants": [{"name": "a", "model_overrides": {"tau_scale": -1}}, {"name": "b"}]}, "tau_scale=-1"),
        ({"compare": [["tokenformer", "nope"]]}, r"study field compare=.* is invalid; allowed: a list of pairs"),
        ({"compare": [["tokenformer", "tokenformer"]]}, r"compare=.* is invalid"),
    ],
)
def test_plan_errors_name_the_field(tmp_path, corpus_file, cache_dir, change, message):
    data = tiny_study(corpus_file, cache_dir, tmp_path / "out", **change)
    if "baseline" not in change and change.get("variants"):
        data["baseline"] = data["variants"][0]["name"] if isinstance(data["variants"][0], dict) else "x"
        data["compare"] = []
    with pytest.raises(ValueError, match=message):
        StudyPlan.from_dict(data)


def test_plan_files_that_are_missing_or_not_mappings_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="study plan not found: .*nope.yaml"):
        load_plan(tmp_path / "nope.yaml")
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="study plan .*list.yaml must be a YAML mapping of its fields, got list"):
        load_plan(listed)


def test_the_shipped_study_plans_load_and_the_shape_studies_hold_the_parameter_budget():
    from tokenformer.flops import count_parameters

    studies = Path(__file__).resolve().parents[2] / "configs" / "studies"
    plans = {p.stem: load_plan(p) for p in sorted(studies.glob("*.yaml"))}
    for name in ("tokenformer-shape", "tokenformer-shape-d128"):
        plan = plans[name]
        models = {v.name: plan.run_config(v, plan.lr_grid[0], plan.seeds[0]).model_config() for v in plan.variants}
        sizes = {name: count_parameters(model, non_embedding=True) for name, model in models.items()}
        widths = {name: model.d_model for name, model in models.items()}
        assert len(set(widths.values())) == len(widths)  # every variant another d_model
        assert all(abs(size / sizes[plan.baseline] - 1) <= 0.01 for size in sizes.values()), sizes
