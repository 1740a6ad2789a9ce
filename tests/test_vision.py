import math

import pytest
import torch
from conftest import reference_ops

from tokenformer import grow, growth_summary
from tokenformer.io import load_weights, save_weights
from tokenformer.vision import (
    VISION_PRESETS,
    BidirectionalAttention,
    TokenformerViT,
    VisionConfig,
    count_vision_parameters,
    drop_path,
    patchify,
    shifted_views,
)


def tiny_vit(**overrides) -> VisionConfig:
    """Small enough for float64 references; distinct token counts per kind."""
    base = dict(
        image_size=12,
        patch_size=4,
        in_channels=2,
        num_classes=5,
        d_model=32,
        n_layers=2,
        n_heads=4,
        qkv_tokens=24,
        proj_tokens=20,
        ffn_tokens=40,
        patch_tokens=18,
        head_tokens=14,
    )
    return VisionConfig(**{**base, **overrides})


def images_for(cfg: VisionConfig, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size)


def reference_logits(model: TokenformerViT, images: torch.Tensor) -> torch.Tensor:
    """The forward pass written out plainly in float64, one image and one patch at a time."""
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    d, heads, p = cfg.d_model, cfg.n_heads, cfg.patch_size
    hd = d // heads

    patt, ln = reference_ops(sd, cfg.layernorm_eps)

    s = cfg.patch_shift
    # With patch_shift: the image, then copies moved towards the top-left, top-right, bottom-left, bottom-right.
    moves = [(0, 0)] + ([(s, s), (s, -s), (-s, s), (-s, -s)] if s else [])

    def pixel(image, channel, row, col):
        inside = 0 <= row < cfg.image_size and 0 <= col < cfg.image_size
        return image[channel, row, col] if inside else image.new_zeros(())

    results = []
    for image in images.double():
        rows = []
        for top in range(0, cfg.image_size, p):
            for left in range(0, cfg.image_size, p):
                rows.append(
                    torch.stack(
                        [
                            pixel(image, c, top + i + dy, left + j + dx)
                            for dy, dx in moves
                            for c in range(cfg.in_channels)
                            for i in range(p)
                            for j in range(p)
                        ]
                        + [image.new_ones(())] * cfg.patch_bias
                    )
                )  # patch_bias: a constant last input
        x = patt(torch.stack(rows), "patch_proj")
        if cfg.pool == "cls":
            x = torch.cat([sd["cls_token"][0], x])
        x = x + sd["pos_embedding"][0]
        T = x.shape[0]
        for i in range(cfg.n_layers):
            pre = f"layers.{i}."
            h = ln(x)
            q, k, v = (patt(h, pre + f"attention.{n}").view(T, heads, hd) for n in ("query", "key", "value"))
            scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)  # no causal mask: every patch sees every patch
            if cfg.lsa:  # learned temperature; a token does not see itself
                scores = scores * sd[pre + "attention.log_temperature"].exp()
                scores = scores.masked_fill(torch.eye(T, dtype=torch.bool), float("-inf"))
            att = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(T, d)
            x = x + patt(att, pre + "attention.proj")
            x = x + patt(ln(x), pre + "mlp")
        pooled = x[0] if cfg.pool == "cls" else x.mean(0)
        pooled = ln(pooled) * sd["final_norm.weight"] + sd["final_norm.bias"]
        results.append(patt(pooled, "head"))
    return torch.stack(results)


@pytest.mark.parametrize(
    "pool,patch_shift,lsa,patch_bias",
    [
        ("cls", 0, False, False),
        ("mean", 0, False, False),
        ("mean", 2, False, False),
        ("cls", 0, True, False),
        ("mean", 1, True, False),
        ("mean", 1, True, True),
        ("cls", 0, False, True),
    ],
)
def test_logits_match_plain_float64_reference(pool, patch_shift, lsa, patch_bias):
    model = TokenformerViT(tiny_vit(pool=pool, patch_shift=patch_shift, lsa=lsa, patch_bias=patch_bias)).double()
    if lsa:
        with torch.no_grad():
            for i, layer in enumerate(model.layers):
                layer.attention.log_temperature.fill_(
                    0.3 - 0.5 * i
                )  # as if learned: away from the 1/sqrt(head_dim) start
    images = images_for(model.config).double()
    torch.testing.assert_close(model(images), reference_logits(model, images), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("lsa", [False, True])
def test_explicit_and_fused_attention_paths_agree(monkeypatch, lsa):
    """On CPU short sequences take the explicit softmax attention; longer ones (here: every
    length, by setting the limit to 0) PyTorch's fused kernel. Logits and gradients agree."""
    import tokenformer.vision as vision_module

    model = TokenformerViT(tiny_vit(lsa=lsa)).double()
    images = images_for(model.config).double()

    def logits_and_grads():
        model.zero_grad()
        logits = model(images)
        logits.square().sum().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    explicit = logits_and_grads()
    monkeypatch.setattr(vision_module, "EXPLICIT_ATTENTION_MAX_LEN", 0)
    fused = logits_and_grads()
    torch.testing.assert_close(explicit[0], fused[0], rtol=1e-10, atol=1e-10)
    for a, b in zip(explicit[1], fused[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    "name,pool,lsa,patch_bias",
    [(name, "mean", False, False) for name in VISION_PRESETS]
    + [("fmnist-0.3M", "cls", False, False), ("fmnist-0.3M", "mean", True, True)],
)
def test_preset_shapes(name, pool, lsa, patch_bias):
    cfg = VisionConfig.from_preset(name, pool=pool, lsa=lsa, patch_bias=patch_bias)
    model = TokenformerViT(cfg)
    images = images_for(cfg, 2)
    assert model(images).shape == (2, 10)
    assert model.features(images).shape == (2, cfg.seq_len, cfg.d_model)
    assert cfg.seq_len == (cfg.image_size // cfg.patch_size) ** 2 + (pool == "cls")
    assert sum(p.numel() for p in model.parameters()) == count_vision_parameters(cfg)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_attention_is_bidirectional(pool):
    # A causal mask would hide the last patch from every earlier position.
    model = TokenformerViT(tiny_vit(pool=pool))
    images = images_for(model.config, 1)
    changed = images.clone()
    changed[:, :, -4:, -4:] += 1.0  # the last patch in raster order
    before, after = model.features(images), model.features(changed)
    assert (after[:, 0] - before[:, 0]).abs().max() > 1e-4  # the first position (class token or first patch)
    assert (model(changed) - model(images)).abs().max() > 1e-4
    assert all(isinstance(layer.attention, BidirectionalAttention) for layer in model.layers)


def test_patchify_raster_order_channel_major():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    patches = patchify(images, 4)
    assert patches.shape == (2, 4, 48)
    # Patch 1 is the top-right one; inside a patch: channel, then row, then column.
    torch.testing.assert_close(patches[1, 1], images[1, :, 0:4, 4:8].reshape(-1))
    torch.testing.assert_close(patches[0, 2], images[0, :, 4:8, 0:4].reshape(-1))


def test_patch_shift_shows_each_patch_its_neighbourhood():
    cfg = tiny_vit(patch_shift=2)
    assert cfg.patch_dim == 5 * 2 * 4 * 4
    model = TokenformerViT(cfg)
    images = images_for(cfg, 1)
    changed = images.clone()
    changed[:, :, 4, 4] += 1.0  # first pixel of the centre patch, next to the top-left patch's corner
    with torch.no_grad():
        before, after = (
            model.patch_proj(patchify_views(model, images)),
            model.patch_proj(patchify_views(model, changed)),
        )
    moved = (after - before).abs().amax(dim=-1)[0]
    # Patches (raster order, 3x3) 0 (top-left), 1 (above), 3 (left) and 4 (its own) see that pixel.
    assert (moved[[0, 1, 3, 4]] > 1e-6).all() and (moved[[2, 5, 6, 7, 8]] == 0).all()
    assert sum(p.numel() for p in model.parameters()) == count_vision_parameters(cfg)
    linear = cfg.replace(projection="linear")
    assert TokenformerViT(linear).patch_proj.weight.shape == (32, 160)
    assert abs(count_vision_parameters(cfg.parameter_matched_linear()) - count_vision_parameters(cfg)) <= 32 * 2


def patchify_views(model, images):
    return patchify(shifted_views(images, model.config.patch_shift), model.config.patch_size)


@pytest.mark.parametrize("projection", ["pattention", "linear"])
def test_patch_bias_makes_the_patch_projection_see_contrast(projection):
    # The l2-normalised patch Pattention gives x and 3x the same token, so without the constant
    # input the whole model cannot tell an image from the same image at three times the contrast.
    images = images_for(tiny_vit(), 2)
    for patch_bias in (False, True):
        model = TokenformerViT(tiny_vit(projection=projection, patch_bias=patch_bias)).eval()
        with torch.no_grad():
            change = (model(3 * images) - model(images)).abs().max().item()
        assert model.config.patch_dim == 16 * 2 + patch_bias
        if patch_bias:
            assert change > 1e-3
        elif projection == "pattention":
            assert change < 1e-5


def test_linear_baseline_shares_code_path():
    cfg = tiny_vit(projection="linear")
    model = TokenformerViT(cfg)
    assert not any("param_tokens" in n for n, _ in model.named_parameters())
    assert model.patch_proj.weight.shape == (32, cfg.patch_dim) and model.head.weight.shape == (5, 32)
    assert model.layers[0].mlp.fc1.weight.shape == (cfg.ffn_tokens, 32)
    assert model(images_for(cfg)).shape == (3, 5)
    assert sum(p.numel() for p in model.parameters()) == count_vision_parameters(cfg)


@pytest.mark.parametrize("name", list(VISION_PRESETS))
def test_parameter_matched_linear(name):
    cfg = VisionConfig.from_preset(name)
    matched = cfg.parameter_matched_linear()
    assert matched.projection == "linear"
    n, m = count_vision_parameters(cfg), count_vision_parameters(matched)
    assert abs(n - m) <= cfg.d_model * cfg.n_layers  # half a hidden unit of rounding at most


def trained(model, steps=3, lr=1e-2):
    """A few AdamW steps, so growth is tested on weights that moved from their init."""
    opt = torch.optim.AdamW(model.param_groups(0.05), lr=lr)
    cfg = model.config
    for _ in range(steps):
        _, loss = model(images_for(cfg, 4), torch.randint(0, cfg.num_classes, (4,)))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize(
    "pool,patch_shift,lsa,patch_bias",
    [("cls", 0, False, False), ("mean", 0, False, False), ("mean", 1, False, False), ("mean", 1, True, True)],
)
@pytest.mark.parametrize("norm", ["l2_norm_gelu", "gelu_l2_norm"])
def test_growth_preserves_logits(norm, pool, patch_shift, lsa, patch_bias):
    model = TokenformerViT(tiny_vit(norm=norm, pool=pool, patch_shift=patch_shift, lsa=lsa, patch_bias=patch_bias))
    trained(model)
    images = images_for(model.config, 4)
    with torch.no_grad():
        before = model(images)
        record = grow(model, qkv_tokens=40, proj_tokens=32, ffn_tokens=96)
        after = model(images)
    assert record.function_preserving
    assert (after - before).abs().max().item() <= 1e-5
    assert model.config.qkv_tokens == 40 and model.config.ffn_tokens == 96
    assert model.patch_proj.num_tokens == 18 and model.head.num_tokens == 14  # outside the blocks: unchanged
    assert sum(p.numel() for p in model.parameters()) == count_vision_parameters(model.config)


def test_linear_vit_grows_mlp_net2net_style():
    model = TokenformerViT(tiny_vit(projection="linear"))
    trained(model)
    images = images_for(model.config, 4)
    with torch.no_grad():
        before = model(images)
        record = grow(model, ffn_tokens=64)
        after = model(images)
    assert record.function_preserving
    assert (after - before).abs().max().item() <= 1e-6
    assert model.layers[1].mlp.fc1.weight.shape == (64, 32)


def test_grown_vit_survives_save_and_load(tmp_path):
    model = TokenformerViT(tiny_vit())
    trained(model)
    grow(model, ffn_tokens=56, layers=[1])
    save_weights(model.state_dict(), tmp_path / "model.safetensors")
    model.config.save(tmp_path / "config.json")
    restored = TokenformerViT(VisionConfig.load(tmp_path / "config.json"))
    restored.load_state_dict(load_weights(tmp_path / "model.safetensors"))
    assert restored.config == model.config and restored.config.layer_tokens[1]["ffn"] == 56
    images = images_for(model.config)
    assert torch.equal(restored(images), model(images))
    assert growth_summary(restored)[1]["mlp"] == {"tokens": 56, "tau": pytest.approx(40**0.5)}


def test_loss_and_bf16_autocast():
    model = TokenformerViT(tiny_vit())
    images, labels = images_for(model.config, 6), torch.randint(0, 5, (6,))
    logits, loss = model(images, labels)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, labels))
    assert abs(loss.item() - math.log(5)) < 0.5  # fresh init: close to uniform
    with torch.autocast("cpu", torch.bfloat16):
        low_logits, low_loss = model(images, labels)
    assert low_loss.dtype == torch.float32 and torch.isfinite(low_loss)
    assert (low_logits.float() - logits).abs().max() < 0.05


def test_param_groups_skip_position_embedding_and_class_token():
    model = TokenformerViT(tiny_vit(pool="cls"))
    decay, no_decay = model.param_groups(0.05)
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert ids(no_decay) == {
        id(p) for p in (model.pos_embedding, model.cls_token, model.final_norm.weight, model.final_norm.bias)
    }
    assert id(model.patch_proj.key_param_tokens) in ids(decay)
    assert len(ids(decay)) + len(ids(no_decay)) == len(list(model.parameters()))
    mean_pool = TokenformerViT(tiny_vit(pool="mean"))
    assert mean_pool.cls_token is None and len(mean_pool.param_groups(0.05)[1]["params"]) == 3


def test_drop_path_keeps_the_expectation():
    torch.manual_seed(0)
    out = drop_path(torch.ones(4000, 3, 2), 0.25)
    per_sample = out.flatten(1)
    assert per_sample.unique().tolist() == pytest.approx([0.0, 4 / 3])
    assert bool((per_sample == per_sample[:, :1]).all())  # one draw per sample
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.25) < 0.03


def test_stochastic_depth_skips_whole_blocks_per_sample_in_training_only():
    cfg = tiny_vit(drop_path=0.5)
    assert cfg.drop_rates() == [0.0, 0.5] and tiny_vit(drop_path=0.3, n_layers=4).drop_rates() == pytest.approx(
        [0, 0.1, 0.2, 0.3]
    )
    model = TokenformerViT(cfg)
    plain = TokenformerViT(tiny_vit())
    plain.load_state_dict(model.state_dict())
    images = images_for(cfg, batch=16)
    model.eval()
    torch.testing.assert_close(model(images), plain(images), rtol=0, atol=0)  # evaluation runs every block
    # Training: block 0 always runs; block 1 either runs (update scaled by 1 / 0.5) or is skipped.
    plain.eval()
    rotary = images.new_empty(cfg.seq_len, 0)
    x = plain.patch_proj(patchify(images, cfg.patch_size)) + plain.pos_embedding
    x = plain.layers[0](x, rotary, rotary)
    update = plain.layers[1](x, rotary, rotary) - x
    model.train()
    features = model.features(images)
    skipped = [torch.allclose(f, x0, atol=1e-5) for f, x0 in zip(features, x, strict=True)]
    for f, x0, u, skip in zip(features, x, update, skipped, strict=True):
        torch.testing.assert_close(f, x0 if skip else x0 + 2 * u, atol=1e-5, rtol=1e-5)
    assert 0 < sum(skipped) < len(skipped)


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="config field patch_size=5 is invalid; allowed: a divisor of image_size=12"):
        tiny_vit(patch_size=5)
    with pytest.raises(ValueError, match="config field pool='max' is invalid; allowed: cls, mean"):
        tiny_vit(pool="max")
    with pytest.raises(ValueError, match="config field num_classes=0 is invalid; allowed: a positive integer"):
        tiny_vit(num_classes=0)
    with pytest.raises(ValueError, match="config field n_heads=5 is invalid; allowed: a divisor of d_model=32"):
        tiny_vit(n_heads=5)
    for shift in (4, -1, True):
        with pytest.raises(
            ValueError,
            match=rf"patch_shift={shift!r} is invalid; allowed: "
            r"an integer number of pixels from 0 \(off\) to patch_size - 1 = 3",
        ):
            tiny_vit(patch_shift=shift)
    for rate in (1.0, -0.1, "0.1"):
        with pytest.raises(ValueError, match=rf"drop_path={rate!r} is invalid; allowed: a probability in \[0, 1\)"):
            tiny_vit(drop_path=rate)
    with pytest.raises(ValueError, match=r"lsa='yes' is invalid; allowed: true or false"):
        tiny_vit(lsa="yes")
    with pytest.raises(ValueError, match=r"patch_bias=1 is invalid; allowed: true or false"):
        tiny_vit(patch_bias=1)
    with pytest.raises(ValueError, match="unknown preset 'imagenet'; allowed: fmnist-0.3M"):
        VisionConfig.from_preset("imagenet")
    model = TokenformerViT(tiny_vit())
    with pytest.raises(
        ValueError,
        match=r"images must be a float tensor of shape \[batch, 2, 12, 12\].*got torch.float32 \(3, 1, 12, 12\)",
    ):
        model(torch.randn(3, 1, 12, 12))
    with pytest.raises(ValueError, match="got torch.uint8"):
        model(torch.zeros(3, 2, 12, 12, dtype=torch.uint8))


def test_config_round_trip(tmp_path):
    cfg = VisionConfig.from_preset("cifar-1M", pool="mean")
    cfg.save(tmp_path / "config.json")
    assert VisionConfig.load(tmp_path / "config.json") == cfg
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['vocab_size'\]"):
        VisionConfig.from_dict({**cfg.to_dict(), "vocab_size": 10})
