"""No pickled code in a checkpoint ever runs: a payload planted in any file a checkpoint (single-file
or sharded) can hold, its manifest recomputed so that verification passes, is refused by every
command and function that reads checkpoints, with a one-line error where it is read."""

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cli_flags, tiny_train_options

from tokenformer import load_model
from tokenformer.cli import main
from tokenformer.train import list_checkpoints, load_checkpoint
from tokenformer.train.checkpoint import _write_manifest, load_sharded_state

pytestmark = pytest.mark.usefixtures("one_thread")

try:
    import transformers  # noqa: F401

    HAS_TRANSFORMERS = True
except ImportError:  # the optional [hf] extra
    HAS_TRANSFORMERS = False

SINGLE_FILE = (
    "config.json",
    "model.safetensors",
    "optimizer.safetensors",
    "ema.safetensors",
    "tokenizer.json",
    "trainer_state.json",
    "manifest.json",
)
SHARDED = (
    "config.json",
    "tokenizer.json",
    "trainer_state.json",
    "rng.safetensors",
    "dcp/.metadata",
    "dcp/__0_0.distcp",
    "dcp/byte-item",  # DCP metadata pointing a non-tensor value (an optimizer hyperparameter) at a payload
    "dcp/tensor-item",  # ... and a tensor at a payload
    "manifest.json",
)


class Payload:
    """Unpickling this writes ``marker``: the proof that pickled code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pickled code ran')",)


def payload_bytes(kind: str, marker: Path) -> bytes:
    if kind == "pickle":
        return pickle.dumps(Payload(marker))
    buffer = __import__("io").BytesIO()
    torch.save(Payload(marker), buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus_file, cache_dir):
    """A run with a single-file checkpoint (moving average included) and one with its sharded twin."""
    root = tmp_path_factory.mktemp("planted")
    options = tiny_train_options(
        corpus_file, cache_dir, root / "single", max_steps=4, eval_interval=4, ckpt_interval=4, ema_decay=0.9
    )
    main(["train", *cli_flags(options)])
    checkpoint = list_checkpoints(root / "single")[-1]
    main(
        [
            "consolidate",
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(root / "sharded" / "checkpoints" / checkpoint.name),
        ]
    )
    return root, options


def plant(checkpoint: Path, name: str, kind: str, marker: Path) -> None:
    payload = payload_bytes(kind, marker)
    if name in ("dcp/byte-item", "dcp/tensor-item"):
        redirect_dcp_item(checkpoint / "dcp", name == "dcp/byte-item", payload)
    else:
        (checkpoint / name).write_bytes(payload)
    if name != "manifest.json":
        recompute_manifest(checkpoint)


def recompute_manifest(checkpoint: Path) -> None:
    """As a tamperer would, so that verification passes."""
    (checkpoint / "manifest.json").unlink()
    _write_manifest(checkpoint)


def redirect_dcp_item(shards: Path, bytes_item: bool, payload: bytes) -> None:
    """Point one item of DCP's metadata at a payload file (the metadata itself stays legitimate)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = pickle.loads((shards / ".metadata").read_bytes())
    fqn = next(k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata) == bytes_item)
    (shards / "evil.distcp").write_bytes(payload)
    for index, info in metadata.storage_data.items():
        if index.fqn == fqn:
            info.relative_path, info.offset, info.length = "evil.distcp", 0, len(payload)
    (shards / ".metadata").write_bytes(pickle.dumps(metadata))


def run_command(argv: list[str], capsys) -> str | None:
    """None when the command succeeded, else its stderr, which must be one error line."""
    try:
        main(argv)
    except SystemExit as exit:
        err = capsys.readouterr().err.strip()
        assert exit.code == 1, err
        assert len(err.splitlines()) == 1 and err.startswith(f"tokenformer {argv[0]}: error: "), err
        return err
    capsys.readouterr()
    return None


def python_loaders(checkpoint: Path) -> dict:
    def hf():
        import transformers

        import tokenformer.interop  # noqa: F401  (registers the model type with transformers)

        return transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint))

    def checkpoint_and_shards():
        from tokenformer.train import TrainConfig
        from tokenformer.train.trainer import make_optimizer

        loaded = load_checkpoint(checkpoint)
        if loaded.sharded:
            optimizer = make_optimizer(loaded.model, TrainConfig.from_dict(loaded.trainer_state["train_config"]))
            load_sharded_state(checkpoint, loaded.model, optimizer)

    loaders = {"load_model": lambda: load_model(checkpoint), "load_checkpoint": checkpoint_and_shards}
    if HAS_TRANSFORMERS:
        loaders["from_pretrained"] = hf
    return loaders


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
@pytest.mark.parametrize("layout, name", [("single", n) for n in SINGLE_FILE] + [("sharded", n) for n in SHARDED])
def test_a_planted_payload_never_runs(runs, tmp_path, capsys, layout, name, kind):
    root, options = runs
    run = shutil.copytree(root / layout, tmp_path / "run")
    checkpoint = list_checkpoints(run)[-1]
    marker = tmp_path / "marker"
    plant(checkpoint, name, kind, marker)
    errors = {}
    for function, load in python_loaders(checkpoint).items():
        try:
            load()
            errors[function] = None
        except Exception as exc:  # each loader has its own errors; what matters is that nothing ran
            errors[function] = exc
        assert not marker.exists(), f"{function} ran pickled code planted in {name}"
    capsys.readouterr()
    argvs = {
        "generate": ["generate", "--model", str(run), "--max_new_tokens", "2", "--device", "cpu"],
        "eval": ["eval", "--model", str(checkpoint), "--max_windows", "2", "--device", "cpu"],
        "consolidate": ["consolidate", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "consolidated")],
        "grow": ["grow", "--checkpoint", str(run), "--out", str(tmp_path / "grown"), "--ffn_tokens", "48"],
        # last: it writes into the run directory
        "train": ["train", *cli_flags({**options, "out_dir": str(run), "resume": "auto", "max_steps": 6})],
    }
    for command, argv in argvs.items():
        errors[command] = run_command(argv, capsys)
        assert not marker.exists(), f"{command} ran pickled code planted in {name}"
    if name == "manifest.json":
        # The checkpoint no longer verifies: commands refuse it, training starts afresh beside it.
        assert f"checkpoint file {checkpoint / name} is corrupted" in errors["consolidate"]
        assert f"run directory {run} has no complete checkpoint" in errors["generate"]
        assert errors["train"] is None and (run / "checkpoints" / f"{checkpoint.name}.corrupt").is_dir()
    else:
        # Whatever reads every file refuses the checkpoint, naming it.
        assert errors["load_checkpoint"] is not None
        for command in ("consolidate", "grow", "train"):
            assert errors[command] is not None and str(checkpoint) in errors[command], (command, errors[command])


def test_the_payload_is_live(tmp_path):
    """The planted bytes do run code when unpickled without an allow-list: the test above means something."""
    marker = tmp_path / "marker"
    pickle.loads(payload_bytes("pickle", marker))
    assert marker.exists()
    marker.unlink()
    torch.load(__import__("io").BytesIO(payload_bytes("torch.save", marker)), weights_only=False)
    assert marker.exists()


def test_released_weights_with_a_payload_are_refused(tmp_path, capsys):
    for kind in ("pickle", "torch.save"):
        marker = tmp_path / f"marker-{kind}"
        source = tmp_path / kind
        source.mkdir()
        (source / "pytorch_model.bin").write_bytes(payload_bytes(kind, marker))
        err = run_command(["convert", "--src", str(source), "--dst", str(tmp_path / f"out-{kind}")], capsys)
        assert not marker.exists()
        assert "weights_only=True refuses anything else" in err and str(source / "pytorch_model.bin") in err


def test_dcp_metadata_is_read_with_an_allow_list(runs, tmp_path):
    """DCP's own reader would unpickle anything; ours reads the legitimate metadata and nothing else."""
    from tokenformer.train.checkpoint import CheckpointError

    checkpoint = shutil.copytree(list_checkpoints(runs[0] / "sharded")[-1], tmp_path / "ckpt")
    load_checkpoint(checkpoint)  # the untouched metadata loads
    metadata = pickle.loads((checkpoint / "dcp" / ".metadata").read_bytes())
    metadata.planner_data = {"x": Payload(tmp_path / "marker")}  # a payload inside legitimate metadata
    (checkpoint / "dcp" / ".metadata").write_bytes(pickle.dumps(metadata))
    recompute_manifest(checkpoint)
    with pytest.raises(CheckpointError, match=r"names builtins\.exec, which DCP metadata never holds"):
        python_loaders(checkpoint)["load_checkpoint"]()
    assert not (tmp_path / "marker").exists()
    assert json.loads((checkpoint / "manifest.json").read_text())["files"]["dcp/.metadata"]
