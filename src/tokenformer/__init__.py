"""TokenFormer: transformers whose every linear projection is attention to parameter tokens."""

from .config import PRESETS, TokenformerConfig
from .flops import count_parameters, training_flops, training_flops_per_token
from .growth import TokenUpdateScale, carry_optimizer_state, grow, growth_summary
from .model import TokenformerLM
from .pattention import NORMS, Pattention
from .vision import VISION_PRESETS, TokenformerViT, VisionConfig

__version__ = "0.1.0"

__all__ = [
    "NORMS",
    "PRESETS",
    "Pattention",
    "TokenUpdateScale",
    "TokenformerConfig",
    "TokenformerLM",
    "TokenformerViT",
    "VISION_PRESETS",
    "VisionConfig",
    "carry_optimizer_state",
    "count_parameters",
    "grow",
    "growth_summary",
    "training_flops",
    "training_flops_per_token",
]
