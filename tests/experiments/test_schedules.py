"""The schedule search: candidates as rules over a base plan's final size and budget, runs reused
where the stages are the base plan's, comparisons recomputed from the stored runs, errors."""

import json
from pathlib import Path

import pytest
import yaml
from test_scaling import tiny_plan

from tokenformer.experiments import runner
from tokenformer.experiments.scaling import load_plan, run_plan
from tokenformer.experiments.scaling.report import crossing
from tokenformer.experiments.schedules import (
    ARM,
    SchedulePlan,
    analyse,
    candidate_schedule,
    load_schedule_plan,
    report,
    run_search,
)

pytestmark = pytest.mark.usefixtures("one_thread")

STAGE_TOKENS = [{"qkv_tokens": n, "proj_tokens": n, "ffn_tokens": 2 * n} for n in (8, 16, 32)]


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus_file, cache_dir):
    """A finished tiny base plan: the grown TokenFormer (8/8/16 -> 16/16/32 -> 32/32/64, 4 steps
    each) and the TokenFormer from scratch, one seed, one rate."""
    out = tmp_path_factory.mktemp("search")
    arms = ["tokenformer_grown", "tokenformer_scratch"]
    data = tiny_plan(corpus_file, cache_dir, out / "base", arms=arms, seeds=[1], lr_grid=[0.01], ablation=False)
    data["stages"] = [{**stage, **tokens} for stage, tokens in zip(data["stages"], STAGE_TOKENS, strict=True)]
    path = out / "base.yaml"
    path.write_text(yaml.safe_dump(data))
    run_plan(load_plan(path))
    return out, path


def search(base, **changes) -> dict:
    out, path = base
    return {
        "out_dir": str(out / "search"),
        "base_plan": str(path),
        "baselines": str(out / "base"),
        "seeds": [1],
        "lr_grid": [0.01],
        "candidates": [
            {"name": "equal", "rule": "equal:3"},
            {"name": "late", "rule": "shares:0.25,0.75", "start_divisor": 2},
        ],
        **changes,
    }


def test_a_candidate_is_a_rule_over_the_final_size_and_the_budget(base):
    plan = SchedulePlan.from_dict(search(base))
    base_plan = plan.base()
    schedule = candidate_schedule(plan.candidates[1], base_plan)
    assert schedule["total_steps"] == 12
    assert schedule["stages"] == [
        {"share": 0.25, "qkv_tokens": 16, "proj_tokens": 16, "ffn_tokens": 32, "n_layers": 2},
        {"share": 0.75, "qkv_tokens": 32, "proj_tokens": 32, "ffn_tokens": 64, "n_layers": 2},
    ]
    stages = plan.candidate_plan(plan.candidates[1], base_plan).stages
    assert [(s.ffn_tokens, s.steps) for s in stages] == [(32, 3), (64, 9)]
    # Depth from start_layers, linear to the final depth; tokens at the final counts (divisor 1).
    deep = SchedulePlan.from_dict(
        search(base, candidates=[{"name": "depth", "rule": "equal:2", "start_divisor": 1, "start_layers": 1}])
    )
    stages = deep.candidate_plan(deep.candidates[0], base_plan).stages
    assert [(s.ffn_tokens, s.n_layers, s.steps) for s in stages] == [(64, 1, 6), (64, 2, 6)]


def test_the_search_compares_each_candidate_with_the_base_plans_arms(base, monkeypatch):
    plan = SchedulePlan.from_dict(search(base))
    results = run_search(plan, "python -m tokenformer.experiments.schedules search.yaml")
    analysis = results["analysis"]
    # The candidate with the base plan's stages reuses its runs: the same result, not trained again.
    equal = runner.read_result(plan.candidate_plan(plan.candidates[0]).run_dir(ARM, 0.01, 1))
    stored = runner.read_result(base[0] / "base" / "runs" / ARM / "lr-0.01" / "seed-1")
    assert equal["reused_from"] and equal["final_val_loss"] == stored["final_val_loss"]
    assert analysis["candidates"]["equal"]["versus"]["tokenformer_grown"]["difference"] == 0
    # The other candidate trained with its own stages.
    late = runner.read_result(plan.candidate_plan(plan.candidates[1]).run_dir(ARM, 0.01, 1))
    assert late["growth_steps"] == [3] and "reused_from" not in late
    scratch = runner.read_result(base[0] / "base" / "runs" / "tokenformer_scratch" / "lr-0.01" / "seed-1")
    versus = analysis["candidates"]["late"]["versus"]["tokenformer_scratch"]
    assert versus["difference"] == pytest.approx(late["final_val_loss"] - scratch["final_val_loss"])
    reach = crossing(late["curve"], scratch["final_val_loss"])
    assert versus["per_seed"]["1"] == (None if reach is None else pytest.approx(reach / scratch["flops"]))
    assert versus["reached"] == (reach is not None)
    text = (plan_dir := base[0] / "search" / "report.md").read_text()
    assert "| late | `shares:0.25,0.75`, /2, final layers, top | 16/16/32 x 2L × 3, 32/32/64 x 2L × 9 | 0.01 |" in text
    assert "Against `tokenformer_scratch`:" in text
    assert json.loads((plan_dir.parent / "results.json").read_text())["analysis"] == json.loads(json.dumps(analysis))
    # Finished: a second call trains nothing.
    monkeypatch.setattr(runner, "run_jobs", lambda *a, **k: pytest.fail("trained again"))
    assert run_search(plan)["analysis"] == analysis


def test_a_candidate_can_grow_toward_the_base_plans_best_shape(base, tmp_path):
    out, path = base
    data = yaml.safe_load(path.read_text())
    data["tokenformer_shape"] = {"d_model": 48, "n_heads": 2, "qkv_tokens": 22, "proj_tokens": 22, "ffn_tokens": 40}
    data["arms"].append("tokenformer_shaped")
    shaped_base = tmp_path / "shaped.yaml"
    shaped_base.write_text(yaml.safe_dump(data))
    plan = SchedulePlan.from_dict(
        search(
            base,
            base_plan=str(shaped_base),
            candidates=[{"name": "wide", "rule": "equal:2", "shape": "shaped", "lr_grid": [0.003]}],
        )
    )
    wide = plan.candidate_plan(plan.candidates[0])
    assert wide.lr_grid == [0.003]  # its own grid
    assert wide.train.model_overrides["d_model"] == 48 and wide.train.model_overrides["n_heads"] == 2
    assert [(s.qkv_tokens, s.ffn_tokens) for s in wide.stages] == [(6, 10), (22, 40)]
    plain = SchedulePlan.from_dict(search(base, candidates=[{"name": "wide", "rule": "equal:2", "shape": "shaped"}]))
    with pytest.raises(ValueError, match=r"candidate 'wide' shape='shaped' is invalid; allowed: final \(the base plan"):
        plain.candidate_plan(plain.candidates[0])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"candidates": []}, r"plan field candidates=\[\] is invalid; allowed: a non-empty list of schedule rules"),
        (
            {"candidates": [{"name": "a", "rule": "thirds"}]},
            r"candidate 'a' rule='thirds' is invalid: .* allowed: shares:S1,S2",
        ),
        (
            {"candidates": [{"name": "a", "rule": "equal:2", "start_divisor": 0.5}]},
            r"candidate 'a' start_divisor=0.5 is invalid; allowed: a number >= 1",
        ),
        (
            {"candidates": [{"name": "a", "rule": "equal:2"}, {"name": "a", "rule": "equal:3"}]},
            r"candidates=\['a', 'a'\] is invalid; allowed: candidates with unique names",
        ),
        (
            {"candidates": [{"name": "a", "rule": "equal:2", "depth_position": "middle"}]},
            r"depth_position='middle' is invalid; allowed: top, bottom, interleave",
        ),
        ({"lr_grid": []}, r"lr_grid"),
    ],
)
def test_search_errors_name_the_field_the_value_and_what_is_allowed(base, change, message):
    with pytest.raises(ValueError, match=message):
        SchedulePlan.from_dict(search(base, **change))


def test_a_candidate_deeper_than_the_final_model_or_a_missing_base_run_is_refused(base, tmp_path):
    plan = SchedulePlan.from_dict(search(base, candidates=[{"name": "a", "rule": "equal:2", "start_layers": 5}]))
    with pytest.raises(ValueError, match=r"candidate 'a' start_layers=5 is invalid; allowed: at most the final 2"):
        plan.candidate_plan(plan.candidates[0])
    missing = SchedulePlan.from_dict(search(base, baselines=str(tmp_path / "none")))
    with pytest.raises(FileNotFoundError, match=r"has no results.json; allowed: the finished run directory"):
        run_search(missing)


def test_the_shipped_search_plans_are_valid():
    for path in (
        "configs/experiments/schedules-cpu.yaml",
        "configs/experiments/schedules-cpu-final.yaml",
        "configs/experiments/schedules-cpu-d128.yaml",
    ):
        plan = load_schedule_plan(path)
        base = plan.base()
        for candidate in plan.candidates:
            assert plan.candidate_plan(candidate, base).total_steps == base.total_steps


@pytest.mark.parametrize("name", ["schedules_cpu", "schedules_cpu_final", "schedules_cpu_d128"])
def test_the_committed_reports_follow_from_their_stored_runs(name):
    # Every table of a committed report is recomputed from the runs stored beside it; only the
    # hand-written notes follow the generated part.
    folder = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / name
    results = json.loads((folder / "results.json").read_text())
    recomputed = dict(results, analysis=analyse(results))
    assert json.loads(json.dumps(recomputed["analysis"])) == results["analysis"]
    assert (folder / "report.md").read_text().startswith(report(recomputed))
