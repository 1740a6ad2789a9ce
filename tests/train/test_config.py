import math

import pytest
from conftest import cli_flags, tiny_train_options

from tokenformer.cli import main
from tokenformer.train import TrainConfig, lr_at

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("precision", "fp16", "fp32 or bf16-mixed"),
        ("lr", -1.0, ">= 0"),
        ("batch_size", 0, "a positive integer"),
        ("val_fraction", 1.5, r"in \(0, 1\)"),
        ("beta2", 1.0, r"in \[0, 1\)"),
        ("device", "tpu", "auto, cpu, cuda"),
        ("min_lr", 1.0, r"<= lr"),
    ],
)
def test_invalid_option_names_field_value_and_allowed(field, value, allowed):
    with pytest.raises(ValueError, match=rf"{field}={value!r} is invalid; allowed: .*{allowed}"):
        TrainConfig(**{field: value})


def test_invalid_model_choices_fail_at_construction():
    with pytest.raises(ValueError, match="unknown preset 'cpu-9M'; allowed: 150M"):
        TrainConfig(model="cpu-9M")
    with pytest.raises(ValueError, match="model_overrides=.*allowed fields: .*vocab_size"):
        TrainConfig(model_overrides={"width": 3})
    with pytest.raises(ValueError, match="seq_len=512 exceeds the model's max_seq_len=256"):
        TrainConfig(model="cpu-1M", seq_len=512)
    with pytest.raises(ValueError, match=r"unknown training option\(s\) \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 1.0})


def test_cli_rejects_bad_config_before_any_work(tmp_path, corpus_file, cache_dir, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        main(["train", *cli_flags(tiny_train_options(corpus_file, cache_dir, out, lr=0.0))])
    assert "lr=0.0 is invalid; allowed: a number > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", *cli_flags(tiny_train_options(corpus_file, cache_dir, out)), "--precision", "fp16"])
    assert "fp16" in capsys.readouterr().err
    assert not out.exists()


def test_missing_or_empty_corpus_says_so(tmp_path, cache_dir, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        main(["train", *cli_flags(tiny_train_options(tmp_path / "missing.txt", cache_dir, out))])
    assert "missing.txt' is not a file, directory or glob" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SystemExit):
        main(["train", *cli_flags(tiny_train_options(tmp_path / "empty.txt", cache_dir, out))])
    assert "empty.txt is empty" in capsys.readouterr().err
    assert not out.exists()


def test_schedule_warms_up_then_decays_to_min_lr():
    config = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, config) == pytest.approx(1e-4)
    assert lr_at(9, config) == pytest.approx(1e-3)
    assert lr_at(60, config) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert lr_at(110, config) == pytest.approx(1e-4) and lr_at(500, config) == pytest.approx(1e-4)
    assert all(lr_at(s, config) >= lr_at(s + 1, config) for s in range(10, 120))
    assert math.isclose(lr_at(10, config), 1e-3)
