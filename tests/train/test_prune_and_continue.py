"""Pruning a training checkpoint, and learning new data from a trained run (init_from, grow_to, old_lr_scale)."""

import importlib.util

import pytest
import torch
from conftest import cli_flags, tiny_train_options

from tokenformer import load_model
from tokenformer.cli import main
from tokenformer.train import TrainConfig, Trainer, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def train_run(tmp_path, corpus_file, cache_dir, name="run", **overrides) -> Trainer:
    options = tiny_train_options(corpus_file, cache_dir, tmp_path / name, max_steps=6, eval_interval=6, **overrides)
    trainer = Trainer(TrainConfig(**options))
    trainer.fit()
    trainer.close()
    return trainer


def validation_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(("before", "validation"))]


def test_prune_command_then_generate_fine_tune_and_shard(tmp_path, corpus_file, cache_dir, capsys):
    train_run(tmp_path, corpus_file, cache_dir)
    capsys.readouterr()
    # Grow, then prune back: exactly the grown tokens go and the validation loss comes back.
    main(["grow", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "grown"), "--ffn_tokens", "48"])
    main(["prune", "--checkpoint", str(tmp_path / "grown"), "--out", str(tmp_path / "back"), "--ffn_tokens", "32"])
    out = capsys.readouterr().out
    assert "importance measured on 8 batches" in out
    line = next(line for line in out.splitlines() if line.startswith("before pruning: "))
    before, after = line.removeprefix("before pruning: ").split("; right after: ")
    assert before == after
    original, back = load_model(tmp_path / "run" / "checkpoints" / "step-00000006"), load_model(tmp_path / "back")
    assert all(
        torch.equal(a, b) for a, b in zip(original.state_dict().values(), back.state_dict().values(), strict=True)
    )

    main(
        [
            "prune",
            "--checkpoint",
            str(tmp_path / "run"),
            "--out",
            str(tmp_path / "pruned"),
            "--qkv_tokens",
            "12",
            "--ffn_tokens",
            "20",
            "--calibration_batches",
            "2",
        ]
    )
    assert "ghost norm: on" in capsys.readouterr().out
    pruned = load_checkpoint(tmp_path / "pruned")
    assert pruned.model.config.ghost_ranks[0] == {
        "attention.query": 4,
        "attention.key": 4,
        "attention.value": 4,
        "mlp": 12,
    }
    assert pruned.trainer_state["growth_history"][-1]["operation"] == "prune"
    assert pruned.trainer_state["layers"][0]["mlp"] == {"tokens": 20, "tau": pytest.approx(32**0.5), "ghost_rank": 12}

    main(["generate", "--model", str(tmp_path / "pruned"), "--prompt", "In the beginning", "--max_new_tokens", "6"])
    assert capsys.readouterr().out.startswith("In the beginning")

    # Fine-tuning resumes with the optimizer state cut to the kept tokens.
    options = tiny_train_options(
        corpus_file, cache_dir, tmp_path / "tuned", max_steps=8, resume=str(tmp_path / "pruned")
    )
    main(["train", *cli_flags(options)])
    tuned = load_checkpoint(tmp_path / "tuned" / "checkpoints" / "step-00000008")
    assert tuned.model.config.ghost_ranks == pruned.model.config.ghost_ranks
    assert torch.equal(tuned.model.layers[0].mlp.ghost, pruned.model.layers[0].mlp.ghost)  # a buffer: not trained

    # Sharded and back: the ghosts and the optimizer state survive.
    main(["consolidate", "--checkpoint", str(tmp_path / "pruned"), "--out", str(tmp_path / "sharded")])
    main(["consolidate", "--checkpoint", str(tmp_path / "sharded"), "--out", str(tmp_path / "single")])
    single = load_checkpoint(tmp_path / "single")
    assert single.model.config == pruned.model.config
    for a, b in zip(single.model.state_dict().values(), pruned.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert single.optimizer_state["state"].keys() == pruned.optimizer_state["state"].keys()


def test_prune_command_refuses_bad_counts(tmp_path, corpus_file, cache_dir, capsys):
    train_run(tmp_path, corpus_file, cache_dir)
    with pytest.raises(SystemExit):
        main(["prune", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "p"), "--ffn_tokens", "40"])
    assert "prune cannot grow: ffn_tokens=40 is above layer 0's current 32" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_trainer_prunes_the_moving_average_alike(tmp_path, corpus_file, cache_dir):
    trainer = train_run(tmp_path, corpus_file, cache_dir, ema_decay=0.9)
    record = trainer.prune(2, ffn_tokens=20)
    assert trainer.ema.module.config == trainer.model.config
    assert trainer.ema.module.layers[1].mlp.ghost.shape == trainer.model.layers[1].mlp.ghost.shape
    assert record.kept["layers.0.mlp"].numel() == 20
    path = trainer.save_checkpoint(tmp_path / "pruned")
    resumed = Trainer(TrainConfig(**{**trainer.config.to_dict(), "resume": str(path), "max_steps": 8}))
    resumed.fit()
    assert resumed.evaluated_model.layers[0].mlp.num_tokens == 20


def test_growing_with_frozen_old_parameters_keeps_them_bit_identical(tmp_path, corpus_file, cache_dir, capsys):
    base = train_run(tmp_path, corpus_file, cache_dir)
    old = {name: p.detach().clone() for name, p in base.model.named_parameters()}
    options = tiny_train_options(
        corpus_file,
        cache_dir,
        tmp_path / "continual",
        max_steps=4,
        init_from=str(tmp_path / "run"),
        grow_to={"ffn_tokens": 40, "qkv_tokens": 20},
        old_lr_scale=0.0,
        resume="auto",
        ckpt_interval=2,
    )
    main(["train", *cli_flags(options)])
    main(["train", *cli_flags({**options, "max_steps": 8})])  # resumed from its own checkpoint: still frozen
    trained = load_checkpoint(tmp_path / "continual" / "checkpoints" / "step-00000008")
    assert trained.trainer_state["growth_history"][0]["init_from"].endswith("step-00000006")
    grown = ("attention.query", "attention.key", "attention.value", "mlp")
    for name, param in trained.model.named_parameters():
        module = name.rsplit(".", 1)[0].split(".", 2)[
            -1
        ]  # layers.0.attention.query.key_param_tokens -> attention.query
        if name.startswith("layers.") and module in grown:
            assert torch.equal(param[: old[name].shape[0]], old[name]), name  # the old rows
        else:
            assert torch.equal(param, old[name]), name  # the embedding, the output projection, the final norm
    for layer in trained.model.layers:  # the new tokens learned: their keys started at zero
        assert (
            layer.mlp.key_param_tokens[32:].abs().min() > 0
            and layer.attention.key.key_param_tokens[16:].abs().sum() > 0
        )


def test_old_lr_scale_scales_the_old_parameters_updates(tmp_path, corpus_file, cache_dir):
    train_run(tmp_path, corpus_file, cache_dir)
    steps = {}
    for scale in (1.0, 0.25):
        options = tiny_train_options(
            corpus_file,
            cache_dir,
            tmp_path / f"scale-{scale}",
            max_steps=1,
            warmup_steps=0,
            init_from=str(tmp_path / "run"),
            grow_to={"ffn_tokens": 40},
            old_lr_scale=scale,
        )
        trainer = Trainer(TrainConfig(**options))
        before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
        trainer.fit()
        steps[scale] = {name: p.detach() - before[name] for name, p in trainer.model.named_parameters()}
    for name, full in steps[1.0].items():
        old_rows = slice(0, 32) if name.endswith(("mlp.key_param_tokens", "mlp.value_param_tokens")) else slice(None)
        torch.testing.assert_close(steps[0.25][name][old_rows], 0.25 * full[old_rows], rtol=1e-4, atol=1e-7)
        if old_rows.stop == 32:
            torch.testing.assert_close(steps[0.25][name][32:], full[32:], rtol=1e-4, atol=1e-7)


def test_continual_options_are_checked(tmp_path, corpus_file, cache_dir):
    options = tiny_train_options(corpus_file, cache_dir, tmp_path)
    with pytest.raises(ValueError, match="grow_to=.*null without init_from"):
        TrainConfig(**options, grow_to={"ffn_tokens": 40})
    with pytest.raises(ValueError, match="old_lr_scale=0.0 is invalid; allowed: 1 without grow_to"):
        TrainConfig(**options, old_lr_scale=0.0)
    with pytest.raises(ValueError, match="grow_to=.*ffn_tokens, n_layers to positive integers"):
        TrainConfig(**options, init_from="run", grow_to={"ffn": 40})


@pytest.mark.skipif(
    importlib.util.find_spec("gensim") is None, reason="the [continual] extra (gensim) is not installed"
)
def test_news_corpus_is_a_second_domain():
    from tokenformer.data import load_documents

    documents = load_documents("news")
    assert len(documents) == 300 and sum(len(d.text) for d in documents) > 300_000
    assert "Sydney" in documents[0].text and "LORD" not in "".join(d.text for d in documents)
