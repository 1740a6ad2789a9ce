"""The moving average of the weights (``ema_decay``): the average itself, what validation and
checkpoints use, exact resumption, and growth (width and depth) of the average."""

import re

import pytest
import torch
from conftest import tiny_train_options

from tokenformer.train import TrainConfig, Trainer
from tokenformer.train.checkpoint import EMA, latest_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def make_trainer(tmp_path, corpus_file, cache_dir, **overrides) -> Trainer:
    options = dict(ema_decay=0.75, max_steps=6, eval_interval=100, ckpt_interval=100)
    return Trainer(
        TrainConfig(**tiny_train_options(corpus_file, cache_dir, tmp_path / "run", **{**options, **overrides}))
    )


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_average_follows_the_weights_step_by_step(tmp_path, corpus_file, cache_dir):
    trainer = make_trainer(tmp_path, corpus_file, cache_dir, ema_decay=0.2)
    expected = None
    # The first update copies the weights; update k moves 1 - decay of the way towards them, with
    # decay min(0.2, (1 + k) / (10 + k)): 2/11 (warming up) for k = 1, then 0.2.
    for step, decay in zip(range(1, 4), (None, 2 / 11, 0.2), strict=True):
        trainer.fit(step)
        now = weights(trainer.model)
        expected = now if expected is None else {n: decay * expected[n] + (1 - decay) * now[n] for n in now}
        for name, p in trainer.evaluated_model.named_parameters():
            torch.testing.assert_close(p, expected[name], rtol=0, atol=1e-6)
    trainer.close()
    assert not any(torch.equal(p, now[n]) for n, p in trainer.evaluated_model.named_parameters() if p.dim() > 1)
    assert trainer.evaluated_model is not trainer.model


def test_validation_uses_the_average_and_logs_the_live_weights(tmp_path, corpus_file, cache_dir):
    trainer = make_trainer(tmp_path, corpus_file, cache_dir, max_steps=4, eval_interval=4)
    trainer.fit()
    trainer.close()
    last = trainer.state.val_history[-1]
    assert last["val_loss"] != last["val_loss_raw"]
    task = trainer.task
    with torch.no_grad():
        assert task.evaluate(trainer.evaluated_model, trainer.device)["val_loss"] == pytest.approx(
            last["val_loss"], abs=1e-6
        )
        assert task.evaluate(trainer.model.eval(), trainer.device)["val_loss"] == pytest.approx(
            last["val_loss_raw"], abs=1e-6
        )


def test_without_ema_decay_the_model_itself_is_evaluated(tmp_path, corpus_file, cache_dir):
    trainer = make_trainer(tmp_path, corpus_file, cache_dir, ema_decay=0.0, max_steps=2, eval_interval=2)
    trainer.fit()
    trainer.close()
    assert trainer.ema is None and trainer.evaluated_model is trainer.model
    assert "val_loss_raw" not in trainer.state.val_history[-1]
    assert not (latest_checkpoint(trainer.run_dir) / EMA).exists()


def test_checkpoint_keeps_the_average_and_resuming_continues_it_exactly(tmp_path, corpus_file, cache_dir):
    full = make_trainer(tmp_path / "a", corpus_file, cache_dir)
    full.fit()
    full.close()
    part = make_trainer(tmp_path / "b", corpus_file, cache_dir, ckpt_interval=3)
    part.fit(3)
    part.close()
    assert (latest_checkpoint(part.run_dir) / EMA).is_file()
    resumed = make_trainer(tmp_path / "b", corpus_file, cache_dir, ckpt_interval=3, resume="auto")
    assert resumed.state.step == 3
    for name, p in resumed.evaluated_model.named_parameters():
        assert torch.equal(p, dict(part.evaluated_model.named_parameters())[name])
    resumed.fit()
    resumed.close()
    ema = dict(full.evaluated_model.named_parameters())
    for name, p in resumed.evaluated_model.named_parameters():
        torch.testing.assert_close(p, ema[name], rtol=0, atol=1e-6)


def test_resuming_a_run_without_an_average_starts_one_from_the_weights(tmp_path, corpus_file, cache_dir):
    plain = make_trainer(tmp_path, corpus_file, cache_dir, ema_decay=0.0, ckpt_interval=3)
    plain.fit(3)
    plain.close()
    resumed = make_trainer(tmp_path, corpus_file, cache_dir, ckpt_interval=3, resume="auto")
    resumed.fit(4)
    resumed.close()
    for name, p in resumed.evaluated_model.named_parameters():
        assert torch.equal(p, dict(resumed.model.named_parameters())[name])  # one update: a copy


def test_growth_grows_the_average_and_keeps_its_function(tmp_path, corpus_file, cache_dir):
    trainer = make_trainer(tmp_path, corpus_file, cache_dir, max_steps=6, eval_interval=3)
    trainer.fit(3)
    before = trainer.state.val_history[-1]
    old = weights(trainer.evaluated_model)
    record = trainer.grow(qkv_tokens=24, ffn_tokens=48)
    after = trainer.evaluate()
    assert after["val_loss"] == pytest.approx(before["val_loss"], abs=1e-5)
    assert after["val_loss_raw"] == pytest.approx(before["val_loss_raw"], abs=1e-5)
    live = dict(trainer.model.named_parameters())
    grown = {g.name: g for g in record.grown}
    assert grown
    for name, p in trainer.evaluated_model.named_parameters():
        assert p.shape == live[name].shape
        if name in grown:
            g = grown[name]
            assert torch.equal(p.narrow(g.dim, 0, g.old_size), old[name])
            assert torch.equal(
                p.narrow(g.dim, g.old_size, p.shape[g.dim] - g.old_size),
                live[name].narrow(g.dim, g.old_size, p.shape[g.dim] - g.old_size),
            )
        else:
            assert torch.equal(p, old[name])
    trainer.fit()
    trainer.close()
    assert trainer.evaluated_model.layers[0].mlp.num_tokens == 48


def test_depth_stacking_copies_the_average_of_the_source_layers(tmp_path, corpus_file, cache_dir):
    trainer = make_trainer(tmp_path, corpus_file, cache_dir)
    trainer.fit(3)
    old = weights(trainer.evaluated_model)
    layers = trainer.model.config.n_layers
    record = trainer.stack(2 * layers)
    ema = trainer.evaluated_model
    assert ema.config.n_layers == 2 * layers
    for name, p in ema.named_parameters():
        source = name
        if name.startswith("layers."):
            index, rest = name.removeprefix("layers.").split(".", 1)
            source = f"layers.{record.sources[int(index)]}.{rest}"
        assert torch.equal(p, old[source])
    trainer.fit()
    trainer.close()


@pytest.mark.parametrize("value", [1.0, -0.1, "0.9", True])
def test_bad_ema_decay_is_refused(tmp_path, corpus_file, cache_dir, value):
    with pytest.raises(
        ValueError, match=re.escape(f"ema_decay={value!r} is invalid; allowed: a number in [0, 1) (0 is off)")
    ):
        TrainConfig(**tiny_train_options(corpus_file, cache_dir, tmp_path, ema_decay=value))


def test_ema_with_sharded_training_is_refused(tmp_path, corpus_file, cache_dir):
    with pytest.raises(ValueError, match="ema_decay.*0.9.*strategy: fsdp"):
        TrainConfig(**tiny_train_options(corpus_file, cache_dir, tmp_path, ema_decay=0.9, strategy="fsdp"))


def test_grow_command_grows_the_saved_average_and_consolidate_says_it_drops_it(
    tmp_path, corpus_file, cache_dir, capsys
):
    from tokenformer.cli import main
    from tokenformer.train import load_checkpoint

    trainer = make_trainer(tmp_path, corpus_file, cache_dir, max_steps=6, ckpt_interval=3)
    trainer.fit(3)
    trainer.close()
    main(["grow", "--checkpoint", str(trainer.run_dir), "--out", str(tmp_path / "grown"), "--ffn_tokens", "48"])
    grown = load_checkpoint(tmp_path / "grown")
    shapes = {name: p.shape for name, p in grown.model.state_dict().items()}
    assert {name: t.shape for name, t in grown.ema.items()} == shapes
    assert grown.trainer_state["ema_updates"] == 3
    resumed = make_trainer(
        tmp_path, corpus_file, cache_dir, max_steps=6, ckpt_interval=3, resume=str(tmp_path / "grown")
    )
    assert resumed.evaluated_model.layers[0].mlp.num_tokens == 48
    resumed.fit()
    resumed.close()
    main(["consolidate", "--checkpoint", str(tmp_path / "grown"), "--out", str(tmp_path / "sharded")])
    assert "the moving average of the weights (ema.safetensors) is not carried over" in capsys.readouterr().out


def test_a_sharded_checkpoint_refuses_averaged_weights(tmp_path):
    from tokenformer.train.checkpoint import save_checkpoint

    model = torch.nn.Linear(2, 2)
    with pytest.raises(
        ValueError,
        match=r"a sharded checkpoint cannot hold averaged weights \(ema\); allowed: ema=None with sharded=True",
    ):
        save_checkpoint(
            tmp_path / "ckpt", model, torch.optim.AdamW(model.parameters()), {}, ema=model.state_dict(), sharded=True
        )
    assert not (tmp_path / "ckpt").exists()
