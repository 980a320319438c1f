from .configuration_seekv4 import ATTENTION_KINDS, FFN_KINDS, SCORING_FUNCS, SeekV4Config
from .presets import list_presets

__all__ = ["SeekV4Config", "list_presets", "ATTENTION_KINDS", "FFN_KINDS", "SCORING_FUNCS"]
