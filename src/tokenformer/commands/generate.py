"""``tokenformer generate``: sample from a trained model; loading a model for inference."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def generate(
    model: str,
    prompt: str = "",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    seed: int = 0,
    tokenizer: str | None = None,
    device: str = "auto",
) -> str:
    """Continue a prompt with a trained model (KV-cached sampling) and print the text.

    Args:
        model: A checkpoint, a run directory (newest checkpoint) or a model directory (config.json + model.safetensors).
        prompt: Text to continue; empty starts from the end-of-text token.
        max_new_tokens: Tokens to generate.
        temperature: Sampling temperature; 0 is greedy.
        top_k: Sample among the k most likely tokens (null: all).
        top_p: Nucleus sampling mass (null: off).
        seed: Seed of the sampler.
        tokenizer: A tokenizer.json (default: the one saved with the model).
        device: ``auto``, ``cpu``, ``cuda``, ...
    """
    import torch

    from ..train.trainer import resolve_device
    from ..validation import check_option, is_int, is_text

    check_option("prompt", prompt, is_text, "UTF-8 text")
    check_option("max_new_tokens", max_new_tokens, lambda v: is_int(v) and v >= 0, "an integer >= 0")
    check_option("seed", seed, lambda v: is_int(v) and 0 <= v < 2**64, "an integer from 0 to 2**64 - 1")
    target = resolve_device(device)
    net, tok, _ = load_for_inference(model, tokenizer, target)
    ids = tok.encode(prompt) if prompt else ([tok.eos_id] if tok.eos_id is not None else [])
    if not ids:
        raise ValueError("the prompt is empty and the tokenizer has no end-of-text token to start from; pass --prompt")
    generator = torch.Generator(device=target).manual_seed(seed)
    out = net.generate(
        torch.tensor([ids], device=target),
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
    )
    text = tok.decode(out[0, len(ids) :].tolist())
    print(prompt + text)
    return prompt + text


def model_directory(path: str) -> Path:
    """The folder with config.json + model.safetensors: a model directory as given, a training
    checkpoint (verified against its manifest) or a run directory's newest complete checkpoint;
    of a language model (the commands that take one generate text or score it)."""
    from ..families import family_of, read_model_config
    from ..train.checkpoint import CHECKPOINTS, MANIFEST, is_sharded, resolve_checkpoint, verify_checkpoint

    directory = Path(path).expanduser()
    if (directory / MANIFEST).is_file() or (directory / CHECKPOINTS).is_dir():
        directory = resolve_checkpoint(directory)
        verify_checkpoint(directory)
        if is_sharded(directory):
            raise ValueError(
                f"{directory} is a sharded checkpoint; write it whole first: "
                f"tokenformer consolidate --checkpoint {directory} --out DIR"
            )
    entry = family_of(read_model_config(directory))
    if entry.name != "lm":
        raise ValueError(
            f"{directory} holds a {entry.name} model ({entry.model_type}); this command takes a language model"
        )
    return directory


def load_for_inference(path: str, tokenizer: str | None, device) -> tuple[Any, Any, dict | None]:
    """Model, tokenizer and (for a training checkpoint) its training config, from a directory."""
    from ..data import load_tokenizer
    from ..families import load_model
    from ..train.checkpoint import MANIFEST, read_train_config, reading

    with reading(path):  # a run that is training keeps the checkpoint picked until it is read
        directory = model_directory(path)
        saved = read_train_config(directory) if (directory / MANIFEST).is_file() else None
        net = load_model(directory, device)
        tokenizer_path = Path(tokenizer) if tokenizer else directory / "tokenizer.json"
        if not tokenizer_path.exists():
            raise FileNotFoundError(f"{directory} has no tokenizer.json; pass --tokenizer PATH")
        return net, load_tokenizer(tokenizer_path), saved
