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


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="the [continual] extra (peft) is not installed")
def test_continual_experiment_end_to_end(tmp_path, continual_inputs):
    base_plan, second = continual_inputs
    plan = continual.ContinualPlan(
        out_dir=str(tmp_path / "continual"),
        base_plan=str(base_plan),
        seeds=[1, 2],
        data=str(second),
        steps=4,
        lr_grid=[0.003],
        eval_interval=2,
        eval_batches=2,
    )
    results = continual.run_experiment(plan, "test")
    runs = {(r["arm"], r["seed"]): r for r in results["runs"]}
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
    base_plan, second = continual_inputs
    plan = continual.ContinualPlan(
        out_dir=str(tmp_path / "continual"),
        base_plan=str(base_plan),
        seeds=[1],
        data=str(second),
        steps=4,
        lr_grid=[0.003],
        arms=["tf_grow_separate", "tf_sparse"],
        sparse_tokens=[2, 4],
        usage_batches=2,
        eval_interval=2,
        eval_batches=2,
    )
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


def test_continual_plan_checks_the_sparse_budgets():
    with pytest.raises(ValueError, match=r"sparse_tokens=\[0\] is invalid; allowed: a non-empty list of positive"):
        continual.ContinualPlan(sparse_tokens=[0])


def test_forgetting_is_read_where_b_first_reaches_the_target():
    curve = [{"step": 0, "a": 5.0, "b": 6.0}, {"step": 2, "a": 5.2, "b": 5.5}, {"step": 4, "a": 5.4, "b": 5.0}]
    assert continual.forgetting_at_b(curve, 5.25) == pytest.approx(0.3)  # halfway between the last two
    assert continual.forgetting_at_b(curve, 7.0) == 0.0  # reached before the first step
    assert continual.forgetting_at_b(curve, 4.0) is None  # never reached
