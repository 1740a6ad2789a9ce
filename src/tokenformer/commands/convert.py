"""``tokenformer convert``: a released checkpoint into a model directory of ours."""

from __future__ import annotations


def convert(
    src: str,
    dst: str,
    from_hub: bool = False,
    revision: str | None = None,
    preset: str | None = None,
    n_heads: int | None = None,
    tokenizer: str | None = None,
    overwrite: bool = False,
) -> None:
    """Convert a released checkpoint (GPT-NeoX layout pytorch_model.bin) into a model directory of ours.

    Args:
        src: a pytorch_model.bin or a directory holding one; with --from_hub, a hub id
            (Haiyang-W/TokenFormer-150M) or a released size (150M, 450M, 900M, 1.5B).
        dst: the directory to write (config.json + model.safetensors [+ tokenizer files]).
        from_hub: download src from the Hugging Face hub (needs network access).
        revision: hub revision (branch, tag or commit) with --from_hub.
        preset: the config preset; default: the released size downloaded, else read from the tensor shapes.
        n_heads: head count when no released preset has the checkpoint's width and depth.
        tokenizer: a tokenizer.json to store beside the model; default with --from_hub: GPT-NeoX-20B's.
        overwrite: replace a model already in dst, as a whole (none of its files stays).
    """
    from ..interop.convert import convert_from_hub, convert_released

    if from_hub:
        path = convert_from_hub(
            src, dst, preset, revision=revision, n_heads=n_heads, tokenizer=tokenizer, overwrite=overwrite
        )
    else:
        path = convert_released(src, dst, preset, n_heads=n_heads, tokenizer=tokenizer, overwrite=overwrite)
    print(f"wrote {path}")
