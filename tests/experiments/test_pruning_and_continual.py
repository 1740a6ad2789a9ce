"""The pruning and the continual-learning experiments, each end to end on a tiny plan."""

import importlib.util

import pytest
import yaml
from conftest import tiny_train_options

from tokenformer.experiments import continual, pruning

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def tiny_recipe(corpus_file, cache_dir) -> dict:
    """conftest's tiny training options as a plan's shared recipe (runs get their own out_dir)."""
    options = tiny_train_options(
        corpus_file,
        cache_dir,
        "",
        max_steps=6,
        warmup_steps=1,
        eval_interval=6,
        ckpt_interval=6,
        keep_last=1,
        threads=1,
    )
    del options["out_dir"], options["log_interval"]
    return options


def tiny_pruning_plan(corpus_file, cache_dir, out_dir) -> pruning.PruningPlan:
    return pruning.PruningPlan(
        out_dir=str(out_dir),
        train=tiny_recipe(corpus_file, cache_dir),
        seeds=[1, 2],
        fractions=[0.5],
        kinds=["ffn", "all"],
        calibration_batches=2,
        finetune=[["ffn", 0.5]],
        finetune_steps=2,
        throughput_repeats=1,
    )


def test_pruning_experiment_end_to_end(tmp_path, corpus_file, cache_dir, capsys):
    plan = tiny_pruning_plan(corpus_file, cache_dir, tmp_path / "pruning")
    results = pruning.run_experiment(plan, "test")
    summary = results["analysis"]["summary"]
    # The unpruned row is the base model itself: its loss is the base run's final validation loss.
    base = {(b["model"], b["seed"]): b["val_loss"] for b in results["base"]}
    for entry in results["pruned"]:
        unpruned = next(r for r in entry["rows"] if r["kind"] == "none" and r["model"] == "tokenformer")
        assert unpruned["val_loss"] == pytest.approx(base[("tokenformer", entry["seed"])], abs=1e-6)
    # Every variant: 2 kinds x 1 share x 2 rules x ghost on/off for the TokenFormer, 2 rules for the Transformer.
    assert len(results["pruned"][0]["rows"]) == 2 + 2 * 2 * 2 + 2
    assert (
        summary["tokenformer-ffn-0.5-calibration-ghost"]["non_embedding_parameters"]
        < (summary["tokenformer-unpruned"]["non_embedding_parameters"])
    )
    assert (
        summary["tokenformer-ffn-0.5-calibration-ghost"]["forward_flops_per_token"]
        > summary["tokenformer-ffn-0.5-calibration"]["forward_flops_per_token"]
    )  # the ghost's multiply-adds count
    whats = [c["what"] for c in results["analysis"]["comparisons"]]
    assert "FFN kept 0.5, calibration: TokenFormer (ghost) − Transformer MLP, loss increase" in whats
    assert {row["model"] for row in results["finetuned"]} == {"tokenformer", "transformer"}
    report = (tmp_path / "pruning" / "report.md").read_text()
    assert "## Comparisons" in report and "## Cost of each pruned shape" in report
    assert (tmp_path / "pruning" / "loss_vs_kept.png").read_bytes()[:4] == b"\x89PNG"
    # Started again, every run is cached; a report of the finished runs alone runs nothing.
    assert pruning.run_experiment(plan, "test")["pruned"] == results["pruned"]
    assert pruning.run_experiment(plan, "test", report_only=True)["finetuned"] == results["finetuned"]
    # The command line does the same and prints the report, its command quoted.
    path = tmp_path / "pruning.yaml"
    path.write_text(yaml.safe_dump(plan.to_dict()))
    pruning.main([str(path), "--report_only"])
    assert f"python -m tokenformer.experiments.pruning {path} --report_only" in capsys.readouterr().out


@pytest.fixture(scope="module")
def continual_inputs(tmp_path_factory, corpus_file, cache_dir):
    """The base plan (YAML; its base models are trained once for the module's experiments) and corpus B."""
    folder = tmp_path_factory.mktemp("continual-inputs")
    base_plan = tiny_pruning_plan(corpus_file, cache_dir, folder / "pruning")
    (folder / "base.yaml").write_text(yaml.safe_dump(base_plan.to_dict()))
    second = folder / "b.txt"
    from tokenformer.data import kjv_documents

    second.write_text("".join(doc.text for doc in kjv_documents()[-3:]), encoding="utf-8")
    return folder / "base.yaml", second


def tiny_continual_plan(tmp_path, continual_inputs, **fields) -> continual.ContinualPlan:
    """A continual plan of four steps on B at one rate over the module's base plan; ``fields`` change it."""
    base_plan, second = continual_inputs
    defaults = dict(
        out_dir=str(tmp_path / "continual"),
        base_plan=str(base_plan),
        seeds=[1],
        data=str(second),
        steps=4,
        lr_grid=[0.003],
        usage_batches=2,
        eval_interval=2,
        eval_batches=2,
    )
    return continual.ContinualPlan(**{**defaults, **fields})


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="the [continual] extra (peft) is not installed")
def test_continual_experiment_end_to_end(tmp_path, continual_inputs):
    # The growth arms against both Transformer baselines (the separate-growth, sparse and memory
    # arms run in the tests below).
    arms = ["tf_finetune", "tf_grow_frozen", "tf_grow_slow", "tx_finetune", "tx_lora"]
    plan = tiny_continual_plan(tmp_path, continual_inputs, seeds=[1, 2], arms=arms)
    results = continual.run_experiment(plan, "test")
    runs = {(r["arm"], r["seed"]): r for r in results["runs"]}
    assert set(runs) == {(arm, seed) for arm in arms for seed in (1, 2)}
    for seed in (1, 2):
        # Growth keeps the function: before the first step the grown arms' losses are the base model's.
        start = runs[("tf_finetune", seed)]["curve"][0]
        for arm in ("tf_grow_frozen", "tf_grow_slow"):
            assert runs[(arm, seed)]["curve"][0] == pytest.approx(start, abs=1e-5)
        assert [p["step"] for p in runs[("tx_lora", seed)]["curve"]] == [0, 2, 4]
    # LoRA gets (about) as many trainable parameters as the grown tokens.
    lora, grown = runs[("tx_lora", 1)]["trainable_parameters"], runs[("tf_grow_frozen", 1)]["trainable_parameters"]
    assert abs(lora - grown) / grown < 0.25
    assert results["analysis"]["at_target"]
    assert continual.run_experiment(plan, "test", report_only=True)["runs"] == results["runs"]
    assert "## Forgetting at equal loss on B" in (tmp_path / "continual" / "report.md").read_text()


def test_continual_experiment_runs_separate_growth_and_sparse_arms(tmp_path, continual_inputs):
    plan = tiny_continual_plan(tmp_path, continual_inputs, arms=["tf_grow_separate", "tf_sparse"], sparse_tokens=[2, 4])
    results = continual.run_experiment(plan, "test")
    runs = {r["arm"]: r for r in results["runs"]}
    assert set(runs) == {"tf_grow_separate", "tf_sparse_2", "tf_sparse_4"}
    # Neither arm changes the function before its first step: every run starts at the base model's losses.
    start = runs["tf_sparse_2"]["curve"][0]
    assert runs["tf_grow_separate"]["curve"][0] == pytest.approx(start, abs=1e-6)
    # Two (four) key and value rows of d_model each, in each of the 5 Pattentions of 2 layers.
    assert runs["tf_sparse_2"]["trainable_parameters"] == 2 * 64 * 5 * 2
    assert runs["tf_sparse_4"]["trainable_parameters"] == 4 * 64 * 5 * 2
    assert set(results["analysis"]["at_target"][0]["arms"]) == set(runs)
    assert "`tf_sparse_2`" in (tmp_path / "continual" / "report.md").read_text()


def test_continual_experiment_runs_the_memory_arms_from_a_memory_base(tmp_path, continual_inputs):
    plan = tiny_continual_plan(
        tmp_path,
        continual_inputs,
        arms=["tf_finetune", "tf_memory_finetune", "tf_memory_sparse"],
        memory={"memory_layers": [1], "memory_sub_keys": 4, "memory_top_k": 3},
        memory_slots=[2],
    )
    results = continual.run_experiment(plan, "test")
    runs = {r["arm"]: r for r in results["runs"]}
    assert set(runs) == {"tf_finetune", "tf_memory_finetune", "tf_memory_sparse_2"}
    # The memory arms start from their own base model (trained on A), not the dense one.
    memory_base = tmp_path / "continual" / "base-memory" / "seed-1"
    assert (memory_base / "result.json").is_file()
    assert runs["tf_memory_sparse_2"]["curve"][0] == pytest.approx(runs["tf_memory_finetune"]["curve"][0], abs=1e-6)
    assert runs["tf_memory_finetune"]["curve"][0]["a"] != pytest.approx(runs["tf_finetune"]["curve"][0]["a"], abs=1e-6)
    # Two value rows of d_model (32) in the one memory table.
    assert runs["tf_memory_sparse_2"]["trainable_parameters"] == 2 * 32
    assert '`{"memory_layers": [1]' in (tmp_path / "continual" / "report.md").read_text()


def test_continual_plan_checks_the_sparse_budgets():
    with pytest.raises(ValueError, match=r"sparse_tokens=\[0\] is invalid; allowed: a non-empty list of positive"):
        continual.ContinualPlan(sparse_tokens=[0])
    with pytest.raises(ValueError, match=r"memory_slots=\[\] is invalid; allowed: a non-empty list of positive"):
        continual.ContinualPlan(memory_slots=[])
    with pytest.raises(ValueError, match=r"memory=\{\} is invalid; allowed: model fields with a non-empty"):
        continual.ContinualPlan(arms=["tf_memory_sparse"])


def test_forgetting_is_read_where_b_first_reaches_the_target():
    curve = [{"step": 0, "a": 5.0, "b": 6.0}, {"step": 2, "a": 5.2, "b": 5.5}, {"step": 4, "a": 5.4, "b": 5.0}]
    assert continual.forgetting_at_b(curve, 5.25) == pytest.approx(0.3)  # halfway between the last two
    assert continual.forgetting_at_b(curve, 7.0) == 0.0  # reached before the first step
    assert continual.forgetting_at_b(curve, 4.0) is None  # never reached


# B's loss at steps 0, 2 and 4 of each arm of a synthetic continual experiment (one rate, both
# seeds): every arm starts at 7, the grown one gets no lower than 6.25 (so the thirds are 6.75,
# 6.5 and 6.25) and full fine-tuning gets to 3 (so half-way for it is 5).
B_CURVES = {
    "tf_finetune": [7, 6.25, 3],
    "tf_grow_frozen": [7, 6.5, 6.25],
    "tx_finetune": [7, 5, 3],
    "tx_lora": [7, 5.5, 4],
}
MACHINE = {"processor": "cpu", "cpu_count": 1, "platform": "test", "torch": "2", "threads": 1, "device": "cpu"}


def synthetic_results(forgetting: dict[str, list[list[float]]]) -> dict:
    """A continual experiment's results from A's rise at each evaluation, per arm and seed (1, 2)."""
    plan = continual.ContinualPlan(seeds=[1, 2], lr_grid=[0.001], arms=list(forgetting)).to_dict()
    runs = [
        {
            "arm": arm,
            "lr": 0.001,
            "seed": seed,
            "curve": [
                {"step": 2 * i, "b": b, "a": 4 + rise}
                for i, (b, rise) in enumerate(zip(B_CURVES[arm], rises, strict=True))
            ],
            "trainable_parameters": 1,
        }
        for arm, per_seed in forgetting.items()
        for seed, rises in zip(plan["seeds"], per_seed, strict=True)
    ]
    machine = {**MACHINE, "precision": "fp32"}
    results = {"command": "test", "machine": machine, "plan": plan, "base_recipe": {}, "runs": runs}
    results["analysis"] = continual.analyse(results)
    return results


def linear(arm: str, *slopes: float) -> list[list[float]]:
    """Per seed, A's rise along ``arm``'s B curve when it is ``slope`` times B's fall."""
    return [[slope * (7 - b) for b in B_CURVES[arm]] for slope in slopes]


# The TokenFormer fine-tuned forgets 0.01 (seed 1) and 0.03 (seed 2) per unit of B's fall: a fifth
# and three fifths of LoRA's 0.05, a tenth and three tenths of full fine-tuning's 0.1.
FORGETTING = {
    "tf_finetune": linear("tf_finetune", 0.01, 0.03),
    "tf_grow_frozen": linear("tf_grow_frozen", 0.5, 0.5),
    "tx_finetune": linear("tx_finetune", 0.1, 0.1),
    "tx_lora": linear("tx_lora", 0.05, 0.05),
}


def test_continual_targets_add_half_way_for_full_finetuning():
    analysis = synthetic_results(FORGETTING)["analysis"]
    assert analysis["finetune_halfway"] == 5.0
    targets = [block["b_target"] for block in analysis["at_target"]]
    assert targets == pytest.approx([6.75, 6.5, 6.25, 5.0])
    # The grown arm never gets below 6.25: no forgetting at the half-way target, only at the thirds.
    assert analysis["at_target"][-1]["arms"]["tf_grow_frozen"] is None
    assert analysis["at_target"][2]["arms"]["tf_grow_frozen"]["mean"] == pytest.approx(0.375)
    assert analysis["at_target"][-1]["arms"]["tx_lora"]["mean"] == pytest.approx(0.1)


def test_continual_goal_met_at_every_target():
    results = synthetic_results(FORGETTING)
    analysis = results["analysis"]
    for block in analysis["goal"]:
        fall = 7 - block["b_target"]
        assert block["best"]["arm"] == "tf_finetune"
        lora, finetune = block["vs"]["tx_lora"], block["vs"]["tx_finetune"]
        assert lora["ratio"]["mean"] == pytest.approx(0.4) and lora["ratio"]["se"] == pytest.approx(0.2)
        assert finetune["ratio"]["mean"] == pytest.approx(0.2) and finetune["ratio"]["se"] == pytest.approx(0.1)
        assert lora["difference"]["mean"] == pytest.approx(-0.03 * fall)  # paired by seed: TokenFormer − LoRA
        assert lora["difference"]["se"] == pytest.approx(0.01 * fall)
        assert lora["met"] and finetune["met"]
    assert analysis["goal_verdict"] == {"met": True, "targets": 4, "seeds": 2, "missed": [], "open": []}
    text = continual.report(results)
    assert text.index("## The goal") < text.index("## Final losses") < text.index("## Forgetting at equal loss")
    assert (
        "**Met** at every target the best TokenFormer arm reaches (4 of them). Seeds: 2; the goal asks for 3." in text
    )
    assert "B target 5.0000 (half-way):" in text
    assert "| `tf_grow_frozen` | — | — | — |" in text


def test_continual_goal_missed_where_lora_stops_forgetting():
    # LoRA forgets nothing more after B = 5.5: at the half-way target it has forgotten 0.075, and the
    # TokenFormer 0.02 and 0.06, ratios 4/15 and 12/15.
    lora = [[0, 0.075, 0.075]] * 2
    results = synthetic_results({**FORGETTING, "tx_lora": lora})
    analysis = results["analysis"]
    assert [block["vs"]["tx_lora"]["met"] for block in analysis["goal"]] == [True, True, True, False]
    assert analysis["goal"][-1]["vs"]["tx_lora"]["ratio"]["mean"] == pytest.approx(8 / 15)
    assert analysis["goal"][-1]["vs"]["tx_finetune"]["met"]
    verdict = analysis["goal_verdict"]
    assert verdict["met"] is False and verdict["open"] == []
    assert verdict["missed"] == [{"b_target": 5.0, "baseline": "tx_lora", "ratio": pytest.approx(8 / 15)}]
    assert "**Missed** against `tx_lora` (goal ≤ 0.5) at B 5.0000 (half-way): 0.533." in continual.report(results)


def test_continual_goal_gives_no_ratio_to_a_baseline_that_did_not_forget():
    finetune = [FORGETTING["tx_finetune"][0], [0, 0, 0]]  # seed 2: A's loss never rises
    results = synthetic_results({**FORGETTING, "tx_finetune": finetune})
    block = results["analysis"]["goal"][0]  # B = 6.75: the TokenFormer forgot 0.0025 and 0.0075
    assert "ratio" not in block["vs"]["tx_finetune"] and block["vs"]["tx_finetune"]["met"] is None
    assert block["vs"]["tx_finetune"]["difference"]["diffs"] == pytest.approx([0.0025 - 0.025, 0.0075])
    verdict = results["analysis"]["goal_verdict"]
    assert verdict["met"] is None and verdict["missed"] == [] and len(verdict["open"]) == 4
    assert "— (its forgetting is not positive on seed 2)" in continual.report(results)


def test_continual_report_of_an_older_run_without_the_baselines():
    results = synthetic_results({arm: FORGETTING[arm] for arm in ("tf_finetune", "tf_grow_frozen")})
    del results["analysis"]["goal"]  # as analysed before the goal was
    assert [block["b_target"] for block in results["analysis"]["at_target"]] == pytest.approx([6.75, 6.5, 6.25])
    text = continual.report(results)
    assert "**Not decided**: met wherever compared, but not compared against `tx_lora` (not run) at B 6.7500" in text
