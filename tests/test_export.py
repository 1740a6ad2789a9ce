"""``tokenformer export``: a run as a clean hub folder."""

import json
from pathlib import Path

import pytest
import torch
from conftest import cli_flags, tiny_config, tiny_train_options
from safetensors.torch import load_file

from tokenformer import TokenformerLM, load_model, save_model
from tokenformer.cli import main
from tokenformer.interop import hub
from tokenformer.train import list_checkpoints

HUB_FILES = {
    "config.json",
    "model.safetensors",
    "README.md",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus_file, cache_dir) -> Path:
    """A run of 4 steps that keeps a moving average of its weights."""
    options = tiny_train_options(
        corpus_file,
        cache_dir,
        tmp_path_factory.mktemp("export") / "run",
        max_steps=4,
        eval_interval=4,
        ckpt_interval=4,
        ema_decay=0.5,
    )
    main(["train", *cli_flags(options)])
    return Path(options["out_dir"])


def error_line(argv: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 1 and len(err.splitlines()) == 1, err
    return err


def test_export_writes_the_hub_folder_and_nothing_of_the_training_state(run, tmp_path):
    out = tmp_path / "hub"
    main(["export", str(run), str(out)])
    code = {path.name for path in hub.code_files()}
    assert {p.name for p in out.iterdir()} == HUB_FILES | code
    (checkpoint,) = list_checkpoints(run)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    # The run kept a moving average: its weights are exported, and the validation loss is theirs.
    averaged = load_file(checkpoint / "ema.safetensors")
    assert all(torch.equal(load_model(out).state_dict()[k], v) for k, v in averaged.items())
    card = (out / "README.md").read_text()
    loss = state["val_history"][-1]["val_loss"]
    assert f"| validation loss | {loss:.4f} (perplexity" in card and "at step 4 |" in card
    assert "| steps / tokens | 4 / 512 |" in card and "moving average of the weights (decay 0.5)" in card
    assert "| sequence length / batch | 32 / 4 x 1 accumulated |" in card


def test_export_of_the_live_weights_and_flags_by_name(run, tmp_path):
    out = tmp_path / "live"
    main(["export", "--run", str(run), "--out", str(out), "--ema", "false"])
    (checkpoint,) = list_checkpoints(run)
    live = load_file(checkpoint / "model.safetensors")
    assert all(torch.equal(load_model(out).state_dict()[k], v) for k, v in live.items())
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    card = (out / "README.md").read_text()
    assert f"| validation loss | {state['val_history'][-1]['val_loss_raw']:.4f}" in card
    assert "moving average" not in card


def test_export_refuses_what_it_cannot_do(run, tmp_path, capsys):
    out = tmp_path / "hub"
    main(["export", str(run), str(out)])
    err = error_line(["export", str(run), str(out)], capsys)
    assert f"{out} already holds a model (config.json); pass overwrite=True (--overwrite)" in err
    main(["export", str(run), str(out), "--overwrite", "true"])
    model_dir = save_model(TokenformerLM(tiny_config()), tmp_path / "plain")
    err = error_line(["export", str(model_dir), str(tmp_path / "x")], capsys)
    assert f"{model_dir} has no tokenizer.json; pass --tokenizer PATH" in err
    tokenizer = str(run / "checkpoints" / "step-00000004" / "tokenizer.json")
    err = error_line(["export", str(model_dir), str(tmp_path / "x"), "--tokenizer", tokenizer, "--ema", "true"], capsys)
    assert f"{model_dir} holds no moving average (ema.safetensors); allowed: --ema false or null" in err
    assert not (tmp_path / "x").exists()
