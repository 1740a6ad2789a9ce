"""torch.compile: no graph breaks, the compiled fused Pattention equals eager and stays one
operator in the compiled graphs, growing a compiled model is exact and costs exactly one
recompilation (for the new parameter shapes), and validation in a compiled training run
compiles nothing."""

import pytest
import torch
from conftest import tiny_config, tiny_train_options
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters
from torch._functorch.aot_autograd import make_boxed_func

from tokenformer import NORMS, Pattention, TokenformerLM, carry_optimizer_state, grow
from tokenformer.pattention import pattention_group


def set_impl(model: torch.nn.Module, impl: str) -> None:
    for module in model.modules():
        if isinstance(module, Pattention):
            module.impl = impl


def test_model_traces_without_graph_breaks_under_autocast():
    # (float32 is traced with fullgraph=True in test_growth_recompiles_once.)
    model = TokenformerLM(tiny_config())
    ids = torch.randint(0, 97, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explanation = torch._dynamo.explain(model)(ids[:, :-1], ids[:, 1:])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("impl", ["auto", "fused"])
@pytest.mark.parametrize("norm", NORMS)
def test_compiled_fused_pattention_matches_eager(norm, impl):
    # aot_eager traces forward and backward as inductor does, without generating code.
    torch._dynamo.reset()
    layer = Pattention(16, 8, 40, norm, impl=impl)
    x = torch.randn(3, 5, 16, requires_grad=True)
    eager = layer(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), (x, layer.key_param_tokens, layer.value_param_tokens))
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    grads = torch.autograd.grad(compiled.square().sum(), (x, layer.key_param_tokens, layer.value_param_tokens))
    torch.testing.assert_close(compiled, eager)
    for got, expected in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, expected)


def test_compiled_graphs_hold_the_operator_whole():
    # One node for the whole layer group in the forward graph and one in the backward graph.
    graphs = {}

    def capture(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm
            return make_boxed_func(gm.forward)

        return compiler

    torch._dynamo.reset()
    x = torch.randn(2, 5, 16, requires_grad=True)
    layers = [Pattention(16, 16, 24) for _ in range(3)]

    def qkv(x):
        outs = pattention_group(
            x,
            [m.key_param_tokens for m in layers],
            [m.value_param_tokens for m in layers],
            [m.tau for m in layers],
            impl="fused",
        )
        return sum(o.square().sum() for o in outs)

    backend = aot_autograd(fw_compiler=capture("forward"), bw_compiler=capture("backward"))
    torch.compile(qkv, backend=backend, fullgraph=True)(x).backward()
    ops = {
        name: [n.target for n in gm.graph.nodes if getattr(n.target, "namespace", None) == "tokenformer"]
        for name, gm in graphs.items()
    }
    assert ops == {
        "forward": [torch.ops.tokenformer.pattention_forward.default],
        "backward": [torch.ops.tokenformer.pattention_backward.default],
    }
    assert x.grad is not None and all(m.key_param_tokens.grad is not None for m in layers)


@pytest.mark.parametrize("impl", ["auto", "fused"])
def test_growth_is_exact_and_recompiles_once(impl):
    torch._dynamo.reset()
    counters.clear()
    model = TokenformerLM(tiny_config(n_layers=1))
    set_impl(model, impl)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    ids = torch.randint(0, 97, (2, 12))

    def step():
        compiled(ids[:, :-1], ids[:, 1:])[1].backward()
        optimizer.step()
        optimizer.zero_grad()
        return counters["stats"]["unique_graphs"]

    assert [step(), step()] == [1, 1]
    with torch.no_grad():
        before = compiled(ids)
    grow(model, qkv_tokens=30, ffn_tokens=48)
    carry_optimizer_state(optimizer)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), before, rtol=1e-5, atol=1e-5)
    # The no-grad calls compile graphs of their own; training after growth adds one more.
    graphs = counters["stats"]["unique_graphs"]
    assert [step(), step()] == [graphs + 1, graphs + 1]


def test_validation_runs_the_model_without_the_compiled_wrapper(corpus_file, cache_dir, tmp_path, one_thread):
    # A compiled evaluation would compile a second graph (no autograd, eval mode): one graph for
    # the training steps is all a compiled run may build.
    from tokenformer.train import TrainConfig, Trainer

    torch._dynamo.reset()
    counters.clear()
    config = TrainConfig(
        **tiny_train_options(corpus_file, cache_dir, tmp_path / "run", max_steps=3, eval_interval=1, ckpt_interval=100)
    )
    trainer = Trainer(config, wrap_model=lambda model: torch.compile(model, backend="eager", fullgraph=True))
    trainer.fit()
    assert [row["step"] for row in trainer.state.val_history] == [1, 2, 3]
    assert trainer.model.training
    assert counters["stats"]["unique_graphs"] == 1


def test_identical_blocks_share_one_compiled_graph():
    # Compiling block by block (benchmarks/train_step.py --modes compiled-blocks) costs one
    # compilation for all layers, however deep the model.
    torch._dynamo.reset()
    counters.clear()
    model = TokenformerLM(tiny_config(n_layers=3))
    for block in model.layers:
        block.compile(backend="aot_eager", fullgraph=True)
    ids = torch.randint(0, 97, (2, 12))
    model(ids[:, :-1], ids[:, 1:])[1].backward()
    assert counters["stats"]["unique_graphs"] == 1
    assert model.generate(ids[:, :4], 3, temperature=0).shape == (2, 7)
