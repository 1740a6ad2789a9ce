"""Decoding speed at batch 1: our TokenFormer and Transformer, Hugging Face's GPT-NeoX at the same
size, and our TokenFormer through the transformers API (and int8).

Every model has random weights at the shape of the released 150M TokenFormer (12 layers, width
768, 768 / 768 / 3072 tokens, the GPT-NeoX-20B vocabulary padded to 50,304); the Transformer is
ours at that shape with Linear projections (Pythia-160M's blocks without biases), GPT-NeoX is
transformers' ``GPTNeoXForCausalLM`` at the Pythia-160M shape. Every arm decodes greedily with its
KV cache, fp32, eager, from the same prompt.

Each round generates ``--short`` and ``--long`` new tokens with every arm (in an order that turns
from round to round, see ``common.py``). Reported: ``decode tokens/s``, the rate of the tokens
between the two (``(long - short) / (t_long - t_short)``: the steady per-token cost, without the
prompt's forward pass and the work each call does once), and ``generate tokens/s``, ``--long`` new
tokens over the whole call; each with the median over rounds of the arm's rate divided by
GPT-NeoX's in the same round. The script checks that our TokenFormer generates the same tokens
through both APIs.

    python benchmarks/generate.py --threads 1 --clock cpu --out benchmarks/results/generate-cpu-avx512.md
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from common import add_common_arguments, fmt_ms, interleaved_times, setup, write_report

from tokenformer import TokenformerConfig, TokenformerLM, quantize_int8
from tokenformer.experiments.runner import markdown_table

BASELINE = "gpt-neox (transformers)"
HEADERS = ["model", "MiB", "decode ms/token", "decode tokens/s", "x gpt-neox", "generate tokens/s", "x gpt-neox"]


def neox(config: TokenformerConfig) -> torch.nn.Module:
    """transformers' GPT-NeoX at the Pythia-160M shape, which our 150M TokenFormer shares."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    shape = GPTNeoXConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        intermediate_size=4 * config.d_model,
        rotary_pct=config.rotary_pct,
        rotary_emb_base=config.rope_base,
        max_position_embeddings=config.max_seq_len,
        layer_norm_eps=config.layernorm_eps,
        use_parallel_residual=True,
        tie_word_embeddings=False,
    )
    return GPTNeoXForCausalLM(shape).eval()


def ours(model: TokenformerLM):
    return lambda prompt, new: model.generate(prompt, new, temperature=0)


def through_transformers(model: torch.nn.Module):
    # min_new_tokens: random weights may emit the end-of-text id; every arm makes all its tokens.
    return lambda prompt, new: model.generate(
        prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
    )


def megabytes(model: torch.nn.Module) -> float:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def arms(preset: str, names: list[str]) -> dict[str, tuple[torch.nn.Module, object]]:
    """Arm name -> (model, generate(prompt, new tokens))."""
    from tokenformer import to_hf

    torch.manual_seed(0)
    config = TokenformerConfig.from_preset(preset)
    tokenformer = TokenformerLM(config).eval()
    builders = {
        "tokenformer": lambda: (tokenformer, ours(tokenformer)),
        "transformer": lambda: (m := TokenformerLM(config.replace(projection="linear")).eval(), ours(m)),
        BASELINE: lambda: (m := neox(config), through_transformers(m)),
        "tokenformer (transformers API)": lambda: (m := to_hf(tokenformer).eval(), through_transformers(m)),
        "tokenformer int8": lambda: (m := quantize_int8(copy.deepcopy(tokenformer)), ours(m)),
    }
    return {name: builders[name]() for name in names}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="150M")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--short", type=int, default=16, help="new tokens of the short call")
    parser.add_argument("--long", type=int, default=80, help="new tokens of the long call")
    parser.add_argument(
        "--arms",
        nargs="+",
        default=["tokenformer", "transformer", BASELINE, "tokenformer (transformers API)", "tokenformer int8"],
        help=f"models to time (always with {BASELINE!r}, the baseline)",
    )
    add_common_arguments(parser, repeats=5)
    args = parser.parse_args(argv)
    if args.device != "cpu":
        raise SystemExit("this benchmark times CPU decoding (--device cpu)")
    device = setup(args)
    names = list(dict.fromkeys([*args.arms, BASELINE]))
    models = arms(args.preset, names)
    vocab = TokenformerConfig.from_preset(args.preset).vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))

    outputs = {name: run(prompt, args.long)[0, args.prompt :] for name, (_, run) in models.items()}
    agreement = {  # the share of the new tokens that are our own generate's, position by position
        name: float((outputs[name] == outputs["tokenformer"]).float().mean())
        for name in outputs
        if name.startswith("tokenformer") and name != "tokenformer"
    }

    calls = {}
    for name, (_, run) in models.items():
        calls[f"{name} short"] = lambda run=run: run(prompt, args.short)
        calls[f"{name} long"] = lambda run=run: run(prompt, args.long)
    times = interleaved_times(calls, args.repeats, args.warmup, device, args.clock)
    steps = args.long - args.short
    decode = {
        name: [(b - a) / steps for a, b in zip(times[f"{name} short"], times[f"{name} long"], strict=True)]
        for name in models
    }
    whole = {name: times[f"{name} long"] for name in models}

    def ratio(series: dict[str, list[float]], name: str, base: str = BASELINE) -> float:
        # Median over rounds of the arm's rate over the base arm's rate in the same round.
        return statistics.median(b / a for a, b in zip(series[name], series[base], strict=True))

    rows = []
    for name, (model, _) in models.items():
        per_token = statistics.median(decode[name])
        rows.append(
            [
                name,
                f"{megabytes(model):,.0f}",
                fmt_ms(per_token),
                f"{1 / per_token:.1f}",
                f"{ratio(decode, name):.3f}",
                f"{args.long / statistics.median(whole[name]):.1f}",
                f"{ratio(whole, name):.3f}",
            ]
        )
    table = markdown_table(HEADERS, rows)
    print(table, flush=True)
    against_ours = "\n".join(
        f"- {name}: {ratio(decode, name, 'tokenformer'):.3f}x its decode rate, "
        f"{ratio(whole, name, 'tokenformer'):.3f}x its generate rate"
        for name in models
        if name.startswith("tokenformer") and name != "tokenformer"
    )
    agreement = "\n".join(
        f"- {name}: {share:.0%} of its new tokens are those of `tokenformer`'s own generate"
        for name, share in agreement.items()
    )
    body = (
        f"Preset {args.preset}, random weights, fp32, batch 1, greedy, prompt {args.prompt} tokens; each round "
        f"generates {args.short} and {args.long} new tokens with every arm. `decode` is the rate of the "
        f"{steps} tokens between the two calls; `generate` is {args.long} new tokens over the whole call (prompt, "
        "and the work done once per call, included). `x gpt-neox`: median over rounds of the arm's rate "
        f"divided by GPT-NeoX's in the same round (> 1: faster). `MiB`: parameters and buffers.\n\n{table}\n\n"
        f"Against `tokenformer` (our own generate), median per-round ratios:\n\n{against_ours}\n\n"
        f"Greedy output, {args.long} new tokens:\n\n{agreement}\n"
    )
    title = f"Decoding speed at batch 1: TokenFormer {args.preset} vs GPT-NeoX (transformers)"
    print(write_report(args.out, title, device, args.clock, body))


if __name__ == "__main__":
    main()
