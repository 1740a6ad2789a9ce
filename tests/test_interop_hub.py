"""Model directories as Hugging Face hub folders: they load, generate and evaluate with
``trust_remote_code=True`` in a Python where tokenformer cannot be imported."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")

from conftest import tiny_config, tiny_train_options  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from transformers.dynamic_module_utils import get_imports, get_relative_import_files  # noqa: E402

from tokenformer import TokenformerLM, TokenformerViT, VisionConfig, grow, save_model, to_hf  # noqa: E402
from tokenformer.interop import hub  # noqa: E402
from tokenformer.modeling_tokenformer import auto_map  # noqa: E402
from tokenformer.train import TrainConfig, Trainer, list_checkpoints  # noqa: E402

DATA = Path(__file__).parent / "data" / "harness"
EOS = "<|endoftext|>"

# Run first in the subprocesses below: from here on, `import tokenformer` fails as it would where
# tokenformer is not installed (the interpreter runs isolated, -I, so PYTHONPATH is ignored too).
BLOCK_TOKENFORMER = textwrap.dedent(
    """
    import sys

    class NoTokenformer:
        def find_spec(self, name, path=None, target=None):
            if name == "tokenformer" or name.startswith("tokenformer."):
                raise ModuleNotFoundError(f"No module named {name!r}")

    sys.meta_path.insert(0, NoTokenformer())
    try:
        import tokenformer
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("tokenformer is importable")
    """
)


def run_without_tokenformer(code: str, tmp_path: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_MODULES_CACHE": str(tmp_path / "hf-modules"),  # where transformers copies the folders' code
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    result = subprocess.run(
        [sys.executable, "-I", "-c", BLOCK_TOKENFORMER + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, corpus_file, cache_dir) -> Path:
    """The last checkpoint of a short training run (a byte-level BPE of 512 ids)."""
    out = tmp_path_factory.mktemp("hub") / "run"
    options = tiny_train_options(corpus_file, cache_dir, out, max_steps=4, ckpt_interval=4, eval_interval=4)
    trainer = Trainer(TrainConfig(**options))
    trainer.fit()
    trainer.close()
    return list_checkpoints(out)[-1]


def grown_model(**overrides) -> TokenformerLM:
    """Grown in one layer only: per-layer token counts and a tau that is not sqrt(n)."""
    model = TokenformerLM(tiny_config(**overrides))
    grow(model, qkv_tokens=30, ffn_tokens=48, layers=[1])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def test_save_model_writes_what_save_pretrained_writes(tmp_path):
    model = grown_model()
    save_model(model, tmp_path / "ours")
    to_hf(model).save_pretrained(tmp_path / "hf")
    code = {path.name for path in hub.code_files()}
    for folder in ("ours", "hf"):
        assert {p.name for p in (tmp_path / folder).glob("*.py")} == code
        assert json.loads((tmp_path / folder / "config.json").read_text())["auto_map"] == hub.AUTO_MAP
    # transformers' own view of the code the classes need is the one the folders hold.
    entry = hub.PACKAGE / "modeling_tokenformer.py"
    assert {Path(f).name for f in get_relative_import_files(entry)} | {entry.name} <= code
    assert auto_map() == hub.AUTO_MAP
    for path in hub.code_files():
        assert (tmp_path / "ours" / path.name).read_text() == path.read_text()
        # transformers refuses a folder whose code imports a package that is missing: torch and
        # transformers, and what they depend on, only; peft, for LoRA, is imported where it is
        # used, inside try/except, which transformers' check skips.
        needed = set(get_imports(path)) - set(sys.stdlib_module_names)
        assert needed <= {"torch", "typing_extensions", "transformers", "safetensors"}, path.name


def test_tokenizer_files_generation_config_and_card(checkpoint):
    tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == json.loads((checkpoint / "config.json").read_text())["max_seq_len"]
    special = json.loads((checkpoint / "special_tokens_map.json").read_text())
    assert special == {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert tokenizer.eos_token == EOS and tokenizer.pad_token == EOS
    assert tokenizer.model_max_length == tokenizer_config["model_max_length"]
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id == 0
    card = (checkpoint / "README.md").read_text()
    assert "trust_remote_code=True" in card and "lm_eval --model hf" in card


def test_vision_directories_hold_no_tokenizer(tmp_path):
    model = TokenformerViT(VisionConfig.from_preset("fmnist-0.3M"))
    with pytest.raises(ValueError, match="a vision model directory holds no tokenizer; allowed: tokenizer=None"):
        save_model(model, tmp_path / "vit", tokenizer=DATA)
    save_model(model, tmp_path / "vit")
    assert not list((tmp_path / "vit").glob("*.py"))


@pytest.mark.slow
def test_folders_load_generate_and_stop_at_eos_without_tokenformer(checkpoint, tmp_path):
    from tokenformer import load_model

    folders = {"checkpoint": checkpoint}
    models = {"grown": grown_model(), "tau": grown_model(tau_scale={"ffn": 0.5}, fixed_tau={"qkv": 3.0})}
    models["linear"] = TokenformerLM(tiny_config(projection="linear")).eval()
    memory = dict(memory_layers=[1], memory_sub_keys=4, memory_top_k=3, memory_heads=2, memory_query_norm="batch")
    models["memory"] = TokenformerLM(tiny_config(**memory)).eval()
    for name, model in models.items():
        folders[name] = save_model(model, tmp_path / name)
    threads = torch.get_num_threads()
    expected = {}
    for name, folder in folders.items():
        model = load_model(folder).eval()
        ids = torch.randint(0, model.config.vocab_size, (2, 11))
        with torch.no_grad():
            expected[name] = {"ids": ids, "logits": model(ids), "hidden": model.hidden_states(ids)[-1]}
    torch.save({"folders": {k: str(v) for k, v in folders.items()}, "expected": expected}, tmp_path / "expected.pt")
    code = f"""
    import json
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads({threads})
    saved = torch.load({str(tmp_path / "expected.pt")!r})
    report = {{}}
    for name, folder in saved["folders"].items():
        expected = saved["expected"][name]
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            report[name] = {{
                "module": type(model).__module__,
                "logits": torch.equal(model(expected["ids"]).logits, expected["logits"]),
                "hidden": torch.equal(base(expected["ids"]).last_hidden_state, expected["hidden"]),
            }}

    folder = saved["folders"]["checkpoint"]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    prompt = tokenizer("In the beginning God created", return_tensors="pt").input_ids
    free = model.generate(prompt, max_new_tokens=8, do_sample=False)[0, prompt.shape[1]:].tolist()
    # The end-of-text embedding becomes twice the third token's: greedy decoding now picks it at
    # the third step at the latest, and generation must stop there.
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding[tokenizer.eos_token_id] = 2 * embedding[free[2]]
    stopped = model.generate(prompt, max_new_tokens=8, do_sample=False)[0, prompt.shape[1]:].tolist()
    report["generation"] = {{
        "eos": tokenizer.eos_token, "eos_id": tokenizer.eos_token_id,
        "config_eos_id": model.generation_config.eos_token_id, "free": free, "stopped": stopped,
    }}
    print(json.dumps(report))
    """
    report = json.loads(run_without_tokenformer(code, tmp_path).stdout.strip().splitlines()[-1])
    for name in folders:
        assert report[name]["module"].startswith("transformers_modules."), report[name]
        assert report[name]["logits"] and report[name]["hidden"], (name, report[name])
    generation = report["generation"]
    assert generation["eos"] == EOS and generation["eos_id"] == generation["config_eos_id"] == 0
    stopped, free = generation["stopped"], generation["free"]
    assert len(free) == 8 and 1 <= len(stopped) <= 3
    assert stopped == free[: len(stopped) - 1] + [0]


@pytest.mark.slow
def test_plain_lm_eval_command_evaluates_a_checkpoint(checkpoint, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    common = {
        "dataset_path": "json",
        "test_split": "test",
    }
    configs = {
        "hub_rolling": {
            "dataset_kwargs": {"data_files": {"test": str(DATA / "rolling.jsonl")}},
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}],
        },
        "hub_choice": {
            "dataset_kwargs": {"data_files": {"test": str(DATA / "choice.jsonl")}},
            "output_type": "multiple_choice",
            "doc_to_text": "{{question}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{gold}}",
            "metric_list": [{"metric": "acc"}],
        },
        # Prompts of different lengths in one batch: left-padded generation, up to EOS or a newline.
        "hub_generate": {
            "dataset_kwargs": {"data_files": {"test": str(DATA / "choice.jsonl")}},
            "output_type": "generate_until",
            "doc_to_text": "{{question}}",
            "doc_to_target": "{{choices[gold]}}",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
            "metric_list": [{"metric": "exact_match"}],
        },
    }
    for name, config in configs.items():
        (tasks / f"{name}.yaml").write_text(json.dumps({"task": name, **common, **config}))
    output = tmp_path / "results"
    argv = [
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={checkpoint},trust_remote_code=True",
        "--tasks",
        ",".join(configs),
        "--include_path",
        str(tasks),
        "--device",
        "cpu",
        "--batch_size",
        "3",
        "--output_path",
        str(output),
    ]
    code = f"""
    import sys
    from lm_eval.__main__ import cli_evaluate  # the `lm_eval` command

    sys.argv = {argv!r}
    cli_evaluate()
    """
    run_without_tokenformer(code, tmp_path)
    (found,) = output.rglob("results_*.json")
    results = json.loads(found.read_text())["results"]
    rolling = results["hub_rolling"]
    assert math.isfinite(rolling["word_perplexity,none"]) and rolling["bits_per_byte,none"] > 0
    assert 0 <= results["hub_choice"]["acc,none"] <= 1
    assert 0 <= results["hub_generate"]["exact_match,none"] <= 1


@pytest.mark.slow
def test_an_exported_folder_fine_tunes_and_serves_without_tokenformer(checkpoint, tmp_path):
    """What a transformers user does with a folder: LoRA by target_modules (embeddings and
    modules_to_save too), the cache contract, a static cache, export and fullgraph compile with a
    mask, resize_token_embeddings and int8, all through the folder's own code."""
    pytest.importorskip("peft", reason="peft is not installed (the test extra brings it)")
    from tokenformer.cli import main

    folder = tmp_path / "hub"
    main(["export", str(checkpoint), str(folder)])
    assert not {"optimizer.safetensors", "trainer_state.json", "manifest.json"} & {p.name for p in folder.iterdir()}
    code = f"""
    import json, warnings
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.cache_utils import StaticCache

    torch.manual_seed(0)
    folder = {str(folder)!r}
    load = lambda: AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    model = load().eval()
    report = {{"module": type(model).__module__, "use_cache": model.config.use_cache}}
    ids = torch.randint(1, 200, (2, 12))
    full = model(ids, use_cache=False).logits
    first = model(ids[:, :8])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rest = model(ids[:, 8:], past_key_values=first.cache).logits
    report["past_key_values"] = torch.allclose(rest, full[:, 8:], atol=1e-5)
    cache = model(ids[:, :8]).cache
    legacy = tuple((layer.keys, layer.values) for layer in cache.layers)
    report["legacy"] = torch.allclose(model(ids[:, 8:], cache=legacy).logits, full[:, 8:], atol=1e-5)

    mask = torch.ones_like(ids[:, :6])
    mask[0, :2] = 0
    options = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    report["static"] = torch.equal(
        model.generate(ids[:, :6], cache_implementation="static", **options), model.generate(ids[:, :6], **options)
    )

    seq = torch.export.Dim("seq", min=2, max=64)
    exported = torch.export.export(
        model, (ids,), {{"attention_mask": mask.new_ones(ids.shape), "use_cache": False}},
        dynamic_shapes={{"input_ids": {{1: seq}}, "attention_mask": {{1: seq}}, "use_cache": None}},
    ).module()
    padded = torch.ones_like(ids[:, :9])
    padded[1, :4] = 0
    expected = model(ids[:, :9], attention_mask=padded, use_cache=False).logits
    out = exported(ids[:, :9], attention_mask=padded, use_cache=False).logits
    report["export"] = float((out - expected).abs().max())
    forward = lambda i, m: model(i, attention_mask=m, use_cache=False).logits
    step = torch.compile(forward, fullgraph=True, backend="eager")
    report["compile"] = float((step(ids[:, :9], padded) - expected).abs().max())

    base = model(ids).logits
    config = LoraConfig(r=4, target_modules=["query", "key", "value", "proj", "mlp", "word_embeddings"],
                        modules_to_save=["final_norm"])
    tuned = get_peft_model(model.train(), model.prepare_lora_config(config))
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        tuned(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapted = tuned.eval()(input_ids=ids).logits
    merged = tuned.merge_and_unload()
    report["lora"] = {{
        "moved": float((adapted - base).abs().max()),
        "merged": torch.allclose(merged(ids).logits, adapted, atol=1e-5),
        "merged_type": type(merged.layers[0].attention.query).__name__,
    }}

    model = load().eval()
    model.resize_token_embeddings(model.config.vocab_size + 10)
    report["resized"] = list(model(torch.tensor([[model.config.vocab_size - 1]])).logits.shape)
    model.save_pretrained({str(tmp_path / "resaved")!r})

    model = load().eval()
    expected = model(ids).logits
    quantized = model.quantize_int8()(ids).logits
    report["int8"] = float((quantized - expected).norm() / expected.norm())
    print(json.dumps(report))
    """
    report = json.loads(run_without_tokenformer(code, tmp_path).stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules.") and report["use_cache"] is True
    assert report["past_key_values"] and report["legacy"] and report["static"]
    assert report["export"] < 1e-4 and report["compile"] < 1e-4, report
    lora = report["lora"]
    assert lora["moved"] > 1e-3 and lora["merged"] and lora["merged_type"] == "Pattention"
    assert report["resized"] == [1, 1, 522]
    assert (tmp_path / "resaved" / "README.md").is_file()
    assert report["int8"] < 0.05
