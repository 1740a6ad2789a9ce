"""Learning new data from a trained run: ``continual: finetune | grow | grow_separate | sparse | sparse_memory``."""

import pytest
import torch
from conftest import TINY_MODEL, cli_flags, tiny_train_options

from tokenformer.cli import main
from tokenformer.data import kjv_documents
from tokenformer.pattention import Pattention
from tokenformer.sparse_finetuning import USAGE_FILE, load_usage, memory_tables
from tokenformer.train import TrainConfig, Trainer, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, corpus_file, cache_dir):
    """A short run on the old corpus, which the continual runs start from."""
    out = tmp_path_factory.mktemp("base") / "run"
    options = tiny_train_options(corpus_file, cache_dir, out, max_steps=4, eval_interval=4)
    trainer = Trainer(TrainConfig(**options))
    trainer.fit()
    trainer.close()
    return out


@pytest.fixture(scope="module")
def new_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("new") / "new.txt"
    path.write_text(kjv_documents()[40].text[:60_000], encoding="utf-8")
    return path


def continual_options(tmp_path, cache_dir, base_run, new_corpus, **overrides):
    """Options of a run that learns ``new_corpus`` from ``base_run``."""
    defaults = dict(max_steps=4, ckpt_interval=2, init_from=str(base_run), resume="auto")
    return tiny_train_options(new_corpus, cache_dir, tmp_path / "continual", **{**defaults, **overrides})


def test_grow_separate_keeps_the_old_part_of_every_layer_across_a_resume(tmp_path, cache_dir, base_run, new_corpus):
    options = continual_options(
        tmp_path, cache_dir, base_run, new_corpus, continual="grow_separate", grow_to={"ffn_tokens": 40}
    )
    main(["train", *cli_flags({**options, "max_steps": 2})])
    main(["train", *cli_flags(options)])  # resumed: the split and the frozen old tokens come back
    base = load_checkpoint(base_run / "checkpoints" / "step-00000004").model
    trained = load_checkpoint(tmp_path / "continual" / "checkpoints" / "step-00000004")
    assert trained.trainer_state["growth_history"][0]["normalisation"] == "separate"
    model = trained.model
    assert model.config.norm_splits == [{"mlp": 32}, {"mlp": 32}]
    for old_layer, layer in zip(base.layers, model.layers, strict=True):
        x = torch.randn(3, 5, layer.mlp.in_features)
        with torch.no_grad():
            old_part, new_part = layer.mlp.parts(x)
            assert torch.equal(old_part, old_layer.mlp(x))
            assert new_part.abs().max() > 0  # the new tokens learned


def test_sparse_trains_the_chosen_tokens_only_and_resumes_with_its_statistics(
    tmp_path, corpus_file, cache_dir, base_run, new_corpus
):
    options = continual_options(
        tmp_path,
        cache_dir,
        base_run,
        new_corpus,
        continual="sparse",
        trainable_tokens=3,
        reference_data=str(corpus_file),
        usage_batches=2,
    )
    main(["train", *cli_flags({**options, "max_steps": 2})])
    usage_new, usage_old = load_usage(tmp_path / "continual" / USAGE_FILE)
    main(["train", *cli_flags(options)])
    assert torch.equal(load_usage(tmp_path / "continual" / USAGE_FILE)[0]["layers.0.mlp"], usage_new["layers.0.mlp"])
    base = dict(load_checkpoint(base_run / "checkpoints" / "step-00000004").model.named_parameters())
    model = load_checkpoint(tmp_path / "continual" / "checkpoints" / "step-00000004").model
    for name, module in model.named_modules():
        if not isinstance(module, Pattention):
            continue
        for kind in ("key_param_tokens", "value_param_tokens"):
            moved = (getattr(module, kind) != base[f"{name}.{kind}"]).any(dim=1)
            assert 0 < moved.sum() <= 3, (name, kind)  # at most the budget, and the same rows across the resume
            assert set(usage_new) == set(usage_old) and name in usage_new
    for name, param in model.named_parameters():
        if not name.endswith(("key_param_tokens", "value_param_tokens")):
            assert torch.equal(param, base[name]), name


def test_sparse_memory_trains_the_chosen_slots_values_only(tmp_path, corpus_file, cache_dir, new_corpus):
    memory = {**TINY_MODEL, "memory_layers": [1], "memory_sub_keys": 4, "memory_top_k": 3, "memory_heads": 2}
    base_dir = tmp_path / "memory-base"
    base = tiny_train_options(corpus_file, cache_dir, base_dir, model_overrides=memory, max_steps=2, eval_interval=2)
    Trainer(TrainConfig(**base)).fit()
    options = continual_options(
        tmp_path,
        cache_dir,
        base_dir,
        new_corpus,
        model_overrides=memory,
        continual="sparse_memory",
        trainable_tokens=5,
        reference_data=str(corpus_file),
        usage_batches=2,
        max_steps=2,
    )
    main(["train", *cli_flags(options)])
    usage_new, usage_old = load_usage(tmp_path / "continual" / USAGE_FILE)
    assert set(usage_new) == set(usage_old) == {"layers.1.memory.0"}
    before = dict(load_checkpoint(base_dir / "checkpoints" / "step-00000002").model.named_parameters())
    model = load_checkpoint(tmp_path / "continual" / "checkpoints" / "step-00000002").model
    ((table, _),) = memory_tables(model)
    for name, param in model.named_parameters():
        if name == f"{table}.value_param_tokens":
            assert 0 < (param != before[name]).any(dim=1).sum() <= 5
        else:
            assert torch.equal(param, before[name]), name


def test_sparse_memory_needs_a_memory(tmp_path, corpus_file, cache_dir, base_run, new_corpus):
    options = continual_options(
        tmp_path,
        cache_dir,
        base_run,
        new_corpus,
        continual="sparse_memory",
        trainable_tokens=2,
        reference_data=str(corpus_file),
        usage_batches=1,
    )
    with pytest.raises(ValueError, match="slot usage needs a model with a sparse memory"):
        Trainer(TrainConfig(**options))


def test_sparse_refuses_to_resume_without_its_statistics(tmp_path, corpus_file, cache_dir, base_run, new_corpus):
    options = continual_options(
        tmp_path,
        cache_dir,
        base_run,
        new_corpus,
        continual="sparse",
        trainable_tokens=2,
        reference_data=str(corpus_file),
        usage_batches=1,
        max_steps=2,
    )
    Trainer(TrainConfig(**options)).fit()
    (tmp_path / "continual" / USAGE_FILE).unlink()
    with pytest.raises(Exception, match="token usage its first session measured"):
        Trainer(TrainConfig(**{**options, "max_steps": 4}))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            {"continual": "grow", "init_from": "run"},
            "continual='grow' is invalid; allowed: grow or grow_separate with grow_to",
        ),
        ({"continual": "freeze", "init_from": "run"}, "continual='freeze' is invalid; allowed: finetune, grow"),
        ({"continual": "sparse"}, "continual='sparse' is invalid; allowed: null without init_from"),
        ({"continual": "sparse", "init_from": "run"}, "trainable_tokens=None is invalid; allowed: a positive"),
        (
            {"continual": "sparse", "init_from": "run", "trainable_tokens": 4},
            "reference_data=None is invalid; allowed: a corpus name",
        ),
        ({"trainable_tokens": 4}, "trainable_tokens=4 is invalid; allowed: a positive integer with continual: sparse"),
        (
            {"continual": "finetune", "init_from": "run", "grow_to": {"ffn_tokens": 40}},
            "continual='finetune' is invalid; allowed: grow, grow_separate or null with grow_to",
        ),
        (
            {"continual": "grow_separate", "init_from": "run", "grow_to": {"n_layers": 3}},
            "allowed: grow or grow_separate with grow_to giving token counts only",
        ),
    ],
)
def test_continual_options_are_checked(tmp_path, corpus_file, cache_dir, overrides, match):
    options = tiny_train_options(corpus_file, cache_dir, tmp_path)
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{**options, **overrides})


def test_continual_grow_freezes_the_old_tokens_unless_configured():
    grow = TrainConfig(init_from="run", continual="grow", grow_to={"ffn_tokens": 40}, resume=None)
    assert grow.old_scale == 0.0 and grow.grow_normalisation == "joint"
    slow = TrainConfig(init_from="run", continual="grow_separate", grow_to={"ffn_tokens": 40}, old_lr_scale=0.1)
    assert slow.old_scale == 0.1 and slow.grow_normalisation == "separate"
    assert TrainConfig().old_scale == 1.0


def test_grow_command_grows_with_separate_normalisation(tmp_path, base_run, capsys):
    grown = str(tmp_path / "grown")
    main(["grow", "--checkpoint", str(base_run), "--out", grown, "--ffn_tokens", "40", "--normalisation", "separate"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "validation loss" in line]
    assert len({line.split("validation loss")[1].split()[0] for line in lines}) == 1  # unchanged by the growth
    grown = load_checkpoint(tmp_path / "grown").model
    assert grown.config.norm_splits == [{"mlp": 32}, {"mlp": 32}] and grown.layers[0].mlp.num_tokens == 40
