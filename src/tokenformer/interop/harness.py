"""lm-evaluation-harness on TokenFormer models (extra ``[eval]``).

Our model directories (``tokenformer.save_model``, ``tokenformer convert``, training
checkpoints) are hub folders with their own code, so plain ``lm_eval`` runs them::

    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True --tasks piqa

``python -m tokenformer.interop.harness`` is the ``lm_eval`` command with ``tokenformer``
imported (its registered classes, no ``trust_remote_code``) and takes lm_eval's arguments::

    python -m tokenformer.interop.harness --model hf --model_args pretrained=DIR --tasks piqa
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..families import CONFIG_NAME, read_model_config
from ..model import TokenformerLM
from .tokenizer import TOKENIZER_CONFIG_NAME, TOKENIZER_NAME, as_tokenizer, hf_tokenizer_config

# The paper's zero-shot suite (accuracy on each; the average is the reported figure).
PAPER_TASKS = ("lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande")


def _hf_tokenizer(path: str | Path, model_max_length: int):
    """transformers' tokenizer from a directory with tokenizer files or from a bare tokenizer.json."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path).expanduser()
    if path.is_dir() and (path / TOKENIZER_CONFIG_NAME).is_file():
        return AutoTokenizer.from_pretrained(str(path))
    tokenizer = as_tokenizer(path)
    special = {k: v for k, v in hf_tokenizer_config(tokenizer, model_max_length).items() if k != "tokenizer_class"}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, **special)


def evaluate(
    model: str | Path | TokenformerLM,
    tasks: Sequence[str | dict[str, Any]],
    *,
    tokenizer: str | Path | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    limit: int | float | None = None,
    device: str = "cpu",
    include_path: str | Path | None = None,
    bootstrap_iters: int = 100_000,
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on a model directory (ours or a converted release) or a ``TokenformerLM``.

    ``tasks`` are lm-eval task names (``PAPER_TASKS`` for the paper's suite, which needs the hub)
    or task configs as dicts; ``include_path`` adds a folder of task YAML files. ``tokenizer`` is
    a ``tokenizer.json`` or a directory with tokenizer files, by default the model directory.
    ``limit`` caps the documents per task (a fraction if below 1). Returns lm-eval's results
    dict: ``results["results"][task]["acc,none"]`` and so on; :func:`table` formats it.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ImportError("lm-evaluation-harness is not installed: pip install 'tokenformer[eval]'") from exc
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks must be a non-empty list of task names or configs, got {tasks!r}")
    if isinstance(model, TokenformerLM):
        from .hf import to_hf

        if tokenizer is None:
            raise ValueError(
                "evaluating a TokenformerLM object needs tokenizer= (a tokenizer.json or a directory with one)"
            )
        pretrained: Any = to_hf(model).eval()
        max_len = model.config.max_seq_len
    else:
        directory = Path(model).expanduser()
        if not (directory / CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"no {CONFIG_NAME} in {directory}: not a model directory "
                "(made by tokenformer convert or tokenformer.save_model)"
            )
        tokenizer = directory if tokenizer is None else tokenizer
        if Path(tokenizer).is_dir() and not (Path(tokenizer) / TOKENIZER_NAME).is_file():
            raise FileNotFoundError(
                f"no {TOKENIZER_NAME} in {tokenizer}; pass tokenizer= (e.g. GPT-NeoX-20B's for released models), "
                f"or convert with --tokenizer so the directory holds one"
            )
        pretrained = str(directory)
        max_len = read_model_config(directory).max_seq_len  # a field left out has its default, as the model
    hf_tokenizer = _hf_tokenizer(tokenizer, max_len)
    lm = HFLM(pretrained=pretrained, tokenizer=hf_tokenizer, batch_size=batch_size, device=device)
    # Indexing lm-eval's own task library reads ~14k YAML files (tens of seconds): only task
    # names need it, configs given as dicts do not.
    manager = TaskManager(
        include_path=str(include_path) if include_path is not None else None,
        include_defaults=any(isinstance(t, str) for t in tasks),
    )
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        bootstrap_iters=bootstrap_iters,
        log_samples=False,
    )


def table(results: dict[str, Any]) -> str:
    """lm-eval's markdown table of a results dict."""
    from lm_eval.utils import make_table

    return make_table(results)


def main() -> None:
    """``lm_eval``'s command line, with ``tokenformer`` registered in transformers."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
