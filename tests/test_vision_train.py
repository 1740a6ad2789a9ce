import json
import re

import pytest
import torch
from conftest import cli_flags
from test_vision_data import fake_cifar_archive, fake_fashion_mnist

from tokenformer import families, io
from tokenformer.cli import main
from tokenformer.data.vision import FASHION_MNIST_DIR
from tokenformer.train import TrainConfig, Trainer
from tokenformer.vision import TokenformerViT

TINY_VIT = dict(
    n_layers=1, d_model=16, n_heads=2, qkv_tokens=8, proj_tokens=8, ffn_tokens=16, patch_tokens=8, head_tokens=8
)


def vision_options(out_dir, data_path=None, vision=None, **overrides) -> dict:
    base = dict(
        task="vision",
        model="fmnist-0.3M",
        model_overrides=dict(TINY_VIT),
        batch_size=16,
        max_steps=6,
        warmup_steps=2,
        eval_interval=3,
        ckpt_interval=3,
        log_interval=1,
        keep_last=10,
        threads=1,
        device="cpu",
        progress=False,
        out_dir=str(out_dir),
        seed=3,
    )
    base["vision"] = {**({} if data_path is None else {"data_path": str(data_path)}), **(vision or {})}
    return {**base, **overrides}


@pytest.fixture
def fake_data(tmp_path):
    return fake_fashion_mnist(tmp_path / "fm", n_train=200, n_test=20)


@pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(),
    reason=f"Fashion-MNIST not installed in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)",
)
def test_short_fashion_mnist_training_beats_chance(tmp_path, one_thread, capsys):
    options = vision_options(
        tmp_path / "run",
        model_overrides={},
        batch_size=64,
        max_steps=60,
        warmup_steps=10,
        lr=2e-3,
        eval_interval=60,
        ckpt_interval=60,
        log_interval=10,
    )
    main(["train", *cli_flags(options)])
    assert "test accuracy" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert metrics["count"] == 10000
    assert metrics["accuracy"] > 0.45  # chance is 0.10
    assert (tmp_path / "run" / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_vision_run_resumes_exactly(tmp_path, fake_data, one_thread):
    main(["train", *cli_flags(vision_options(tmp_path / "straight", fake_data))])
    interrupted = Trainer(TrainConfig(**vision_options(tmp_path / "resumed", fake_data)))
    interrupted.fit(3)
    interrupted.close()
    main(["train", *cli_flags(vision_options(tmp_path / "resumed", fake_data, resume="auto"))])
    straight = io.load_weights(tmp_path / "straight/checkpoints/step-00000006/model.safetensors")
    resumed = io.load_weights(tmp_path / "resumed/checkpoints/step-00000006/model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    model = families.load_model(tmp_path / "resumed/checkpoints/step-00000006")
    assert isinstance(model, TokenformerViT) and model.config.d_model == 16


def test_grow_of_a_vision_checkpoint_keeps_validation_loss_and_accuracy(tmp_path, fake_data, one_thread, capsys):
    main(["train", *cli_flags(vision_options(tmp_path / "run", fake_data, max_steps=4))])
    capsys.readouterr()
    main(
        [
            "grow",
            "--checkpoint",
            str(tmp_path / "run"),
            "--out",
            str(tmp_path / "grown"),
            "--qkv_tokens",
            "12",
            "--ffn_tokens",
            "24",
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr().out
    found = re.search(
        r"before growth: (validation loss \S+ \(accuracy \S+\)); right after: (validation loss \S+ \(accuracy \S+\))",
        out,
    )
    assert found, out
    assert found.group(1) == found.group(2)
    grown = families.load_model(tmp_path / "grown")
    assert isinstance(grown, TokenformerViT)
    assert grown.config.qkv_tokens == 12 and grown.config.ffn_tokens == 24 and grown.config.proj_tokens == 8
    main(
        ["train", *cli_flags(vision_options(tmp_path / "run", fake_data, max_steps=6, resume=str(tmp_path / "grown")))]
    )
    assert (tmp_path / "run/checkpoints/step-00000006").is_dir()
    assert (tmp_path / "run/test_metrics.json").is_file()


def test_cifar10_training_end_to_end(tmp_path, one_thread, capsys):
    """The CIFAR-10 path: python archive -> RGB batches with crop and flip -> the 3-channel preset -> test report."""
    archive = tmp_path / "cifar-10-python.tar.gz"
    fake_cifar_archive(archive, per_batch=8)
    options = vision_options(
        tmp_path / "run",
        archive,
        model="cifar-1M",
        vision={"dataset": "cifar10", "crop_padding": 4, "hflip": True},
        batch_size=8,
    )
    main(["train", *cli_flags(options)])
    assert "test accuracy" in capsys.readouterr().out
    model = families.load_model(tmp_path / "run/checkpoints/step-00000006")
    assert isinstance(model, TokenformerViT)
    assert (model.config.in_channels, model.config.image_size, model.config.num_patches) == (3, 32, 64)
    metrics = json.loads((tmp_path / "run/test_metrics.json").read_text())
    assert metrics["count"] == 8 and metrics["classes"][0] == "airplane"
    assert sum(map(sum, metrics["confusion"])) == 8
    assert (tmp_path / "run/confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_random_erasing_option_reaches_the_training_batches(tmp_path, fake_data, one_thread):
    plain = Trainer(TrainConfig(**vision_options(tmp_path / "plain", fake_data)))
    erased = Trainer(TrainConfig(**vision_options(tmp_path / "erased", fake_data, vision={"erase_prob": 1.0})))
    for step in range(3):
        (a, labels_a), (b, labels_b) = (t.task.train_batch(step, 0, t.device) for t in (plain, erased))
        assert torch.equal(labels_a, labels_b)
        differs = (a != b).flatten(1).any(dim=1)
        assert differs.float().mean() > 0.9  # every image gets a rectangle (a noise pixel can equal the original)
    assert erased.task.val_batches.erase_prob == erased.task.test_batches.erase_prob == 0
    plain.close(), erased.close()


def test_label_smoothing_option_reaches_the_training_loss(tmp_path, fake_data, one_thread):
    trainer = Trainer(TrainConfig(**vision_options(tmp_path / "run", fake_data, vision={"label_smoothing": 0.2})))
    images, labels = batch = trainer.task.train_batch(0, 0, trainer.device)
    logits = trainer.model(images)
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.2)
    assert trainer.task.loss(trainer.model, batch).item() == pytest.approx(expected.item(), rel=1e-5)
    trainer.close()


def test_vision_cli_with_ema_tests_the_averaged_weights(tmp_path, fake_data, one_thread):
    # The test accuracy is the averaged weights' (saved as the checkpoint's ema.safetensors), not the live ones'.
    run = tmp_path / "run"
    main(["train", *cli_flags(vision_options(run, fake_data, ema_decay=0.9, lr=1e-2))])
    checkpoint = run / "checkpoints" / "step-00000006"
    model = families.load_model(checkpoint)
    trainer = Trainer(TrainConfig(**vision_options(tmp_path / "other", fake_data)))
    live = trainer.task.classification.evaluate(model, trainer.task.test_batches)
    model.load_state_dict(io.load_weights(checkpoint / "ema.safetensors"))
    averaged = trainer.task.classification.evaluate(model, trainer.task.test_batches)
    trainer.close()
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert metrics["loss"] == pytest.approx(averaged.loss, rel=1e-5)
    assert abs(averaged.loss - live.loss) > 1e-5


def test_vision_options_are_checked():
    with pytest.raises(ValueError, match="training option task='image' is invalid; allowed: lm or vision"):
        TrainConfig(task="image")
    with pytest.raises(ValueError, match="unknown preset 'cpu-1M'"):
        TrainConfig(task="vision", model="cpu-1M")
    with pytest.raises(ValueError, match="allowed fields: .*patch_tokens"):
        TrainConfig(task="vision", model="fmnist-0.3M", model_overrides={"vocab_size": 10})
    with pytest.raises(ValueError, match="training option vision.crop_padding=-1 is invalid"):
        TrainConfig(task="vision", model="fmnist-0.3M", vision={"crop_padding": -1})
    with pytest.raises(ValueError, match=r"vision.label_smoothing=1.5 is invalid; allowed: a number in \[0, 1\)"):
        TrainConfig(task="vision", model="fmnist-0.3M", vision={"label_smoothing": 1.5})
    with pytest.raises(ValueError, match="allowed: the defaults with task: lm"):
        TrainConfig(task="lm", vision={"label_smoothing": 0.1})
    with pytest.raises(ValueError, match=r"vision.erase_prob=2 is invalid; allowed: a probability in \[0, 1\]"):
        TrainConfig(task="vision", model="fmnist-0.3M", vision={"erase_prob": 2})
    with pytest.raises(ValueError, match="allowed: the defaults with task: lm"):
        TrainConfig(task="lm", vision={"erase_prob": 0.5})
    with pytest.raises(ValueError, match=r"unknown vision option\(s\) \['colour'\]"):
        TrainConfig(task="vision", model="fmnist-0.3M", vision={"colour": 1})
    # A config written before the vision options formed a group still loads.
    old = TrainConfig.from_dict({"task": "vision", "model": "fmnist-0.3M", "crop_padding": 2, "dataset": "cifar10"})
    assert (old.vision.crop_padding, old.vision.dataset) == (2, "cifar10")
