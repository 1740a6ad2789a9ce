"""The scaling experiment: a tiny plan end to end, its report's consistency, resume, plan errors."""

import copy
import json
import math
import re
from pathlib import Path

import pytest
import yaml

from tokenformer.cli import main
from tokenformer.experiments import scaling
from tokenformer.experiments.scaling import ARMS, ScalingPlan, load_plan, run_plan
from tokenformer.flops import training_flops_per_token
from tokenformer.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

STAGE_STEPS = 4


def tiny_plan(corpus_file: Path, cache_dir: Path, out_dir: Path, **changes) -> dict:
    plan = dict(
        out_dir=str(out_dir),
        model="cpu-0.3M",
        model_overrides=dict(n_layers=2, d_model=32, n_heads=2),
        stages=[
            dict(qkv_tokens=16, proj_tokens=16, ffn_tokens=32, steps=STAGE_STEPS),
            dict(qkv_tokens=24, proj_tokens=24, ffn_tokens=48, steps=STAGE_STEPS),
            dict(qkv_tokens=32, proj_tokens=32, ffn_tokens=64, steps=STAGE_STEPS),
        ],
        lr_grid=[0.003, 0.01],
        ablation_steps=2,
        data=str(corpus_file),
        vocab_size=512,
        cache_dir=str(cache_dir),
        seq_len=32,
        batch_size=4,
        warmup_steps=2,
        device="cpu",
        threads=1,
        eval_interval=2,
        eval_batches=3,
        ckpt_interval=4,
    )
    return {**plan, **changes}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus_file, cache_dir):
    out = tmp_path_factory.mktemp("scale") / "plan"
    path = out.parent / "plan.yaml"
    path.write_text(yaml.safe_dump(tiny_plan(corpus_file, cache_dir, out)))
    plan = load_plan(path)
    return plan, run_plan(plan, f"tokenformer scale {path}"), path


def reached(curve, target):
    """First crossing of ``target``, written out independently of the module under test."""
    for i, point in enumerate(curve):
        if point["val_loss"] <= target:
            if i == 0:
                return point["flops"]
            a = curve[i - 1]
            return a["flops"] + (a["val_loss"] - target) / (a["val_loss"] - point["val_loss"]) * (
                point["flops"] - a["flops"]
            )
    return None


def test_every_arm_and_learning_rate_runs_on_the_same_tokens(finished):
    plan, results, _ = finished
    assert set(results["runs"]) == set(ARMS)
    tokens = {r["tokens"] for runs in results["runs"].values() for r in runs.values()}
    assert tokens == {plan.total_steps * plan.batch_size * plan.seq_len}
    for arm, runs in results["runs"].items():
        assert len(runs) == len(plan.lr_grid)
        best = min(runs.values(), key=lambda r: r["final_val_loss"])
        assert results["best_lr"][arm] == best["lr"]
        assert all(r["wall_time"] > 0 and math.isfinite(r["final_val_loss_se"]) for r in runs.values())
    out = Path(plan.out_dir)
    for name in ("results.json", "report.md", "loss_vs_flops.png", "loss_vs_wall.png"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "results.json").read_text())["comparisons"] == results["comparisons"]


def test_flops_add_up_over_the_stages(finished):
    plan, results, _ = finished
    tokens_per_step = plan.batch_size * plan.seq_len
    for arm, runs in results["runs"].items():
        overrides = plan.arm_models(arm)
        steps = [s.steps for s in plan.stages] if len(overrides) > 1 else [plan.total_steps]
        per_token = [
            training_flops_per_token(plan.train_config(m, 1e-3, "x").model_config(512), plan.seq_len) for m in overrides
        ]
        expected = sum(n * tokens_per_step * f for n, f in zip(steps, per_token, strict=True))
        for result in runs.values():
            assert result["flops"] == pytest.approx(expected, rel=1e-12)
            assert result["curve"][-1]["flops"] == result["flops"]
    # The grown arms train smaller models first, so they spend less; the matched arms spend alike.
    flops = {arm: next(iter(runs.values()))["flops"] for arm, runs in results["runs"].items()}
    assert flops["tokenformer_grown"] < flops["tokenformer_scratch"]
    assert flops["transformer_grown"] < flops["transformer_scratch"]
    assert flops["transformer_stacked"] < flops["transformer_scratch"]


def test_validation_loss_right_after_growth_equals_the_loss_before(finished):
    plan, results, _ = finished
    for arm in ("tokenformer_grown", "transformer_grown"):
        for result in results["runs"][arm].values():
            assert result["growth_steps"] == plan.stage_ends()[:-1]
            for step in result["growth_steps"]:
                before, after = [p for p in result["curve"] if p["step"] == step]
                assert after["val_loss"] == pytest.approx(before["val_loss"], abs=1e-5)
                assert after["flops"] == before["flops"]


def test_stacked_arm_grows_in_depth_where_the_plan_says(finished):
    plan, results, _ = finished
    depths = plan.stacked_depths()
    assert depths == [1, 2, 2]  # 2 final layers x the TokenFormer stages' shares 1/2, 3/4, 1 of the parameters
    deeper = [end for end, a, b in zip(plan.stage_ends(), depths, depths[1:], strict=False) if b > a]
    final = plan.arm_models("transformer_scratch")[0]
    for result in results["runs"]["transformer_stacked"].values():
        assert result["growth_steps"] == deeper
        assert (
            result["stage_parameters"][-1]
            == results["runs"]["transformer_scratch"][f"lr-{plan.lr_grid[0]:g}"]["parameters"]
        )
        ((step, before, after),) = scaling.growth_jumps(result)
        assert step == deeper[0] and after != pytest.approx(before, abs=1e-4)  # G_stack is not function preserving
    assert plan.arm_models("transformer_stacked")[-1] == final


def test_paired_differences_follow_from_the_stored_batch_losses(finished):
    plan, results, _ = finished
    report = (Path(plan.out_dir) / "report.md").read_text()
    best = {arm: results["runs"][arm][f"lr-{lr:g}"] for arm, lr in results["best_lr"].items()}
    rows = results["paired_differences"]
    assert len(rows) == len(best) * (len(best) - 1) // 2
    for row in rows:
        a = best[row["arm"]]["curve"][-1]["val_batch_losses"]
        b = best[row["baseline"]]["curve"][-1]["val_batch_losses"]
        assert len(a) == len(b) == plan.eval_batches
        diffs = [x - y for x, y in zip(a, b, strict=True)]
        mean = sum(diffs) / len(diffs)
        se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
        assert row["difference"] == pytest.approx(mean, abs=1e-12)
        assert row["difference"] == pytest.approx(
            best[row["arm"]]["final_val_loss"] - best[row["baseline"]]["final_val_loss"], abs=1e-6
        )
        assert row["se"] == pytest.approx(se, rel=1e-9)
        assert f"| {row['arm']} | {row['baseline']} | {mean:+.4f} | {se:.4f} |" in report


def test_reported_ratios_follow_from_the_stored_curves(finished):
    plan, results, _ = finished
    report = (Path(plan.out_dir) / "report.md").read_text()
    best = {arm: results["runs"][arm][f"lr-{lr:g}"] for arm, lr in results["best_lr"].items()}
    assert len(results["comparisons"]) == len(scaling.COMPARISONS)
    for row in results["comparisons"]:
        target = best[row["baseline"]]["final_val_loss"]
        flops = reached(best[row["arm"]]["curve"], target)
        ratio = None if flops is None else flops / best[row["baseline"]]["flops"]
        assert row["target_val_loss"] == target
        assert row["ratio"] == pytest.approx(ratio) if ratio is not None else row["ratio"] is None
        shown = "not reached" if ratio is None else f"{ratio:.3f}"
        assert re.search(rf"\| {row['arm']} \| {row['baseline']} \| {target:.4f} \|[^\n]*\| {shown} \|", report)
    for row in results["equal_compute"]:
        for arm, loss in row["val_loss"].items():
            if loss is not None:
                assert (
                    min(p["val_loss"] for p in best[arm]["curve"])
                    <= loss
                    <= max(p["val_loss"] for p in best[arm]["curve"])
                )


def test_ablation_starts_every_variant_from_the_same_checkpoint(finished):
    plan, results, _ = finished
    ablation = results["ablation"]
    assert set(ablation) == set(scaling.ABLATIONS)
    grown = results["runs"]["tokenformer_grown"][f"lr-{results['best_lr']['tokenformer_grown']:g}"]
    stage_one = [p for p in grown["curve"] if p["step"] == plan.stage_ends()[0]][0]["val_loss"]
    for name, variant in ablation.items():
        assert variant["loss_before_growth"] == pytest.approx(stage_one, abs=1e-6)
        if name != "random_keys":
            assert variant["loss_after_growth"] == pytest.approx(stage_one, abs=1e-5)
        assert variant["curve"][-1]["step"] == plan.stage_ends()[0] + plan.ablation_steps
    # The recipe is the grown arm's own first growth step: the same loss after the same steps.
    end = plan.stage_ends()[0] + plan.ablation_steps
    assert ablation["recipe"]["final_val_loss"] == pytest.approx(
        [p for p in grown["curve"] if p["step"] == end][-1]["val_loss"], abs=1e-6
    )
    assert ablation["lr_rewarmup"]["final_val_loss"] != ablation["recipe"]["final_val_loss"]
    stored = Path(plan.out_dir) / "ablation" / f"lr-{results['best_lr']['tokenformer_grown']:g}"
    assert sorted(p.name for p in stored.iterdir()) == sorted(scaling.ABLATIONS)


def test_an_interrupted_plan_continues_to_the_same_results(finished, tmp_path, corpus_file, cache_dir, monkeypatch):
    plan, results, _ = finished
    arms = ["tokenformer_grown", "transformer_grown"]
    interrupted = ScalingPlan.from_dict(tiny_plan(corpus_file, cache_dir, tmp_path / "plan", arms=arms, ablation=False))
    original, calls = Trainer._train_step, [0]

    def dies_at_step_18(self):
        # The second run (tokenformer_grown, second lr) at step 6: after its first growth and
        # before any checkpoint of the grown model, so the resume grows again.
        calls[0] += 1
        if calls[0] == 18:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "_train_step", dies_at_step_18)
    with pytest.raises(KeyboardInterrupt):
        run_plan(interrupted)
    monkeypatch.setattr(Trainer, "_train_step", original)
    resumed = run_plan(interrupted)
    for arm in arms:
        for lr, result in results["runs"][arm].items():
            again = resumed["runs"][arm][lr]
            assert [(p["step"], p["flops"]) for p in again["curve"]] == [
                (p["step"], p["flops"]) for p in result["curve"]
            ]
            assert [p["val_loss"] for p in again["curve"]] == pytest.approx(
                [p["val_loss"] for p in result["curve"]], abs=1e-5
            )


def test_a_finished_plan_reruns_from_its_stored_results(finished, monkeypatch, capsys):
    plan, results, path = finished

    def no_training(self):
        raise AssertionError("a finished run trained again")

    monkeypatch.setattr(Trainer, "_train_step", no_training)
    main(["scale", str(path)])
    printed = capsys.readouterr().out
    assert "| tokenformer_grown |" in printed and "report.md" in printed
    assert json.loads((Path(plan.out_dir) / "results.json").read_text())["comparisons"] == results["comparisons"]


def _broken(base: dict, path: str, value) -> dict:
    plan = copy.deepcopy(base)
    *parents, last = path.split(".")
    target = plan
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    target[int(last) if isinstance(target, list) else last] = value
    return plan


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("stages", [], r"stages=0 .*at least 3"),
        ("stages.2.qkv_tokens", 16, r"stages\[2\]=.*token counts >= stage 2's"),
        ("stages.1.steps", 0, r"stages\[1\]\.steps=0 .*positive integer"),
        ("stages.0", {"qkv_tokens": 16}, r"stages\[0\]=.*exactly qkv_tokens, proj_tokens, ffn_tokens, steps"),
        ("lr_grid", [0.01, -1], r"lr_grid=\[0.01, -1\] .*learning rates > 0"),
        (
            "arms",
            ["tokenformer_grown", "resnet"],
            r"arms=.*'resnet'.*allowed: a non-empty list of distinct arms from tokenformer_grown",
        ),
        ("arms", ["transformer_scratch"], r"ablation=True .*arms include tokenformer_grown"),
        ("min_lr_ratio", 2, r"min_lr_ratio=2 .*\[0, 1\]"),
        (
            "model_overrides.n_layers",
            1,
            r"arms=.*transformer_stacked only with a final depth that grows.*depths \[1, 1, 1\]",
        ),
        ("seq_len", 0, r"training option seq_len=0"),
        ("model", "gpt-5", r"unknown preset 'gpt-5'"),
        ("learning_rate", 0.1, r"unknown plan field\(s\) \['learning_rate'\]"),
    ],
)
def test_plan_errors_name_the_field_the_value_and_what_is_allowed(tmp_path, path, value, message):
    base = tiny_plan("kjv", tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match=message):
        ScalingPlan.from_dict(_broken(base, path, value))


def test_the_shipped_plans_are_valid():
    configs = Path(__file__).resolve().parents[2] / "configs" / "scaling"
    plans = {p.stem: load_plan(p) for p in sorted(configs.glob("*.yaml"))}
    assert {"demo", "cpu", "paper"} <= set(plans)
    assert plans["paper"].data.startswith("hf:")
