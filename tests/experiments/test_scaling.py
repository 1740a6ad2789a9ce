"""The scaling experiment: a tiny plan end to end over two seeds, its report recomputed from the
stored per-seed results, resume, worker processes, torchrun, plan errors."""

import copy
import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tokenformer.cli import main
from tokenformer.experiments import runner, scaling
from tokenformer.experiments.scaling import ARMS, ScalingPlan, load_plan, run_plan
from tokenformer.flops import count_parameters, training_flops_per_token
from tokenformer.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

STAGE_STEPS = 4
SEEDS = [1, 2]
SRC = Path(__file__).resolve().parents[2] / "src"


def tiny_plan(corpus_file: Path, cache_dir: Path, out_dir: Path, train: dict | None = None, **changes) -> dict:
    plan = dict(
        out_dir=str(out_dir),
        stages=[
            dict(qkv_tokens=16, proj_tokens=16, ffn_tokens=32, steps=STAGE_STEPS),
            dict(qkv_tokens=24, proj_tokens=24, ffn_tokens=96, steps=STAGE_STEPS),
            # The last stage's usual-shape Transformer (d_model 36) differs from the MLP-matched one.
            dict(qkv_tokens=32, proj_tokens=32, ffn_tokens=112, steps=STAGE_STEPS),
        ],
        lr_grid=[0.003, 0.01],
        seeds=SEEDS,
        ablation_steps=2,
        train=dict(
            model="cpu-0.3M",
            model_overrides=dict(n_layers=2, d_model=32, n_heads=2),
            data=str(corpus_file),
            vocab_size=512,
            cache_dir=str(cache_dir),
            seq_len=32,
            batch_size=4,
            warmup_steps=2,
            device="cpu",
            threads=1,
            eval_interval=2,
            log_interval=2,
            eval_batches=3,
            # Checkpoints at the stage ends only: the grown arms save there anyway, the others
            # need none before their last step.
            ckpt_interval=3 * STAGE_STEPS,
            keep_last=2,
            progress=False,
            **(train or {}),
        ),
    )
    return {**plan, **changes}


# A wider TokenFormer with the final stage's non-embedding parameters (within 1%).
SHAPE = dict(d_model=48, n_heads=2, qkv_tokens=22, proj_tokens=22, ffn_tokens=72)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus_file, cache_dir):
    out = tmp_path_factory.mktemp("scale") / "plan"
    path = out.parent / "plan.yaml"
    path.write_text(yaml.safe_dump(tiny_plan(corpus_file, cache_dir, out, arms=list(ARMS), tokenformer_shape=SHAPE)))
    plan = load_plan(path)
    return plan, run_plan(plan, f"tokenformer scale {path}"), path


def stored_runs(plan: ScalingPlan) -> dict:
    """``{arm: {lr: {seed: result}}}`` read from the run directories, not from results.json."""
    runs = {}
    for arm in plan.arms:
        for lr in plan.lr_grid:
            for seed in plan.seeds:
                result = json.loads((plan.run_dir(arm, lr, seed) / runner.RESULT).read_text())
                assert (result["arm"], result["lr"], result["seed"]) == (arm, lr, seed)
                runs.setdefault(arm, {}).setdefault(lr, {})[seed] = result
    return runs


def best_of(stored: dict) -> dict:
    """Each arm's runs (by seed) at the rate with the lowest mean final validation loss."""
    best = {}
    for arm, by_lr in stored.items():
        lr = min(by_lr, key=lambda lr, by_lr=by_lr: statistics.fmean(r["final_val_loss"] for r in by_lr[lr].values()))
        best[arm] = (lr, by_lr[lr])
    return best


def reached(curve, target, key="flops"):
    """First crossing of ``target``, written out independently of the module under test."""
    for i, point in enumerate(curve):
        if point["val_loss"] <= target:
            if i == 0:
                return point[key]
            a = curve[i - 1]
            return a[key] + (a["val_loss"] - target) / (a["val_loss"] - point["val_loss"]) * (point[key] - a[key])
    return None


def se(values):
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def test_every_arm_rate_and_seed_is_a_run_of_its_own_on_the_same_tokens(finished):
    plan, results, _ = finished
    stored = stored_runs(plan)
    assert set(stored) == set(ARMS)
    assert len(results["runs"]) == len(ARMS) * len(plan.lr_grid) * len(SEEDS)
    tokens = {r["tokens"] for r in results["runs"]}
    assert tokens == {plan.total_steps * plan.train.batch_size * plan.train.seq_len}
    for arm, by_lr in stored.items():
        for lr, seeds in by_lr.items():
            # Seeds are independent runs: another init and other batches end elsewhere.
            assert len({r["final_val_loss"] for r in seeds.values()}) == len(SEEDS), (arm, lr)
            for r in seeds.values():
                assert r["wall_time"] > 0 and math.isfinite(r["final_val_loss_se"])
                assert r["threads"] == 1 and r["ranks"] == 1
                assert all(r["load_average"][when] >= 0 for when in ("start", "end"))
    out = Path(plan.out_dir)
    for name in ("results.json", "report.md", "loss_vs_flops.png", "loss_vs_wall.png", "plan.yaml"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "results.json").read_text())["analysis"] == results["analysis"]
    assert load_plan(out / "plan.yaml") == plan


def test_flops_add_up_over_the_stages(finished):
    plan, results, _ = finished
    tokens_per_step = plan.train.batch_size * plan.train.seq_len
    for arm, by_lr in stored_runs(plan).items():
        overrides = plan.arm_models(arm)
        steps = [s.steps for s in plan.stages] if len(overrides) > 1 else [plan.total_steps]
        per_token = [training_flops_per_token(plan.model_config(m, 512), plan.train.seq_len) for m in overrides]
        expected = sum(n * tokens_per_step * f for n, f in zip(steps, per_token, strict=True))
        for result in (r for seeds in by_lr.values() for r in seeds.values()):
            assert result["flops"] == pytest.approx(expected, rel=1e-12)
            assert result["curve"][-1]["flops"] == result["flops"]
    # The grown arms train smaller models first, so they spend less; the matched arms spend alike.
    flops = results["analysis"]["arms"]
    assert flops["tokenformer_grown"]["flops"] < flops["tokenformer_scratch"]["flops"]
    assert flops["transformer_grown"]["flops"] < flops["transformer_scratch"]["flops"]
    assert flops["transformer_stacked"]["flops"] < flops["transformer_scratch"]["flops"]


def test_validation_loss_right_after_growth_equals_the_loss_before(finished):
    plan, _, _ = finished
    stored = stored_runs(plan)
    for arm in ("tokenformer_grown", "transformer_grown"):
        for result in (r for seeds in stored[arm].values() for r in seeds.values()):
            assert result["growth_steps"] == plan.stage_ends()[:-1]
            for step in result["growth_steps"]:
                before, after = [p for p in result["curve"] if p["step"] == step]
                assert after["val_loss"] == pytest.approx(before["val_loss"], abs=1e-5)
                assert after["flops"] == before["flops"]


def test_stacked_arm_grows_in_depth_where_the_plan_says(finished):
    plan, _, _ = finished
    depths = plan.stacked_depths()
    assert depths == [1, 2, 2]  # 2 final layers x the TokenFormer stages' shares (about 0.47, 0.8, 1)
    deeper = [end for end, a, b in zip(plan.stage_ends(), depths, depths[1:], strict=False) if b > a]
    stored = stored_runs(plan)
    scratch = stored["transformer_scratch"][plan.lr_grid[0]][SEEDS[0]]
    for result in (r for seeds in stored["transformer_stacked"].values() for r in seeds.values()):
        assert result["growth_steps"] == deeper
        assert result["stage_parameters"][-1] == scratch["parameters"]
        ((step, before, after),) = scaling.growth_jumps(result)
        assert step == deeper[0] and after != pytest.approx(before, abs=1e-4)  # G_stack is not function preserving
    assert plan.arm_models("transformer_stacked")[-1] == plan.arm_models("transformer_scratch")[0]


def test_report_numbers_are_recomputed_from_the_stored_per_seed_results(finished):
    plan, results, _ = finished
    report = (Path(plan.out_dir) / "report.md").read_text()
    assert report == scaling.report(results)
    analysis = results["analysis"]
    best = best_of(stored_runs(plan))
    for arm, (lr, seeds) in best.items():
        entry = analysis["arms"][arm]
        finals = [seeds[s]["final_val_loss"] for s in SEEDS]
        assert entry["best_lr"] == lr
        assert entry["mean"] == pytest.approx(statistics.fmean(finals), abs=1e-12)
        assert entry["se"] == pytest.approx(se(finals), rel=1e-9)
        edge = "*" if lr in (min(plan.lr_grid), max(plan.lr_grid)) else ""
        per_seed = " / ".join(f"{v:.4f}" for v in finals)
        assert f"| {arm} | {lr:g}{edge} |" in report
        assert f"| {statistics.fmean(finals):.4f} ± {se(finals):.4f} | {per_seed} |" in report
    # Differences between arms: paired by seed, each arm at its own best rate, s.e. across seeds.
    rows = analysis["paired_differences"]
    assert len(rows) == len(best) * (len(best) - 1) // 2
    for row in rows:
        mine, other = best[row["arm"]][1], best[row["baseline"]][1]
        diffs = [mine[s]["final_val_loss"] - other[s]["final_val_loss"] for s in SEEDS]
        assert row["difference"] == pytest.approx(statistics.fmean(diffs), abs=1e-12)
        assert row["se"] == pytest.approx(se(diffs), rel=1e-9)
        # The secondary column: each seed's batch-paired s.e., combined for the mean over seeds.
        batch = []
        for s in SEEDS:
            a, b = mine[s]["curve"][-1]["val_batch_losses"], other[s]["curve"][-1]["val_batch_losses"]
            assert len(a) == len(b) == plan.train.eval_batches
            batch.append(se([x - y for x, y in zip(a, b, strict=True)]))
        assert row["eval_batch_se"] == pytest.approx(math.sqrt(sum(v**2 for v in batch)) / len(SEEDS), rel=1e-9)
        shown = f"{statistics.fmean(diffs):+.4f} ± {se(diffs):.4f} (n=2)"
        assert f"| {row['arm']} | {row['baseline']} | {shown} |" in report
    # FLOPs and wall time to target: per seed against the same seed's baseline, then mean and spread.
    assert len(analysis["comparisons"]) == len(scaling.COMPARISONS)
    for row in analysis["comparisons"]:
        mine, base = best[row["arm"]][1], best[row["baseline"]][1]
        ratios, walls = [], []
        for s in SEEDS:
            target = base[s]["final_val_loss"]
            stored_row = row["per_seed"][str(s)]
            assert stored_row["target_val_loss"] == target
            flops = reached(mine[s]["curve"], target)
            wall = reached(mine[s]["curve"], target, "wall_time")
            if flops is None:
                assert stored_row["ratio"] is None and stored_row["wall_ratio"] is None
                continue
            ratios.append(flops / base[s]["flops"])
            walls.append(wall / base[s]["wall_time"])
            assert stored_row["ratio"] == pytest.approx(ratios[-1], rel=1e-12)
            assert stored_row["wall_ratio"] == pytest.approx(walls[-1], rel=1e-12)
        assert row["reached"] == len(ratios)
        line = rf"\| {row['arm']} \| {row['baseline']} \| [0-9.]+ \| {len(ratios)}/2 \|"
        if not ratios:
            assert row["ratio"] is None
            assert re.search(line + r" not reached \| — \| not reached \| — \|", report)
            continue
        spread = row["ratio"]
        assert (spread["mean"], spread["min"], spread["max"]) == pytest.approx(
            (statistics.fmean(ratios), min(ratios), max(ratios))
        )
        assert row["wall_ratio"]["mean"] == pytest.approx(statistics.fmean(walls))
        ratio_text = f"{statistics.fmean(ratios):.3f}" + (f" ± {se(ratios):.3f}" if len(ratios) > 1 else "")
        assert re.search(line + rf" {re.escape(ratio_text)} \| {min(ratios):.3f}–{max(ratios):.3f} \|", report)
    for row in analysis["equal_compute"]:
        for arm, loss in row["val_loss"].items():
            if loss is not None:
                curves = [r["curve"] for r in best[arm][1].values()]
                assert (
                    min(p["val_loss"] for c in curves for p in c)
                    <= loss
                    <= max(p["val_loss"] for c in curves for p in c)
                )


def test_best_rate_at_an_edge_of_the_grid_is_flagged(finished):
    plan, results, _ = finished
    report = (Path(plan.out_dir) / "report.md").read_text()
    # A 2-point grid: every best rate is at an edge.
    assert all(a["best_lr_at_edge"] for a in results["analysis"]["arms"].values())
    assert "Best rate at an edge of the grid for tokenformer_grown" in report


def test_mean_curves_average_the_seeds_point_by_point(finished):
    plan, _, _ = finished
    runs = stored_runs(plan)["tokenformer_grown"][plan.lr_grid[0]]
    curve = scaling.mean_curve([r["curve"] for r in runs.values()])
    assert len(curve) == len(runs[SEEDS[0]]["curve"])  # the growth steps' two evaluations both kept
    for i, point in enumerate(curve):
        assert point["val_loss"] == pytest.approx(statistics.fmean(r["curve"][i]["val_loss"] for r in runs.values()))


def test_ablation_starts_every_variant_from_the_same_seeds_checkpoint(finished):
    plan, results, _ = finished
    lr = results["analysis"]["arms"]["tokenformer_grown"]["best_lr"]
    assert len(results["ablation"]) == len(scaling.ABLATIONS) * len(SEEDS)
    for seed in SEEDS:
        grown = json.loads((plan.run_dir("tokenformer_grown", lr, seed) / runner.RESULT).read_text())
        stage_one = [p for p in grown["curve"] if p["step"] == plan.stage_ends()[0]][0]["val_loss"]
        variants = {}
        for name in scaling.ABLATIONS:
            variants[name] = json.loads((plan.ablation_dir(lr, seed) / name / runner.RESULT).read_text())
        for name, variant in variants.items():
            assert variant["seed"] == seed
            assert variant["loss_before_growth"] == pytest.approx(stage_one, abs=1e-6)
            if name != "random_keys":
                assert variant["loss_after_growth"] == pytest.approx(stage_one, abs=1e-5)
            assert variant["curve"][-1]["step"] == plan.stage_ends()[0] + plan.ablation_steps
        # The recipe is the grown arm's own first growth step: the same loss after the same steps.
        end = plan.stage_ends()[0] + plan.ablation_steps
        assert variants["recipe"]["final_val_loss"] == pytest.approx(
            [p for p in grown["curve"] if p["step"] == end][-1]["val_loss"], abs=1e-6
        )
        assert variants["lr_rewarmup"]["final_val_loss"] != variants["recipe"]["final_val_loss"]
    summary = results["analysis"]["ablation"]["variants"]
    recipe = {s: results_of(results, "recipe", s) for s in SEEDS}
    for name, entry in summary.items():
        finals = [results_of(results, name, s) for s in SEEDS]
        assert entry["final"]["mean"] == pytest.approx(statistics.fmean(finals))
        if name != "recipe":
            diffs = [f - recipe[s] for f, s in zip(finals, SEEDS, strict=True)]
            assert entry["vs_recipe"]["mean"] == pytest.approx(statistics.fmean(diffs))


def results_of(results, variant, seed):
    (run,) = [r for r in results["ablation"] if r["variant"] == variant and r["seed"] == seed]
    return run["final_val_loss"]


def test_an_interrupted_plan_continues_to_the_same_results(finished, tmp_path, corpus_file, cache_dir, monkeypatch):
    plan, _, _ = finished
    stored = stored_runs(plan)
    arms = ["tokenformer_grown", "transformer_grown"]
    # One seed: a run finished before the interruption, the interrupted one and two after it.
    data = tiny_plan(corpus_file, cache_dir, tmp_path / "plan", arms=arms, seeds=SEEDS[:1], ablation=False)
    interrupted = ScalingPlan.from_dict(data)
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
    first = interrupted.run_dir("tokenformer_grown", plan.lr_grid[0], SEEDS[0]) / runner.RESULT
    stamp = first.stat().st_mtime_ns
    assert not (interrupted.run_dir("tokenformer_grown", plan.lr_grid[1], SEEDS[0]) / runner.RESULT).exists()
    monkeypatch.setattr(Trainer, "_train_step", original)
    resumed = run_plan(interrupted)
    assert first.stat().st_mtime_ns == stamp  # the finished run was not trained again
    assert len(resumed["runs"]) == len(arms) * len(plan.lr_grid)
    for again in resumed["runs"]:
        result = stored[again["arm"]][again["lr"]][again["seed"]]
        assert [(p["step"], p["flops"]) for p in again["curve"]] == [(p["step"], p["flops"]) for p in result["curve"]]
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
    assert "0 to go" in printed and "| tokenformer_grown |" in printed and "report.md" in printed
    again = json.loads((Path(plan.out_dir) / "results.json").read_text())
    assert again["analysis"] == results["analysis"]


@pytest.mark.slow
def test_worker_processes_train_the_same_runs(finished, tmp_path, corpus_file, cache_dir):
    plan, _, _ = finished
    stored = stored_runs(plan)
    # A fresh cache: the tokenizer and token shards are built once, before the workers start.
    # Two runs, one per worker: a grown arm and one from scratch.
    data = tiny_plan(
        corpus_file,
        tmp_path / "cache",
        tmp_path / "plan",
        arms=["tokenformer_grown", "transformer_scratch"],
        seeds=SEEDS[:1],
        ablation=False,
    )
    data["lr_grid"] = plan.lr_grid[:1]
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    main(["scale", str(path), "--workers", "2"])
    parallel = json.loads((tmp_path / "plan" / "results.json").read_text())
    assert parallel["workers"] == 2 and len(parallel["runs"]) == 2
    for run in parallel["runs"]:
        alone = stored[run["arm"]][run["lr"]][run["seed"]]
        assert [p["val_loss"] for p in run["curve"]] == pytest.approx([p["val_loss"] for p in alone["curve"]], abs=1e-6)


# -- torchrun -----------------------------------------------------------------------------------


def torchrun_scale(path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    done = subprocess.run(
        [*command, "-m", "tokenformer.cli", "scale", str(path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_a_ddp_plan_runs_under_torchrun_like_one_process(finished, tmp_path, corpus_file, cache_dir):
    plan, results, _ = finished
    stored = stored_runs(plan)
    arms = ["tokenformer_grown", "transformer_stacked"]
    # One rate, the one the single-process plan chose for the grown arm: the ablations compare too.
    lr = results["analysis"]["arms"]["tokenformer_grown"]["best_lr"]
    data = tiny_plan(
        corpus_file, cache_dir, tmp_path / "plan", train={"strategy": "ddp"}, arms=arms, seeds=[1], lr_grid=[lr]
    )
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    ddp_plan = load_plan(path)
    assert ddp_plan.train.strategy == "ddp" and ddp_plan.run_config({}, 0.01, 1, "x").strategy == "ddp"
    done = torchrun_scale(path)
    assert done.stdout.count("report:") == 1 and done.stdout.count("| tokenformer_grown |") == 1  # rank 0 speaks
    out = json.loads((tmp_path / "plan" / "results.json").read_text())
    assert out["ranks"] == 2 and len(out["runs"]) == len(arms)
    for run in out["runs"]:
        alone = stored[run["arm"]][run["lr"]][run["seed"]]
        assert run["tokens"] == alone["tokens"] and run["flops"] == pytest.approx(alone["flops"])
        assert [p["val_loss"] for p in run["curve"]] == pytest.approx([p["val_loss"] for p in alone["curve"]], rel=1e-4)
    assert {(r["variant"], r["seed"]) for r in out["ablation"]} == {(name, 1) for name in scaling.ABLATIONS}
    for run in out["ablation"]:
        assert run["lr"] == lr
        assert run["final_val_loss"] == pytest.approx(results_of(results, run["variant"], 1), rel=1e-4)
    # All ranks agree on what is finished: rank 0 decides. One result gone: that run alone resumes
    # (from its final checkpoint), the other is skipped on both ranks.
    lost = ddp_plan.run_dir("transformer_stacked", lr, 1) / runner.RESULT
    kept = ddp_plan.run_dir("tokenformer_grown", lr, 1) / runner.RESULT
    before, stamp = json.loads(lost.read_text()), kept.stat().st_mtime_ns
    lost.unlink()
    again = torchrun_scale(path)
    assert "1 of 2 runs finished, 1 to go" in again.stdout
    assert "4 of 4 runs finished, 0 to go" in again.stdout  # the ablation
    assert json.loads(lost.read_text())["curve"] == before["curve"]
    assert kept.stat().st_mtime_ns == stamp


def test_worker_processes_are_refused_under_torchrun(tmp_path, corpus_file, cache_dir, monkeypatch, capsys):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(tiny_plan(corpus_file, cache_dir, tmp_path / "out", train={"strategy": "ddp"})))
    with pytest.raises(SystemExit):
        main(["scale", str(path), "--workers", "2"])
    assert "workers=2 is invalid under torchrun (train.strategy='ddp'); allowed: 1" in capsys.readouterr().err
    plan = ScalingPlan.from_dict(tiny_plan(corpus_file, cache_dir, tmp_path / "out"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"workers=3 is invalid under torchrun"):
        run_plan(plan, workers=3)
    with pytest.raises(ValueError, match=r"train.strategy='single' is invalid under torchrun \(2 ranks\)"):
        run_plan(plan)
    with pytest.raises(ValueError, match=r"workers=0 is invalid; allowed: a positive integer"):
        scaling.check_workers(plan, 0)
    assert not (tmp_path / "out").exists()  # refused before anything was written


# -- plan errors --------------------------------------------------------------------------------


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
        ("seeds", [1, 1], r"plan field seeds=\[1, 1\] is invalid; allowed: distinct seeds"),
        ("seeds", [], r"plan field seeds=\[\] is invalid; allowed: a non-empty list of integers >= 0"),
        (
            "arms",
            ["tokenformer_grown", "resnet"],
            r"arms=.*'resnet'.*allowed: a non-empty list of distinct arms from tokenformer_grown",
        ),
        ("arms", ["transformer_scratch"], r"ablation=True .*arms include tokenformer_grown"),
        ("min_lr_ratio", 2, r"min_lr_ratio=2 .*\[0, 1\]"),
        ("tokenformer_shape", SHAPE, r"tokenformer_shape=.* allowed: null unless arms include tokenformer_shaped"),
        (
            "train.model_overrides.n_layers",
            1,
            r"arms=.*transformer_stacked only with a final depth that grows.*depths \[1, 1, 1\]",
        ),
        ("train.seq_len", 0, r"training option seq_len=0"),
        (
            "train.warmup_steps",
            13,
            r"training option warmup_steps=13 is invalid; allowed: an integer <= max_steps \(12\)",
        ),
        ("train.strategy", "fsdp", r"arms=.* allowed: no transformer_stacked with train.strategy: fsdp"),
        ("train.strategy", "zero", r"training option strategy='zero' is invalid; allowed: single, ddp, fsdp"),
        ("train.model", "gpt-5", r"unknown preset 'gpt-5'"),
        ("train.lr", 0.1, r"plan field train=\{'lr': 0.1\} is invalid; allowed: training options other than lr"),
        ("train.task", "vision", r"plan field train.task='vision' is invalid; allowed: lm"),
        ("learning_rate", 0.1, r"unknown plan field\(s\) \['learning_rate'\]"),
    ],
)
def test_plan_errors_name_the_field_the_value_and_what_is_allowed(tmp_path, path, value, message):
    base = tiny_plan("kjv", tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match=message):
        ScalingPlan.from_dict(_broken(base, path, value))


def test_a_plan_in_the_flat_form_says_to_move_its_training_options_under_train(tmp_path, capsys):
    data = tiny_plan("kjv", tmp_path, tmp_path / "out")
    flat = {**{k: v for k, v in data.items() if k not in ("train", "seeds")}, **data["train"], "seed": 1337}
    with pytest.raises(ValueError, match=r"plan fields \[.*'data'.*'seed'.*\] are training options") as error:
        ScalingPlan.from_dict(flat)
    assert "`train:` section" in str(error.value) and "`seed: N` became `seeds: [N]`" in str(error.value)
    path = tmp_path / "flat.yaml"
    path.write_text(yaml.safe_dump(flat))
    with pytest.raises(SystemExit):
        main(["scale", str(path)])  # the command line says the same, not just "unknown option"
    assert str(error.value) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_every_training_option_can_be_set_in_the_train_section(tmp_path):
    data = tiny_plan("kjv", tmp_path, tmp_path / "out", train={"beta2": 0.99, "ema_decay": 0.9, "grad_accum": 2})
    plan = ScalingPlan.from_dict(data)
    config = plan.run_config(plan.arm_models("transformer_grown")[1], 0.01, 2, tmp_path / "run")
    assert (config.beta2, config.ema_decay, config.grad_accum) == (0.99, 0.9, 2)
    assert (config.lr, config.min_lr, config.seed, config.max_steps) == (0.01, pytest.approx(0.001), 2, 12)
    assert config.model_overrides["projection"] == "linear" and config.model_overrides["d_model"] == 32


def test_the_transformer_arms_are_parameter_matched_in_two_shapes(tmp_path):
    plan = ScalingPlan.from_dict(tiny_plan("kjv", tmp_path, tmp_path / "out"))
    final = plan.tokenformer(plan.stages[-1])
    mlp = plan.model_config(plan.arm_models("transformer_scratch")[-1])
    (standard,) = [plan.model_config(m) for m in plan.arm_models("transformer_standard")]
    # (Q/K/V/O of a linear model are d_model x d_model whatever its qkv/proj token fields say.)
    assert (mlp.projection, mlp.d_model, mlp.n_heads) == ("linear", final.d_model, final.n_heads)
    assert mlp.ffn_tokens == final.parameter_matched_linear().ffn_tokens
    assert standard == final.standard_linear() and standard.ffn_tokens == 4 * standard.d_model
    assert standard.d_model != mlp.d_model  # two different models, so a swap of the arms shows
    for config in (mlp, standard):
        ratio = count_parameters(config, non_embedding=True) / count_parameters(final, non_embedding=True)
        assert 0.95 <= ratio <= 1.05
    assert plan.arm_schedule("transformer_standard") == [({}, plan.total_steps)]  # from scratch


def test_the_shaped_tokenformer_arm_has_the_final_stage_parameters_in_another_shape(tmp_path):
    data = tiny_plan("kjv", tmp_path, tmp_path / "out", arms=["tokenformer_shaped"], ablation=False)
    plan = ScalingPlan.from_dict({**data, "tokenformer_shape": SHAPE})
    (shaped,) = [plan.model_config(m) for m in plan.arm_models("tokenformer_shaped")]
    final = plan.tokenformer(plan.stages[-1])
    assert shaped.projection == "pattention" and shaped == final.replace(**SHAPE)
    ratio = count_parameters(shaped, non_embedding=True) / count_parameters(final, non_embedding=True)
    assert 0.99 <= ratio <= 1.01
    assert plan.arm_schedule("tokenformer_shaped") == [({}, plan.total_steps)]  # from scratch
    # The arm needs a shape; a shape needs the arm; and a shape of another size is refused.
    for arms, shape, message in (
        (["tokenformer_shaped"], None, r"tokenformer_shape=None .*when arms include tokenformer_shaped"),
        (["tokenformer_shaped"], {"d_model": 48}, r"within 5% of the final stage's 30,784 \(this one has 46,176\)"),
        (["tokenformer_shaped"], {"depth": 4}, r"a non-empty mapping of d_model, n_heads, qkv_tokens"),
        (["tokenformer_shaped"], {"d_model": 0}, r"tokenformer_shape.d_model=0 .*a positive integer"),
    ):
        data = tiny_plan("kjv", tmp_path, tmp_path / "out", arms=arms, ablation=False, tokenformer_shape=shape)
        with pytest.raises(ValueError, match=message):
            ScalingPlan.from_dict(data)


def test_the_shipped_plans_are_valid():
    configs = Path(__file__).resolve().parents[2] / "configs" / "scaling"
    plans = {p.stem: load_plan(p) for p in sorted(configs.glob("*.yaml"))}
    assert {"demo", "cpu", "cpu-small", "cpu-d128", "paper"} <= set(plans)
    assert plans["paper"].train.data.startswith("hf:")
    # The plans' recipe, spelled out where it differs from tokenformer train's defaults.
    for plan in plans.values():
        assert plan.train.model in ("cpu-0.3M", "cpu-1M", "paper-124M") and plan.train.progress is False
        assert plan.train.keep_last == 2 and plan.train.log_interval == plan.train.eval_interval
    assert (plans["cpu"].train.vocab_size, plans["cpu"].train.seq_len, plans["cpu"].train.warmup_steps) == (
        4096,
        64,
        30,
    )
    # The second CPU plan: the first's data, tokens and recipe at about 4x its non-embedding size.
    small, big = plans["cpu"], plans["cpu-d128"]
    assert [s.steps for s in big.stages] == [s.steps for s in small.stages]
    same = {k: v for k, v in small.train.to_dict().items() if k not in ("model", "out_dir")}
    assert same == {k: v for k, v in big.train.to_dict().items() if k not in ("model", "out_dir")}
    sizes = [count_parameters(p.tokenformer(p.stages[-1]), non_embedding=True) for p in (small, big)]
    assert 3.5 < sizes[1] / sizes[0] < 4.5


@pytest.mark.parametrize("name", ["scaling_cpu", "scaling_cpu_d128"])
def test_the_committed_reports_follow_from_their_stored_runs(name):
    # Every table of a committed report is recomputed from the per-seed runs stored beside it;
    # only the hand-written notes follow the generated part.
    folder = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / name
    results = json.loads((folder / "results.json").read_text())
    plan = ScalingPlan.from_dict(results["plan"])
    recomputed = dict(results, analysis=scaling.analyse(plan, results["runs"], results["ablation"]))
    assert json.loads(json.dumps(recomputed["analysis"])) == results["analysis"]
    assert (folder / "report.md").read_text().startswith(scaling.report(recomputed))


# -- schedules ----------------------------------------------------------------------------------


def schedule_plan(corpus_file, cache_dir, out_dir, **schedule) -> dict:
    """The tiny plan with its stages as a schedule: half the steps at the first size, then
    ffn tokens doubled and a third block interleaved."""
    data = tiny_plan(corpus_file, cache_dir, out_dir, arms=["tokenformer_grown", "tokenformer_scratch"])
    del data["stages"]
    data["schedule"] = {
        "total_steps": 8,
        "depth_position": "interleave",
        "stages": [
            {"share": 0.5, "qkv_tokens": 16, "proj_tokens": 16, "ffn_tokens": 32},
            {"share": 0.5, "factors": {"ffn_tokens": 2}, "n_layers": 3},
        ],
        **schedule,
    }
    return data


def test_a_schedule_gives_stages_by_share_of_the_budget(tmp_path):
    three = [
        {"share": 0.2, "qkv_tokens": 16, "proj_tokens": 16, "ffn_tokens": 32},
        {"share": 0.3, "ffn_tokens": 64},  # ffn first
        {"share": 0.5, "factors": {"qkv_tokens": 1.5, "proj_tokens": 2}, "n_layers": 4},  # attention later
    ]
    plan = ScalingPlan.from_dict(schedule_plan("kjv", tmp_path, tmp_path / "out", total_steps=10, stages=three))
    assert [(s.qkv_tokens, s.proj_tokens, s.ffn_tokens, s.n_layers, s.steps) for s in plan.stages] == [
        (16, 16, 32, 2, 2),
        (16, 16, 64, 2, 3),
        (24, 32, 64, 4, 5),
    ]
    assert plan.total_steps == plan.train.max_steps == 10 and plan.stage_ends() == [2, 5, 10]
    assert plan.arm_schedule("tokenformer_grown")[2] == (
        {"qkv_tokens": 24, "proj_tokens": 32, "ffn_tokens": 64, "n_layers": 4},
        10,
    )
    assert plan.model_config(plan.arm_models("tokenformer_scratch")[0]).n_layers == 4
    # A token budget: 1280 tokens of 4 x 32 per step.
    budget = schedule_plan("kjv", tmp_path, tmp_path / "out", stages=three)
    del budget["schedule"]["total_steps"]
    budget["schedule"]["total_tokens"] = 1280
    assert ScalingPlan.from_dict(budget).stage_ends() == [2, 5, 10]
    # The plan's own dictionary (what worker processes get) gives the same plan.
    again = ScalingPlan.from_dict(plan.to_dict())
    assert again.stages == plan.stages and "stages" not in plan.to_dict()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"stages": None}, r"plan field schedule.stages=None is invalid; allowed: a list of at least 2 stages"),
        ({"total_steps": 0}, r"plan field schedule.total_steps=0 is invalid; allowed: a positive integer"),
        ({"total_tokens": 5}, r"plan field schedule=.* allowed: a mapping with stages, one of total_steps"),
        ({"depth_position": "middle"}, r"schedule.depth_position='middle' is invalid; allowed: top, bottom, inter"),
        ({"stages.0.share": 0.7}, r"shares?.*sums to 1.2; allowed: shares summing to 1"),
        ({"stages.1.share": 0}, r"share\[1\]=0 is invalid; allowed: a number in \(0, 1\]"),
        ({"stages.1.factors": {"ffn_tokens": 0.5}}, r"stages\[1\].factors.ffn_tokens=0.5 .*allowed: a number >= 1"),
        ({"stages.1.width": 2}, r"schedule.stages\[1\]=.* allowed: a mapping with share and sizes"),
        ({"stages.0.factors": {"n_layers": 2}}, r"stages\[0\]=.*the first stage with totals of qkv_tokens"),
        ({"stages.1.ffn_tokens": 16}, r"stages\[1\]=.*both for \['ffn_tokens'\]"),
        ({"stages.1.factors": {}, "stages.1.n_layers": 2}, r"schedule.stages\[1\]=.*sizes >= stage 1's"),
    ],
)
def test_schedule_errors_name_the_field_the_value_and_what_is_allowed(tmp_path, change, message):
    data = schedule_plan("kjv", tmp_path, tmp_path / "out")
    for path, value in change.items():
        data = _broken(data, f"schedule.{path}", value)
    with pytest.raises(ValueError, match=message):
        ScalingPlan.from_dict(data)


def test_a_plan_has_stages_or_a_schedule_and_no_grown_transformer_with_depth(tmp_path):
    data = schedule_plan("kjv", tmp_path, tmp_path / "out")
    both = {**data, "stages": tiny_plan("kjv", tmp_path, tmp_path / "out")["stages"]}
    with pytest.raises(ValueError, match=r"stages='both' is invalid; allowed: exactly one of stages"):
        ScalingPlan.from_dict(both)
    with pytest.raises(ValueError, match=r"missing required field\(s\) \['stages \(or schedule\)'\]"):
        ScalingPlan.from_dict({k: v for k, v in data.items() if k != "schedule"})
    with pytest.raises(ValueError, match=r"allowed: no transformer_grown with a schedule that grows n_layers"):
        ScalingPlan.from_dict({**data, "arms": ["tokenformer_grown", "transformer_grown"]})


def test_the_grown_tokenformer_follows_a_schedule_in_width_and_depth(tmp_path, corpus_file, cache_dir):
    data = {
        **schedule_plan(corpus_file, cache_dir, tmp_path / "plan"),
        "lr_grid": [0.01],
        "seeds": [1],
        "ablation": False,
    }
    plan = ScalingPlan.from_dict(data)
    result = scaling.run_arm(plan, "tokenformer_grown", 0.01, 1)
    assert result["growth_steps"] == [4]
    before, after = [p for p in result["curve"] if p["step"] == 4]
    assert after["val_loss"] == pytest.approx(before["val_loss"], abs=1e-5)
    trainer = Trainer(
        plan.run_config(
            plan.arm_models("tokenformer_grown")[0], 0.01, 1, plan.run_dir("tokenformer_grown", 0.01, 1), resume="auto"
        )
    )
    config = trainer.model.config
    trainer.close()
    assert (config.n_layers, config.ffn_tokens, config.qkv_tokens) == (3, 64, 16)
    assert trainer.state.growth_history[0]["new_layers"] == [1]
    # FLOPs: each stage at its own size.
    tokens_per_step = plan.train.batch_size * plan.train.seq_len
    per_token = [
        training_flops_per_token(plan.model_config(m, 512), plan.train.seq_len)
        for m in plan.arm_models("tokenformer_grown")
    ]
    assert result["flops"] == pytest.approx(sum(4 * tokens_per_step * f for f in per_token), rel=1e-12)
    assert per_token[1] > per_token[0]
