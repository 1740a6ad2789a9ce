import importlib.util
import math

import pytest
import torch
import yaml
from conftest import tiny_train_options

from tokenformer.train import (
    TrainConfig,
    Trainer,
    TrainingDiverged,
    language_modeling_task,
    list_checkpoints,
    read_metrics,
    verify_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def make_trainer(tmp_path, corpus_file, cache_dir, **overrides) -> Trainer:
    return Trainer(TrainConfig(**tiny_train_options(corpus_file, cache_dir, tmp_path / "run", **overrides)))


def test_training_lowers_validation_loss_and_writes_outputs(tmp_path, corpus_file, cache_dir):
    trainer = make_trainer(tmp_path, corpus_file, cache_dir, max_steps=30, eval_interval=30, ckpt_interval=30)
    initial = trainer.evaluate()["val_loss"]
    assert initial == pytest.approx(math.log(512), abs=0.3)  # an untrained model is near uniform
    trainer.fit()
    trainer.close()
    assert trainer.state.val_history[-1]["val_loss"] < initial - 0.5
    run = tmp_path / "run"
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 31))
    assert {"loss", "lr", "train_tokens", "train_flops", "tokens_per_s"} <= set(records[0])
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert TrainConfig(**yaml.safe_load((run / "train_config.yaml").read_text())) == trainer.config
    if importlib.util.find_spec("tensorboard") is not None:
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert trainer.state.flops == pytest.approx(30 * 4 * 32 * trainer.task.flops_per_item(trainer.model))


class NaNAtStep:
    """The language-modelling task, except that the loss of one step is NaN."""

    def __init__(self, task, bad_step):
        self.task, self.bad_step = task, bad_step

    def __getattr__(self, name):
        return getattr(self.task, name)

    def loss(self, model, batch):
        loss = self.task.loss(model, batch)
        return loss * float("nan") if self.bad_step == self.current else loss

    def train_batch(self, step, micro, device):
        self.current = step + 1
        return self.task.train_batch(step, micro, device)


def test_nan_loss_stops_with_the_step_and_keeps_last_good_checkpoint(tmp_path, corpus_file, cache_dir):
    config = TrainConfig(**tiny_train_options(corpus_file, cache_dir, tmp_path / "run", ckpt_interval=2))
    task, tokenizer = language_modeling_task(config)
    trainer = Trainer(config, task=NaNAtStep(task, bad_step=5), tokenizer=tokenizer)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 5; .*last good checkpoint is .*step-00000004"):
        trainer.fit()
    trainer.close()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000002", "step-00000004"]
    verify_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000004")


class HalvesOfOneBatch:
    """Micro-batch ``m`` of every step is half ``m`` of one fixed batch of 4 (or all of it)."""

    def __init__(self, task, accum):
        x, y = task.train_batch(0, 0, torch.device("cpu"))
        self.task, self.x, self.y, self.accum = task, x, y, accum

    def __getattr__(self, name):
        return getattr(self.task, name)

    def train_batch(self, step, micro, device):
        size = 4 // self.accum
        return self.x[micro * size : (micro + 1) * size], self.y[micro * size : (micro + 1) * size]


def test_gradient_accumulation_equals_the_full_batch(tmp_path, corpus_file, cache_dir):
    weights = []
    for accum in (1, 2):
        config = TrainConfig(
            **tiny_train_options(
                corpus_file,
                cache_dir,
                tmp_path / f"run{accum}",
                grad_accum=accum,
                max_steps=3,
                eval_interval=3,
                ckpt_interval=3,
            )
        )
        task, tokenizer = language_modeling_task(config)
        trainer = Trainer(config, task=HalvesOfOneBatch(task, accum), tokenizer=tokenizer)
        trainer.fit()
        trainer.close()
        weights.append(trainer.model.state_dict())
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], atol=1e-6, rtol=1e-5)


def test_grow_in_python_keeps_validation_loss_and_continues(tmp_path, corpus_file, cache_dir):
    trainer = make_trainer(tmp_path, corpus_file, cache_dir, max_steps=8, ckpt_interval=8, eval_interval=8)
    trainer.fit(4)  # validates at its last step
    before = trainer.state.val_history[-1]["val_loss"]
    record = trainer.grow(qkv_tokens=24, ffn_tokens=48)
    assert record.function_preserving
    assert trainer.evaluate()["val_loss"] == pytest.approx(before, abs=1e-5)
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            assert trainer.optimizer.state[p]["exp_avg"].shape == p.shape
    trainer.fit()
    trainer.close()
    assert trainer.state.step == 8 and trainer.state.growth_history[0]["step"] == 4
    assert [r["step"] for r in trainer.state.val_history] == [4, 4, 8]
    assert trainer.model.layers[0].mlp.num_tokens == 48


def test_depth_growth_in_python_keeps_validation_loss_and_resumes(tmp_path, corpus_file, cache_dir):
    options = dict(max_steps=8, ckpt_interval=4, eval_interval=4, resume="auto", ema_decay=0.9)
    trainer = make_trainer(tmp_path, corpus_file, cache_dir, **options)
    trainer.fit(4)
    before = trainer.state.val_history[-1]["val_loss"]
    record = trainer.grow(ffn_tokens=48, n_layers=3, depth_position="interleave")
    assert trainer.evaluate()["val_loss"] == before  # the moving average grew exactly too
    new = trainer.model.layers[record.new_layers[0]]
    assert all(trainer.optimizer.state[p]["step"].item() == 0 for p in new.parameters())
    assert trainer.state.growth_history[-1]["new_layers"] == [1]
    trainer.fit(6)
    trainer.close()
    resumed = make_trainer(tmp_path, corpus_file, cache_dir, **options)
    assert resumed.state.step == 6 and resumed.model.config.n_layers == 3
    resumed.fit()
    resumed.close()


def test_depth_growth_of_a_sharded_run_on_one_rank(tmp_path, corpus_file, cache_dir, monkeypatch):
    """FSDP2 on one gloo rank: the model is gathered, grown in width and depth, and resharded with
    its optimizer state (new blocks at zero); the sharded checkpoint resumes at the grown size."""
    import socket

    from tokenformer.train.parallel import close_distributed

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name, value in dict(RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=port).items():
        monkeypatch.setenv(name, str(value))
    options = dict(max_steps=6, ckpt_interval=4, eval_interval=4, strategy="fsdp", resume="auto", loggers=[])
    try:
        trainer = make_trainer(tmp_path, corpus_file, cache_dir, **options)
        trainer.fit(4)
        before = trainer.state.val_history[-1]["val_loss"]
        record = trainer.grow(ffn_tokens=48, n_layers=3, depth_position="interleave")
        assert trainer.evaluate()["val_loss"] == pytest.approx(before, abs=1e-6)
        new = dict(trainer.model.named_parameters())["layers.1.mlp.key_param_tokens"]
        old = dict(trainer.model.named_parameters())["layers.0.mlp.key_param_tokens"]
        assert record.new_layers == [1] and trainer.optimizer.state[new]["step"].item() == 0
        assert trainer.optimizer.state[old]["step"].item() == 4
        trainer.fit(5)
        trainer.close()
        resumed = make_trainer(tmp_path, corpus_file, cache_dir, **options)
        assert resumed.state.step == 5 and resumed.model.config.n_layers == 3
        resumed.fit()
        resumed.close()
    finally:
        close_distributed()


def test_stack_in_python_copies_layers_and_their_moments_and_resumes(tmp_path, corpus_file, cache_dir):
    trainer = make_trainer(
        tmp_path, corpus_file, cache_dir, max_steps=8, ckpt_interval=4, eval_interval=4, resume="auto"
    )
    trainer.fit(4)
    layers = trainer.model.config.n_layers
    moments = {n: trainer.optimizer.state[p]["exp_avg"].clone() for n, p in trainer.model.named_parameters()}
    record = trainer.stack(2 * layers)
    assert record.sources == list(range(layers)) * 2
    for name, p in trainer.model.named_parameters():
        state = trainer.optimizer.state[p]
        source = name
        if name.startswith("layers."):
            index, rest = name.removeprefix("layers.").split(".", 1)
            source = f"layers.{record.sources[int(index)]}.{rest}"
        assert torch.equal(state["exp_avg"], moments[source])
    copied, original = trainer.model.layers[layers].mlp.key_param_tokens, trainer.model.layers[0].mlp.key_param_tokens
    assert trainer.optimizer.state[copied]["exp_avg"] is not trainer.optimizer.state[original]["exp_avg"]
    trainer.fit(6)
    trainer.close()
    resumed = make_trainer(
        tmp_path, corpus_file, cache_dir, max_steps=8, ckpt_interval=4, eval_interval=4, resume="auto"
    )
    assert resumed.state.step == 6 and resumed.model.config.n_layers == 2 * layers
    assert resumed.state.growth_history[0]["n_layers_after"] == 2 * layers
    resumed.fit()
    resumed.close()


def test_bf16_mixed_precision_trains(tmp_path, corpus_file, cache_dir):
    trainer = make_trainer(
        tmp_path, corpus_file, cache_dir, precision="bf16-mixed", max_steps=4, eval_interval=4, ckpt_interval=4
    )
    trainer.fit()
    trainer.close()
    assert math.isfinite(trainer.state.val_history[-1]["val_loss"])
    assert next(trainer.model.parameters()).dtype == torch.float32  # weights stay fp32


def test_resume_in_process_reproduces_the_losses(tmp_path, corpus_file, cache_dir):
    full = make_trainer(tmp_path / "a", corpus_file, cache_dir)
    full.fit()
    full.close()
    part = make_trainer(tmp_path / "b", corpus_file, cache_dir)
    part.fit(5)  # checkpoints at 4 and 5; steps after 5 never happen in this process
    part.close()
    resumed = make_trainer(tmp_path / "b", corpus_file, cache_dir, resume="auto")
    assert resumed.state.step == 5
    resumed.fit()
    resumed.close()
    losses = [
        [(r["step"], r["loss"]) for r in read_metrics(t / "run" / "metrics.jsonl") if r["kind"] == "train"]
        for t in (tmp_path / "a", tmp_path / "b")
    ]
    assert [s for s, _ in losses[1]] == list(range(1, 13))
    for (_, a), (_, b) in zip(*losses, strict=True):
        assert abs(a - b) <= 1e-6


def test_adamw_is_fused_on_cpu_and_keeps_its_implementation_when_resumed(tmp_path, corpus_file, cache_dir):
    trainer = make_trainer(tmp_path, corpus_file, cache_dir, max_steps=4, eval_interval=4, ckpt_interval=4)
    assert trainer.optimizer.defaults["fused"] is True
    assert all(group["fused"] is True for group in trainer.optimizer.param_groups)
    trainer.fit()
    trainer.close()
    # A checkpoint from an optimizer with torch's default implementation (as written before the
    # fused one was chosen) resumes fused, with its step counters where the fused kernel wants them.
    checkpoint = list_checkpoints(tmp_path / "run")[-1]
    from tokenformer.train.checkpoint import load_checkpoint, save_checkpoint

    loaded = load_checkpoint(checkpoint)
    default = torch.optim.AdamW(loaded.model.param_groups(0.1), lr=1e-3)
    default.load_state_dict(loaded.optimizer_state)
    for group in default.param_groups:
        group["fused"] = None
    for state in default.state.values():
        state["step"] = state["step"].to(torch.float64)
    old = tmp_path / "old" / "step-00000004"
    save_checkpoint(old, loaded.model, default, loaded.trainer_state, loaded.tokenizer_json, loaded.rng)
    assert all(group["fused"] is None for group in load_checkpoint(old).optimizer_state["param_groups"])
    resumed = make_trainer(
        tmp_path, corpus_file, cache_dir, resume=str(old), max_steps=6, eval_interval=6, ckpt_interval=6
    )
    assert all(group["fused"] is True for group in resumed.optimizer.param_groups)
    assert all(state["step"].dtype == torch.float32 for state in resumed.optimizer.state.values())
    resumed.fit()
    resumed.close()
    assert resumed.state.step == 6 and math.isfinite(resumed.state.val_history[-1]["val_loss"])


def test_keep_own_implementation_undoes_the_flags_of_a_loaded_state():
    from tokenformer.train.trainer import keep_own_implementation

    weights = [torch.nn.Parameter(torch.randn(3, 2))]
    fused = torch.optim.AdamW(weights, fused=True)
    weights[0].grad = torch.ones(3, 2)
    fused.step()
    plain = torch.optim.AdamW(weights)
    plain.load_state_dict(fused.state_dict())
    assert plain.param_groups[0]["fused"] is True  # what loading alone leaves behind
    keep_own_implementation(plain)
    assert plain.param_groups[0]["fused"] is None
    assert (
        plain.state[weights[0]]["step"].device.type == "cpu" and plain.state[weights[0]]["step"].dtype == torch.float32
    )
    plain.step()
    assert float(plain.state[weights[0]]["step"]) == 2


def test_standard_error_of_the_mean():
    from tokenformer.train.metrics import standard_error

    # sample s.d. of 1, 2, 3, 4.5 is sqrt(2.2292) = 1.4930; over sqrt(4)
    assert standard_error([1.0, 2.0, 3.0, 4.5]) == pytest.approx(0.746520, abs=1e-6)
    assert math.isnan(standard_error([0.9]))


def test_activation_checkpointing_trains_the_same_weights(tmp_path, corpus_file, cache_dir):
    weights, losses = [], []
    for checkpointing in (False, True):
        trainer = make_trainer(
            tmp_path / str(checkpointing),
            corpus_file,
            cache_dir,
            max_steps=4,
            eval_interval=4,
            ckpt_interval=4,
            activation_checkpointing=checkpointing,
        )
        trainer.fit(2)
        trainer.grow(qkv_tokens=24, ffn_tokens=48)  # grown blocks are checkpointed too
        assert all((block.checkpoint_fn is not None) == checkpointing for block in trainer.model.layers)
        trainer.fit()
        trainer.close()
        weights.append(trainer.model.state_dict())
        losses.append([r["val_loss"] for r in trainer.state.val_history])
    assert losses[0] == losses[1]
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
