"""Interoperability: released checkpoints, Hugging Face transformers, lm-evaluation-harness.

- :mod:`.released`: the released ``pytorch_model.bin`` key layout to and from ``TokenformerLM``.
- :mod:`.convert`: a released checkpoint (local or on the hub) to a model directory of ours.
- :mod:`.tokenizer`: a model's tokenizer, stored beside it for ``AutoTokenizer``.
- :mod:`.hub`: the rest of a hub folder (model code and ``auto_map``, generation config, card).
- :mod:`.hf` (extra ``[hf]``): ``to_hf``/``from_hf``; the transformers classes themselves are
  ``tokenformer.modeling_tokenformer`` (they travel with every model directory).
- :mod:`.harness` (extra ``[eval]``): lm-evaluation-harness on our model directories.

Nothing here imports transformers until it is used.
"""

from .convert import convert_from_hub, convert_released
from .released import (
    HUB_MODELS,
    CheckpointMismatchError,
    infer_config,
    load_released,
    ours_to_released,
    read_released,
    released_to_ours,
)

__all__ = [
    "HUB_MODELS",
    "CheckpointMismatchError",
    "convert_from_hub",
    "convert_released",
    "infer_config",
    "load_released",
    "ours_to_released",
    "read_released",
    "released_to_ours",
]
