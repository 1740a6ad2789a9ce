"""What the library promises when things go wrong (docs/failure-behaviour.md): no file outside
the outputs is ever written, one writer per output, a killed writer leaves the old output or the
new one (never a mix, and no debris that stays), configs hold plain data only, sizes read from
a file are checked before memory is allocated for them, and every fault ends a command with one
line that names the option or file."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli_flags, tiny_train_options
from reference import random_released_state_dict

from tokenformer import io
from tokenformer.cli import main
from tokenformer.families import load_model
from tokenformer.train import list_checkpoints
from tokenformer.train.checkpoint import _write_manifest

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = Path(__file__).resolve().parents[1] / "src"
TOKENS = {"qkv": 24, "proj": 20, "ffn": 40}


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus_file, cache_dir):
    """A run with one checkpoint, at step 4, and its options."""
    options = tiny_train_options(
        corpus_file, cache_dir, tmp_path_factory.mktemp("run") / "run", max_steps=4, eval_interval=4, ckpt_interval=4
    )
    main(["train", *cli_flags(options)])
    return Path(options["out_dir"]), options


def error_line(argv: list[str], capsys, code: int = 1) -> str:
    """Run a command that must fail; its error, which must be one line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit.value.code == code, err
    assert len(err.splitlines()) == 1 and err.startswith(f"tokenformer {argv[0]}: error: "), err
    return err


def released_file(path: Path, seed: int, ffn: int = 40) -> Path:
    torch.manual_seed(seed)
    torch.save(random_released_state_dict(97, 32, [{**TOKENS, "ffn": ffn}] * 2), path)
    return path


def convert(src: Path, dst: Path, *extra: str) -> list[str]:
    return ["convert", "--src", str(src), "--dst", str(dst), "--n_heads", "4", *extra]


def no_staging_left(parent: Path) -> bool:
    return not list(parent.glob(".*.tmp-*"))


# -- no file outside the outputs is written --------------------------------------------------------


def test_a_symlink_planted_as_a_run_lock_is_refused_not_followed(run, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "new"
    out.mkdir()
    (out / ".lock").symlink_to(victim)
    err = error_line(["train", *cli_flags({**run[1], "out_dir": str(out)})], capsys)
    assert f"{out / '.lock'}: this lock file is a symbolic link (to {victim})" in err and "remove it" in err
    assert victim.read_text() == "precious"


def test_a_symlink_planted_as_a_cache_lock_is_refused_not_followed(tmp_path):
    from tokenformer.data import Document, train_bpe

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    docs = [Document("a", "some words to train a byte level tokenizer on " * 20)]
    first = train_bpe(docs, 300, tmp_path / "cache")
    entry = next((tmp_path / "cache" / "tokenizers").glob("bpe-*.json"))
    entry.unlink()
    io.lock_beside(entry).unlink()
    io.lock_beside(entry).symlink_to(victim)
    with pytest.raises(io.WriteError, match="this lock file is a symbolic link"):
        train_bpe(docs, 300, tmp_path / "cache")
    assert victim.read_text() == "precious" and first.vocab_size > 256


# -- one writer per output folder ------------------------------------------------------------------


def test_a_second_writer_of_an_output_folder_is_refused(run, tmp_path, capsys):
    released = released_file(tmp_path / "released.bin", seed=1)
    grow = ["grow", "--checkpoint", str(run[0]), "--qkv_tokens", "24", "--evaluate", "false"]
    for argv, out in (
        ([*grow, "--out", str(tmp_path / "grown")], tmp_path / "grown"),
        (convert(released, tmp_path / "dst"), tmp_path / "dst"),
    ):
        with io.claim_output(out):  # as another process writing it would
            assert "is in use by another writer" in error_line(argv, capsys)
        assert not out.exists() and no_staging_left(tmp_path)
        main(argv)  # free now
        assert out.is_dir()


def test_a_folder_made_at_the_output_while_it_is_written_is_left_alone(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "grown"
    fsync_tree = io.fsync_tree

    def someone_makes_out(staging):
        fsync_tree(staging)
        out.mkdir()
        (out / "mine.txt").write_text("a user's file")

    monkeypatch.setattr(io, "fsync_tree", someone_makes_out)
    argv = ["grow", "--checkpoint", str(run[0]), "--out", str(out), "--qkv_tokens", "24", "--evaluate", "false"]
    assert "appeared while it was being written" in error_line(argv, capsys)
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and no_staging_left(tmp_path)


def test_staging_folders_of_a_killed_writer_are_removed_by_the_next_one(run, tmp_path, capsys):
    stale = tmp_path / ".grown.tmp-killed"
    (stale / "dcp").mkdir(parents=True)
    other = tmp_path / ".other.tmp-live"  # another output's: not ours to delete
    other.mkdir()
    main(
        [
            "grow",
            "--checkpoint",
            str(run[0]),
            "--out",
            str(tmp_path / "grown"),
            "--qkv_tokens",
            "24",
            "--evaluate",
            "false",
        ]
    )
    assert not stale.exists() and other.exists() and (tmp_path / "grown").is_dir()


# -- convert replaces a model whole ----------------------------------------------------------------

KILL_AFTER_WEIGHTS = """
import os, signal, sys
from pathlib import Path
import tokenformer.io as io

save_weights = io.save_weights

def save_then_die(state, path, metadata=None):
    save_weights(state, path, metadata)
    if Path(path).name == "model.safetensors":
        os.kill(os.getpid(), signal.SIGKILL)

io.save_weights = save_then_die
from tokenformer.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_convert_killed_while_overwriting_keeps_the_old_model_whole(tmp_path, capsys):
    dst = tmp_path / "dst"
    main(convert(released_file(tmp_path / "old.bin", seed=1), dst, "--tokenizer", str(tokenizer_file(tmp_path))))
    old = load_model(dst).state_dict()
    new = released_file(tmp_path / "new.bin", seed=2, ffn=48)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    argv = [sys.executable, "-c", KILL_AFTER_WEIGHTS, *convert(new, dst, "--overwrite", "true")]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    kept = load_model(dst).state_dict()
    assert kept.keys() == old.keys() and all(torch.equal(kept[k], old[k]) for k in old)
    assert (dst / "tokenizer.json").is_file()
    main(convert(new, dst, "--overwrite", "true"))  # and the next writer clears what the killed one left
    assert load_model(dst).config.ffn_tokens == 48 and no_staging_left(tmp_path)


def test_convert_overwrite_keeps_no_file_of_the_old_model(tmp_path):
    dst = tmp_path / "dst"
    main(convert(released_file(tmp_path / "old.bin", seed=1), dst, "--tokenizer", str(tokenizer_file(tmp_path))))
    assert (dst / "tokenizer.json").is_file() and (dst / "generation_config.json").is_file()
    main(convert(released_file(tmp_path / "new.bin", seed=2), dst, "--overwrite", "true"))
    names = {p.name for p in dst.iterdir()}
    assert not names & {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"}
    assert load_model(dst).config.ffn_tokens == 40


def test_convert_refuses_to_replace_a_folder_that_holds_no_model(tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    err = error_line(convert(released_file(tmp_path / "r.bin", seed=1), dst, "--overwrite", "true"), capsys)
    assert "holds files but no model (config.json); refusing to replace them" in err
    assert [p.name for p in dst.iterdir()] == ["notes.txt"]


def tokenizer_file(tmp_path: Path) -> Path:
    from conftest import word_level_tokenizer

    path = tmp_path / "tokenizer.json"
    word_level_tokenizer("a b c".split()).save(path)
    return path


# -- configs hold plain data -----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["flag", "config file"])
def test_a_config_value_naming_a_class_imports_nothing(run, tmp_path, monkeypatch, capsys, how):
    marker = tmp_path / "imported"
    module = f"planted_{how.replace(' ', '_')}"
    (tmp_path / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass Foo: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    overrides = f"{{d_model: {{class_path: {module}.Foo}}}}"
    options = {k: v for k, v in run[1].items() if k != "model_overrides"}
    if how == "flag":
        argv = ["train", *cli_flags({**options, "out_dir": str(tmp_path / "out")}), "--model_overrides", overrides]
    else:
        (tmp_path / "train.yaml").write_text(f"model_overrides: {overrides}\n")
        argv = [
            "train",
            "--config",
            str(tmp_path / "train.yaml"),
            *cli_flags({**options, "out_dir": str(tmp_path / "out")}),
        ]
    err = error_line(argv, capsys)
    assert "training option model_overrides=" in err and "allowed: plain data" in err
    assert not marker.exists() and module not in sys.modules and not (tmp_path / "out").exists()


# -- sizes read from a file are checked before memory is taken for them ----------------------------


def tamper(checkpoint: Path, name: str, change) -> None:
    """Change a JSON file of a checkpoint and recompute its manifest, as a tamperer would."""
    path = checkpoint / name
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    (checkpoint / "manifest.json").unlink()
    _write_manifest(checkpoint)


def copied_checkpoint(run, tmp_path: Path) -> Path:
    out = shutil.copytree(run[0], tmp_path / "run")
    return list_checkpoints(out)[-1]


def test_a_sharded_checkpoint_claiming_large_sizes_is_refused_before_allocating(run, tmp_path, monkeypatch, capsys):
    from tokenformer import families

    sharded = tmp_path / "sharded"
    main(["consolidate", "--checkpoint", str(run[0]), "--out", str(sharded)])
    tamper(sharded, "config.json", lambda c: c.update(d_model=2048, qkv_tokens=2048, ffn_tokens=8192))
    build_model, built = families.build_model, []
    monkeypatch.setattr(families, "build_model", lambda c: built.append(torch.get_default_device()) or build_model(c))
    for argv in (
        ["consolidate", "--checkpoint", str(sharded), "--out", str(tmp_path / "single")],
        ["train", *cli_flags({**run[1], "out_dir": str(tmp_path / "resumed"), "resume": str(sharded), "max_steps": 8})],
    ):
        err = error_line(argv, capsys)
        assert f"{sharded / 'dcp'} does not fit {sharded / 'config.json'}: tensor word_embeddings.weight" in err
    assert all(device.type == "meta" for device in built)


def test_weights_of_an_integer_dtype_are_refused_with_the_file_named(run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    checkpoint = copied_checkpoint(run, tmp_path)
    weights = checkpoint / "model.safetensors"
    save_file({k: v.long() for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    (checkpoint / "manifest.json").unlink()
    _write_manifest(checkpoint)
    err = error_line(["generate", "--model", str(checkpoint), "--max_new_tokens", "2"], capsys)
    assert f"{weights}: tensor word_embeddings.weight is torch.int64; allowed: a floating-point dtype" in err


def test_generation_takes_cache_memory_as_text_is_produced():
    from conftest import tiny_config

    from tokenformer import TokenformerLM

    model = TokenformerLM(tiny_config(max_seq_len=10**18)).eval()
    ids = torch.randint(0, 97, (1, 5))
    first = model(ids)[:, -1].argmax(-1)
    # Room for 10^16 tokens up front would be far beyond any memory; the first token ends it.
    out = model.generate(ids, max_new_tokens=10**16, temperature=0, eos_token_id=int(first))
    assert torch.equal(out, torch.cat([ids, first[:, None]], 1))


# -- values that cannot work are refused, in one line that names them -------------------------------


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("layernorm_eps", -1, "a finite number > 0"),
        ("rope_base", float("nan"), "a finite number > 0"),
        ("rope_base", "x", "a finite number > 0"),
        ("rotary_pct", "x", "a number in [0, 1]"),
        ("layernorm_eps", "abc", "a finite number > 0"),
        ("init_std", "x", "a finite number >= 0"),
        ("layer_tokens", [{"qkv": True, "proj": 16, "ffn": 32}] * 2, "a positive integer"),
    ],
)
def test_a_model_config_with_a_bad_value_is_refused_naming_the_file_and_field(
    run, tmp_path, capsys, field, value, allowed
):
    checkpoint = copied_checkpoint(run, tmp_path)
    tamper(checkpoint, "config.json", lambda c: c.update({field: value}))
    err = error_line(["generate", "--model", str(checkpoint), "--max_new_tokens", "2"], capsys)
    assert f"{checkpoint / 'config.json'}: config field {field}" in err and f"allowed: {allowed}" in err


@pytest.mark.parametrize(
    "change, field, allowed",
    [
        (lambda s: s.update(step=-5), "step=-5", "an integer >= 0"),
        (lambda s: s.update(tokens="many"), "tokens='many'", "an integer >= 0"),
        (lambda s: s.update(growth_history="abc"), "growth_history='abc'", "a list of records with an integer step"),
        (
            lambda s: s["optimizer"]["scalars"].update({"0": {"step": "x"}}),
            "optimizer.scalars.0.step='x'",
            "a finite number",
        ),
        (
            lambda s: s["optimizer"]["param_groups"][0].update(lr="x"),
            "optimizer.param_groups[0].lr='x'",
            "a finite number",
        ),
    ],
)
def test_a_trainer_state_with_a_bad_value_is_refused_naming_the_file_and_field(
    run, tmp_path, capsys, change, field, allowed
):
    checkpoint = copied_checkpoint(run, tmp_path)
    tamper(checkpoint, "trainer_state.json", change)
    options = {**run[1], "out_dir": str(tmp_path / "resumed"), "resume": str(checkpoint), "max_steps": 8}
    err = error_line(["train", *cli_flags(options)], capsys)
    assert f"checkpoint file {checkpoint / 'trainer_state.json'}: field {field} is invalid; allowed: {allowed}" in err
    assert not (tmp_path / "resumed").exists()


def test_bad_lines_of_the_metrics_file_are_skipped_with_a_warning_and_the_run_continues(run, tmp_path):
    out = shutil.copytree(run[0], tmp_path / "run")
    metrics = out / "metrics.jsonl"
    good = metrics.read_text().count("\n")
    with open(metrics, "ab") as f:
        f.write(b'{"step": "x", "kind": "train"}\n' + bytes(range(128, 256)) + b"\n")
    with pytest.warns(UserWarning) as warned:
        main(["train", *cli_flags({**run[1], "out_dir": str(out), "resume": "auto", "max_steps": 8})])
    messages = [str(w.message) for w in warned]
    for line in (good + 1, good + 2):
        assert any(m.startswith(f"{metrics} line {line} is not a metrics record; skipped") for m in messages)
    assert max(json.loads(line)["step"] for line in metrics.read_text().splitlines()) == 8


# -- Ctrl-C ----------------------------------------------------------------------------------------


def test_ctrl_c_during_training_saves_the_step_and_says_how_to_resume(run, tmp_path, monkeypatch, capsys):
    from tokenformer.train import Trainer

    train_step = Trainer._train_step

    def step_then_ctrl_c(self):
        result = train_step(self)
        if self.state.step == 6:
            os.kill(os.getpid(), signal.SIGINT)  # as the terminal sends on Ctrl-C
        return result

    monkeypatch.setattr(Trainer, "_train_step", step_then_ctrl_c)
    out = tmp_path / "run"
    options = {**run[1], "out_dir": str(out), "max_steps": 12}
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as exit:
            main(["train", *cli_flags(options)])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped as a KeyboardInterrupt")
    saved = out / "checkpoints" / "step-00000006"
    assert exit.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "stopping after this step to save a checkpoint (Ctrl-C again: stop at once)",  # at once, on Ctrl-C
        f"tokenformer train: interrupted at step 6, saved in {saved}; "
        f"resume with: tokenformer train --config {out / 'train_config.yaml'} --resume auto",
    ]
    assert [p.name for p in list_checkpoints(out)] == ["step-00000004", "step-00000006"]
    monkeypatch.setattr(Trainer, "_train_step", train_step)
    main(["train", "--config", str(out / "train_config.yaml"), "--resume", "auto"])
    assert list_checkpoints(out)[-1].name == "step-00000012"


def test_a_prompt_that_is_not_utf8_is_refused_naming_the_option(run, capsys):
    err = error_line(["generate", "--model", str(run[0]), "--prompt", "caf\udce9"], capsys)  # b"caf\xe9" from a shell
    assert "option --prompt='caf\\udce9' is invalid; allowed: UTF-8 text" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--batch_size", "0"], "option --batch_size=0 is invalid; allowed: a positive integer"),
        (["eval", "--max_windows", "-3"], "option --max_windows=-3 is invalid; allowed: a positive integer or null"),
        (["eval", "--seq_len", "0"], "option --seq_len=0 is invalid; allowed: a positive integer or null"),
        (["generate", "--seed", str(10**23)], "option --seed=100000000000000000000000 is invalid; allowed: an integer"),
    ],
)
def test_bad_options_of_eval_and_generate_are_named(run, capsys, argv, message):
    assert message in error_line([*argv, "--model", str(run[0])], capsys)


def test_an_empty_out_dir_is_refused_not_the_working_directory(run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = error_line(["train", *cli_flags({**run[1], "out_dir": ""})], capsys)
    assert "training option out_dir='' is invalid; allowed: a directory (not empty)" in err
    assert list(tmp_path.iterdir()) == []


def test_a_full_cache_disk_names_the_file(run, tmp_path, monkeypatch, capsys):
    import errno

    from tokenformer.data import shards

    class Full:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.file, name)

    def full_disk_open(path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)
        return Full(file) if str(path).endswith(".bin") and mode != "rb" else file

    monkeypatch.setattr(shards, "open", full_disk_open, raising=False)
    (tmp_path / "new.txt").write_text("In the beginning was a new corpus. " * 400)
    cache = tmp_path / "cache"
    options = {**run[1], "out_dir": str(tmp_path / "run"), "init_from": str(run[0]), "data": str(tmp_path / "new.txt")}
    err = error_line(["train", *cli_flags({**options, "cache_dir": str(cache)})], capsys)
    assert (
        f"cannot write {cache / 'shards'}/" in err and ".bin: No space left on device; the file system is full" in err
    )


def test_harness_on_a_model_whose_config_leaves_out_max_seq_len(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval", reason="the [eval] extra (lm-evaluation-harness) is not installed")
    import lm_eval
    import lm_eval.models.huggingface
    import lm_eval.tasks
    from conftest import tiny_config, word_level_tokenizer

    from tokenformer import TokenformerLM, save_model

    model = save_model(TokenformerLM(tiny_config()), tmp_path / "m", word_level_tokenizer("a b".split()))
    config = json.loads((model / "config.json").read_text())
    del config["max_seq_len"]
    (model / "config.json").write_text(json.dumps(config))
    seen = {}
    monkeypatch.setattr(lm_eval.models.huggingface, "HFLM", lambda **kw: seen.update(kw))
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda **kw: None)
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kw: {"results": {}})
    monkeypatch.setattr("tokenformer.interop.harness.table", lambda results: "table")
    main(["eval", "--model", str(model), "--harness", "true", "--tasks", "piqa", "--device", "cpu"])
    assert seen["pretrained"] == str(model) and capsys.readouterr().out.strip() == "table"


# -- grow and prune read the corpus only where they use it ------------------------------------------


def test_grow_and_prune_need_no_corpus_unless_they_use_it_and_cache_where_told(run, corpus_file, tmp_path, monkeypatch):
    checkpoint = copied_checkpoint(run, tmp_path)
    tamper(checkpoint, "trainer_state.json", lambda s: s["train_config"].update(data=str(tmp_path / "moved.txt")))
    monkeypatch.setenv("TOKENFORMER_CACHE", str(tmp_path / "cache"))
    main(
        [
            "grow",
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(tmp_path / "a"),
            "--qkv_tokens",
            "24",
            "--evaluate",
            "false",
        ]
    )
    prune = ["prune", "--checkpoint", str(checkpoint), "--qkv_tokens", "8", "--evaluate", "false"]
    main([*prune, "--out", str(tmp_path / "b"), "--calibration_batches", "0"])
    assert not (tmp_path / "cache").exists()  # nothing read, nothing cached
    main([*prune, "--out", str(tmp_path / "c"), "--data", str(corpus_file)])  # calibrated on the corpus given
    assert list((tmp_path / "cache" / "shards").iterdir())  # in $TOKENFORMER_CACHE, not the run's cache_dir
    assert all((tmp_path / name / "manifest.json").is_file() for name in "abc")


# -- reading a run that is training ------------------------------------------------------------------


def test_a_run_that_is_training_keeps_the_checkpoint_a_reader_picked(run, tmp_path, monkeypatch, capsys):
    from tokenformer import families
    from tokenformer.train.checkpoint import prune_checkpoints

    out = shutil.copytree(run[0], tmp_path / "run")
    picked = list_checkpoints(out)[-1]
    read_model_config = families.read_model_config

    def the_run_saves_and_prunes_meanwhile(directory):
        newer = out / "checkpoints" / "step-00000008"
        if not newer.exists():
            shutil.copytree(picked, newer)
            prune_checkpoints(out, keep_last=1, keep=newer)  # what the trainer does after each save
        return read_model_config(directory)

    monkeypatch.setattr(families, "read_model_config", the_run_saves_and_prunes_meanwhile)
    main(["generate", "--model", str(out), "--max_new_tokens", "3"])
    assert picked.is_dir()  # kept while it was read ...
    monkeypatch.undo()
    prune_checkpoints(out, keep_last=1, keep=out / "checkpoints" / "step-00000008")
    assert [p.name for p in list_checkpoints(out)] == ["step-00000008"]  # ... and pruned at the next save
