"""TokenFormer: transformers whose every linear projection is attention to parameter tokens."""

from .config import PRESETS, TokenformerConfig
from .families import FAMILIES, load_model, save_model
from .flops import count_parameters, training_flops, training_flops_per_token
from .growth import (
    RowUpdateScale,
    TokenUpdateScale,
    carry_optimizer_state,
    grow,
    grow_memory,
    growth_summary,
    stack_layers,
)
from .interop.registration import install as _register_with_transformers
from .model import TokenformerLM
from .pattention import NORMS, Pattention
from .pruning import PruneRecord, calibration_scores, prune, prune_pattention
from .quantization import quantize_int8
from .sparse_pattention import SparsePattention, memory_usage
from .vision import VISION_PRESETS, TokenformerViT, VisionConfig

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "NORMS",
    "PRESETS",
    "Pattention",
    "PruneRecord",
    "RowUpdateScale",
    "SparsePattention",
    "TokenUpdateScale",
    "TokenformerConfig",
    "TokenformerLM",
    "TokenformerViT",
    "VISION_PRESETS",
    "VisionConfig",
    "calibration_scores",
    "carry_optimizer_state",
    "count_parameters",
    "from_hf",
    "grow",
    "grow_memory",
    "growth_summary",
    "load_model",
    "memory_usage",
    "prune",
    "prune_pattention",
    "quantize_int8",
    "save_model",
    "stack_layers",
    "to_hf",
    "training_flops",
    "training_flops_per_token",
]

# AutoConfig/AutoModelForCausalLM learn "tokenformer" when transformers loads them.
_register_with_transformers()

# Loaded on first use, as they import transformers.
_LAZY = {"to_hf": "tokenformer.interop.hf", "from_hf": "tokenformer.interop.hf"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        try:
            module = importlib.import_module(_LAZY[name])
        except ImportError as exc:
            raise ImportError(f"tokenformer.{name} needs transformers: pip install 'tokenformer[hf]' ({exc})") from exc
        return getattr(module, name)
    raise AttributeError(f"module 'tokenformer' has no attribute {name!r}")
