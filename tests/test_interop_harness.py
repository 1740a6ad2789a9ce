import json
import math
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")
pytest.importorskip("lm_eval", reason="the [eval] extra (lm-evaluation-harness) is not installed")

from conftest import tiny_config  # noqa: E402

from tokenformer import TokenformerLM  # noqa: E402
from tokenformer.families import load_model, save_model  # noqa: E402
from tokenformer.interop.harness import evaluate  # noqa: E402
from tokenformer.interop.tokenizer import save_tokenizer  # noqa: E402

DATA = Path(__file__).parent / "data" / "harness"
EOS = "<|endoftext|>"
# A byte-level tokenizer without merges: one token per byte, id 0 the end of text.
VOCAB = 257


def task(name: str, **fields) -> dict:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(DATA / f"{name}.jsonl")}},
        "test_split": "test",
        **fields,
    }


ROLLING = task(
    "rolling",
    output_type="loglikelihood_rolling",
    doc_to_text="",
    doc_to_target="{{text}}",
    metric_list=[{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}],
)
CHOICE = task(
    "choice",
    output_type="multiple_choice",
    doc_to_text="{{question}}",
    doc_to_choice="{{choices}}",
    doc_to_target="{{gold}}",
    metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}],
)


def byte_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={EOS: 0, **{c: i + 1 for i, c in enumerate(alphabet)}}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOS])
    backend.save(str(path))
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A random tiny model and a uniform one (zero final norm: every logit is 0), each with the
    tokenizer files, and the bare tokenizer.json."""
    root = tmp_path_factory.mktemp("harness")
    tokenizer = byte_tokenizer(root / "tokenizer.json")
    torch.manual_seed(0)
    dirs = {}
    for name in ("random", "uniform"):
        model = TokenformerLM(tiny_config(vocab_size=VOCAB))
        if name == "uniform":
            torch.nn.init.zeros_(model.final_norm.weight)
            torch.nn.init.zeros_(model.final_norm.bias)
        save_tokenizer(tokenizer, root / name, model.config.max_seq_len)
        dirs[name] = save_model(model, root / name)
    dirs["tokenizer"] = tokenizer
    return dirs


def metrics(results: dict) -> list[float]:
    scores = [results["rolling"][f"{m},none"] for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]
    return scores + [results["choice"][f"{m},none"] for m in ("acc", "acc_norm")]


def test_random_model_gets_finite_metrics_at_any_batch_size(model_dirs):
    # lm-eval pads batches on the right and passes no mask: causal attention keeps real tokens exact.
    one = metrics(evaluate(model_dirs["random"], [ROLLING, CHOICE], batch_size=1, bootstrap_iters=0)["results"])
    four = metrics(evaluate(model_dirs["random"], [ROLLING, CHOICE], batch_size=4, bootstrap_iters=0)["results"])
    assert all(math.isfinite(m) for m in one), one
    assert 1 < one[0] and 0 <= one[3] <= 1
    assert four == pytest.approx(one, rel=1e-5)


def test_uniform_model_scores_chance(model_dirs):
    # Evaluated as a TokenformerLM object with a bare tokenizer.json (the directory case is above).
    model = load_model(model_dirs["uniform"])
    results = evaluate(model, [ROLLING, CHOICE], tokenizer=model_dirs["tokenizer"], bootstrap_iters=0)["results"]
    # Every token costs log(VOCAB) nats: perplexities follow from token, word and byte counts.
    texts = [json.loads(line)["text"] for line in (DATA / "rolling.jsonl").read_text().splitlines()]
    tokens = sum(len(t.encode()) for t in texts)  # one token per byte
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    nats = tokens * math.log(VOCAB)
    rolling = results["rolling"]
    assert rolling["word_perplexity,none"] == pytest.approx(math.exp(nats / words), rel=1e-6)
    assert rolling["byte_perplexity,none"] == pytest.approx(VOCAB, rel=1e-6)
    assert rolling["bits_per_byte,none"] == pytest.approx(math.log2(VOCAB), rel=1e-6)
    # Four one-letter choices tie; the tie goes to the first, the gold answer of a quarter of the docs.
    assert results["choice"]["acc,none"] == results["choice"]["acc_norm,none"] == 0.25


def test_evaluate_errors(model_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        evaluate(tmp_path, ["piqa"])
    with pytest.raises(ValueError, match="tasks must be a non-empty list"):
        evaluate(model_dirs["random"], "piqa")
    save_model(TokenformerLM(tiny_config()), tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in .*pass tokenizer="):
        evaluate(tmp_path / "bare", ["piqa"])
