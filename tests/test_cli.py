import pytest
from conftest import cli_flags, tiny_train_options

from tokenformer.cli import main
from tokenformer.train import list_checkpoints, read_metrics


def test_presets_lists_released_sizes(capsys):
    main(["presets"])
    out = capsys.readouterr().out
    assert "150M" in out and "151.88M" in out and "cpu-1M" in out
    assert "fmnist-0.3M      1x28x28" in out and "0.28M" in out and "cifar-1M" in out


def test_help_lists_every_training_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for option, default in [
        ("--lr", "0.002"),
        ("--precision", "fp32"),
        ("--resume", "null"),
        ("--data", "kjv"),
        ("--keep_last", "3"),
    ]:
        assert option in out and f"default: {default}" in out


@pytest.mark.usefixtures("one_thread")
def test_train_grow_train_keeps_validation_loss_across_growth(tmp_path, corpus_file, cache_dir, capsys):
    options = tiny_train_options(
        corpus_file, cache_dir, tmp_path / "run", max_steps=6, eval_interval=6, ckpt_interval=6
    )
    main(["train", *cli_flags(options)])
    main(
        [
            "grow",
            "--checkpoint",
            str(tmp_path / "run"),
            "--out",
            str(tmp_path / "grown"),
            "--qkv_tokens",
            "24",
            "--ffn_tokens",
            "48",
            "--n_layers",
            "3",
            "--depth_position",
            "interleave",
        ]
    )
    out = capsys.readouterr().out
    assert "function preserving: True" in out and "2 -> 3 layers" in out
    main(["eval", "--model", str(tmp_path / "run" / "checkpoints" / "step-00000006"), "--max_windows", "16"])
    main(["eval", "--model", str(tmp_path / "grown"), "--max_windows", "16"])
    before, after = [line for line in capsys.readouterr().out.splitlines() if line.startswith("perplexity")]
    assert before == after  # same loss to the printed 4 decimals, same perplexity to 3

    main(["train", *cli_flags({**options, "max_steps": 10, "resume": str(tmp_path / "grown")})])
    assert "resumed from" in capsys.readouterr().out
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    val = [(r["step"], r["val_loss"]) for r in records if r["kind"] == "val"]
    assert [s for s, _ in val] == [6, 10]
    # The growth made by `tokenformer grow` is logged when the grown checkpoint is resumed.
    [event] = [r for r in records if r["kind"] == "event"]
    assert (event["step"], event["event"], event["after"][0]["ffn"]) == (6, "grow", 48)
    latest = list_checkpoints(tmp_path / "run")[-1]
    assert latest.name == "step-00000010"
    import json

    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["growth_history"][0]["after"][0] == {"qkv": 24, "proj": 16, "ffn": 48}
    assert state["layers"][2]["mlp"] == {"tokens": 48, "tau": pytest.approx(32**0.5)}  # tau frozen at the old count
    assert state["layers"][1]["mlp"] == {"tokens": 48, "tau": pytest.approx(48**0.5)}  # the new block's own

    main(["generate", "--model", str(tmp_path / "run"), "--prompt", "In the beginning", "--max_new_tokens", "8"])
    assert capsys.readouterr().out.startswith("In the beginning")
    main(["eval", "--model", str(tmp_path / "run"), "--data", str(corpus_file), "--max_windows", "4"])
    assert "over 128 tokens of 1 document(s)" in capsys.readouterr().out


@pytest.mark.usefixtures("one_thread")
def test_grow_refuses_an_existing_output(tmp_path, corpus_file, cache_dir, capsys):
    options = tiny_train_options(
        corpus_file, cache_dir, tmp_path / "run", max_steps=2, eval_interval=2, ckpt_interval=2
    )
    main(["train", *cli_flags(options)])
    (tmp_path / "grown").mkdir()
    with pytest.raises(SystemExit):
        main(
            [
                "grow",
                "--checkpoint",
                str(tmp_path / "run"),
                "--out",
                str(tmp_path / "grown"),
                "--ffn_tokens",
                "48",
                "--evaluate",
                "false",
            ]
        )
    assert "already exists" in capsys.readouterr().err


def test_eval_harness_passes_options_to_lm_eval(tmp_path, monkeypatch, capsys):
    import pytest
    from conftest import tiny_config

    from tokenformer import TokenformerLM
    from tokenformer.families import save_model
    from tokenformer.interop import harness

    save_model(TokenformerLM(tiny_config()), tmp_path / "m")
    calls = []

    def fake_evaluate(model, tasks, **options):
        calls.append((model, tasks, options))
        return {"results": {"piqa": {"acc,none": 0.5}}}

    monkeypatch.setattr(harness, "evaluate", fake_evaluate)
    monkeypatch.setattr(harness, "table", lambda results: f"table of {sorted(results['results'])}")
    main(
        [
            "eval",
            "--model",
            str(tmp_path / "m"),
            "--harness",
            "true",
            "--tasks",
            "[piqa,arc_easy]",
            "--limit",
            "10",
            "--device",
            "cpu",
        ]
    )
    (model, tasks, options) = calls[0]
    assert model == tmp_path / "m" and tasks == ["piqa", "arc_easy"]
    assert options["limit"] == 10 and options["device"] == "cpu" and options["batch_size"] == 8
    assert "piqa" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(tmp_path / "m"), "--harness", "true"])
    assert "--harness needs --tasks" in capsys.readouterr().err


def test_language_model_commands_refuse_a_vision_model(tmp_path, capsys):
    from tokenformer import save_model
    from tokenformer.vision import TokenformerViT, VisionConfig

    vit = save_model(TokenformerViT(VisionConfig.from_preset("fmnist-0.3M")), tmp_path / "vit")
    for argv in (
        ["generate", "--model", str(vit)],
        ["eval", "--model", str(vit), "--data", "kjv"],
        ["eval", "--model", str(vit), "--harness", "true", "--tasks", "[piqa]"],
    ):
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err
        assert f"error: {vit} holds a vision model (tokenformer-vit); this command takes a language model" in err, err


def test_a_config_that_is_not_json_is_named(tmp_path, capsys):
    from conftest import tiny_config

    from tokenformer import TokenformerLM, save_model

    model = save_model(TokenformerLM(tiny_config()), tmp_path / "m")
    (model / "config.json").write_text("{not json")
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(model)])
    assert f"error: {model / 'config.json'} is not valid JSON" in capsys.readouterr().err


@pytest.mark.usefixtures("one_thread")
def test_grow_that_would_change_nothing_is_refused(tmp_path, corpus_file, cache_dir, capsys):
    options = tiny_train_options(
        corpus_file, cache_dir, tmp_path / "run", max_steps=2, eval_interval=2, ckpt_interval=2
    )
    main(["train", *cli_flags(options)])
    grow = ["grow", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "grown"), "--evaluate", "false"]
    for flags, message in (
        (["--ffn_tokens", "32"], "nothing to grow: ffn_tokens=32 equals the current count of every chosen layer"),
        (["--ffn_tokens", "48", "--layers", "[]"], "layers=[] selects no layer"),
    ):
        with pytest.raises(SystemExit):
            main([*grow, *flags])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "grown").exists()


def test_plan_verbs_take_a_config_by_name_or_path_and_flag_overrides(tmp_path, monkeypatch):
    from tokenformer import cli
    from tokenformer.experiments.scaling import ScalingPlan
    from tokenformer.experiments.study import StudyPlan

    called = {}
    monkeypatch.setitem(
        cli.COMMANDS, "scale", lambda plan, workers=1, command="": called.update(scale=(plan, workers, command))
    )
    monkeypatch.setitem(cli.COMMANDS, "study", lambda plan, workers=1, command="": called.update(study=(plan, workers)))
    main(
        ["scale", "demo", "--out_dir", str(tmp_path / "a"), "--seeds", "[3, 4]", "--lr_grid", "[0.001]"]
        + ["--train.threads", "2", "--workers", "2"]
    )
    plan, workers, command = called["scale"]
    assert isinstance(plan, ScalingPlan) and (plan.out_dir, plan.seeds, plan.lr_grid, workers) == (
        str(tmp_path / "a"),
        [3, 4],
        [0.001],
        2,
    )
    assert plan.train.threads == 2 and plan.train.model == "cpu-0.3M"  # the shipped plan's train: section
    assert [s.steps for s in plan.stages] == [30, 30, 30]  # the rest from the shipped configs/scaling/demo.yaml
    assert command.startswith("tokenformer scale --config demo --out_dir")
    path = cli.PACKAGED_CONFIGS / "studies" / "recipe-screen.yaml"
    main(["study", "--config", str(path), "--train.max_steps", "300", "--seeds", "[1, 2]", "--workers", "2"])
    plan, workers = called["study"]
    assert isinstance(plan, StudyPlan) and plan.train.max_steps == 300 and plan.seeds == [1, 2] and workers == 2
    assert plan.train.model == "cpu-0.3M" and plan.baseline == "transformer"


def test_eval_takes_harness_tasks_as_lm_eval_comma_lists_or_lists(tmp_path, monkeypatch, capsys):
    from conftest import tiny_config

    from tokenformer import TokenformerLM, save_model
    from tokenformer.interop import harness

    model = str(save_model(TokenformerLM(tiny_config()), tmp_path / "m"))
    asked = []
    monkeypatch.setattr(harness, "evaluate", lambda model, tasks, **kwargs: asked.append(tasks) or {})
    monkeypatch.setattr(harness, "table", lambda results: "")
    for tasks in ("piqa,arc_easy", "[piqa, arc_easy]", "piqa, arc_easy,piqa"):
        main(["eval", "--model", model, "--harness", "true", "--tasks", tasks, "--device", "cpu"])
    assert asked == [["piqa", "arc_easy"]] * 3
    with pytest.raises(SystemExit):
        main(["eval", "--model", model, "--harness", "true", "--tasks", ","])
    assert "--harness needs --tasks: lm-eval task names, e.g. --tasks piqa,arc_easy; got ','" in capsys.readouterr().err
