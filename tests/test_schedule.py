"""Growth schedules: the rule's stages, and a training run that grows on its own (exactly,
optimizer state carried, learning-rate schedule continued) and resumes across its growth."""

import pytest
import torch
from conftest import cli_flags, tiny_config, tiny_train_options

from tokenformer import TokenformerLM
from tokenformer.cli import main
from tokenformer.families import load_model
from tokenformer.schedule import grow_to_size, growth_schedule, model_size, parse_rule
from tokenformer.train import TrainConfig, Trainer, lr_at, read_metrics
from tokenformer.train.checkpoint import checkpoint_name

START = {"qkv_tokens": 16, "proj_tokens": 16, "ffn_tokens": 32, "n_layers": 2}


def test_the_rule_splits_the_steps_by_share_and_grows_tokens_geometrically_and_depth_linearly():
    stages = growth_schedule("shares:0.1,0.2,0.7", START, {"qkv_tokens": 64, "ffn_tokens": 128, "n_layers": 4}, 100)
    assert [(s.start, s.end) for s in stages] == [(0, 10), (10, 30), (30, 100)]
    assert [s.size for s in stages] == [
        START,
        {"qkv_tokens": 32, "proj_tokens": 16, "ffn_tokens": 64, "n_layers": 3},
        {"qkv_tokens": 64, "proj_tokens": 16, "ffn_tokens": 128, "n_layers": 4},
    ]
    assert parse_rule("equal:4") == [0.25] * 4
    assert [s.steps for s in growth_schedule("equal:3", START, {"ffn_tokens": 72}, 9)] == [3, 3, 3]


@pytest.mark.parametrize(
    "rule, target, steps, message",
    [
        ("shares:0.5,0.6", {"ffn_tokens": 64}, 10, r"shares=\[0.5, 0.6\] sums to 1.1; allowed: shares summing to 1"),
        ("shares:0,1", {"ffn_tokens": 64}, 10, r"shares\[0\]=0.0 is invalid; allowed: a number in \(0, 1\]"),
        ("equal:1", {"ffn_tokens": 64}, 10, r"grow_schedule='equal:1' is invalid; allowed: shares:S1,S2,"),
        ("halves", {"ffn_tokens": 64}, 10, r"grow_schedule='halves' is invalid; allowed: shares:S1,S2,"),
        ("equal:2", {"ffn_tokens": 16}, 10, r"grow_to=\{'ffn_tokens': 16\} is below the model's \{'ffn_tokens': 32\}"),
        ("equal:2", {"ffn_tokens": 32}, 10, r"equals the model's size; allowed: a larger size"),
        ("equal:2", {"width": 64}, 10, r"grow_to=\{'width': 64\} is invalid; allowed: a mapping from qkv_tokens"),
        ("equal:2", {"n_layers": 2.5}, 10, r"grow_to.n_layers=2.5 is invalid; allowed: a positive integer"),
        ("shares:0.05,0.95", {"ffn_tokens": 64}, 10, r"stage 1 of \[0.05, 0.95\] gets no step of 10"),
    ],
)
def test_rule_errors_name_the_value_and_what_is_allowed(rule, target, steps, message):
    with pytest.raises(ValueError, match=message):
        growth_schedule(rule, START, target, steps)


def test_grow_to_size_grows_only_what_is_larger():
    model = TokenformerLM(tiny_config())
    assert grow_to_size(model, {"qkv_tokens": 24, "n_layers": 2}) is None
    record = grow_to_size(model, {"qkv_tokens": 24, "ffn_tokens": 48, "n_layers": 3}, depth_position="bottom")
    assert record.new_layers == [0] and model_size(model.config) == {
        "qkv_tokens": 24,
        "proj_tokens": 20,
        "ffn_tokens": 48,
        "n_layers": 3,
    }


def test_schedule_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"grow_to=\{'n_layers': 3\} is invalid; allowed: null without init_from or"):
        TrainConfig(grow_to={"n_layers": 3})
    with pytest.raises(ValueError, match=r"grow_schedule='equal:2' is invalid; allowed: null without grow_to"):
        TrainConfig(grow_schedule="equal:2")
    with pytest.raises(ValueError, match=r"grow_depth_position='middle' is invalid; allowed: top, bottom, interleave"):
        TrainConfig(grow_depth_position="middle")
    with pytest.raises(ValueError, match=r"old_lr_scale=0 is invalid; allowed: 1 without grow_to and init_from"):
        TrainConfig(grow_schedule="equal:2", grow_to={"n_layers": 3}, old_lr_scale=0)


@pytest.mark.usefixtures("one_thread")
def test_training_grows_on_schedule_exactly_and_resumes_across_the_growth(tmp_path, corpus_file, cache_dir):
    run = tmp_path / "run"
    options = tiny_train_options(
        corpus_file,
        cache_dir,
        run,
        max_steps=8,
        ckpt_interval=2,
        eval_interval=8,
        grow_schedule="shares:0.5,0.5",
        grow_to={"ffn_tokens": 64, "n_layers": 3},
        grow_depth_position="interleave",
        loggers=[],
    )
    main(["train", *cli_flags(options)])  # checkpoints at 2, 4 (before the growth at step 4), 6 and 8
    final_model = load_model(run / "checkpoints" / checkpoint_name(8))
    assert model_size(final_model.config) == {"qkv_tokens": 16, "proj_tokens": 16, "ffn_tokens": 64, "n_layers": 3}
    records = read_metrics(run / "metrics.jsonl")
    (event,) = [r for r in records if r["kind"] == "event"]
    assert (event["step"], event["event"], event["new_layers"], event["after"][1]["ffn"]) == (4, "grow", [1], 64)
    before, after = [r["val_loss"] for r in records if r["kind"] == "val" and r["step"] == 4]
    assert after == pytest.approx(before, abs=1e-6)  # growth keeps the function
    # The learning rate goes on along its schedule, no warmup again.
    lrs = {r["step"]: r["lr"] for r in records if r["kind"] == "train"}
    assert lrs[5] == pytest.approx(lr_at(4, TrainConfig(**options))) and lrs[5] < lrs[4]
    final = [r["val_loss"] for r in records if r["kind"] == "val"][-1]
    # Resumed from the checkpoint before the growth (it grows again, alike) and after it.
    for step, depth in ((4, 2), (6, 3)):
        name = checkpoint_name(step)
        resumed = Trainer(
            TrainConfig(**{**options, "out_dir": str(tmp_path / name), "resume": str(run / "checkpoints" / name)})
        )
        assert resumed.model.config.n_layers == depth
        resumed.fit()
        resumed.close()
        assert resumed.model.config.n_layers == 3
        assert resumed.state.val_history[-1]["val_loss"] == pytest.approx(final, abs=1e-6)
        for new in resumed.model.layers[1].parameters():
            assert torch.isfinite(new).all()
