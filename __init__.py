"""seekv4: Hugging Face-native DeepSeek-V4-family sparse language models.

Importing the package registers `model_type="seekv4"` with AutoConfig, AutoModel and AutoModelForCausalLM.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration import SeekV4Config, list_presets
from .modeling import SeekV4ForCausalLM, SeekV4Model, SeekV4PreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(SeekV4Config.model_type, SeekV4Config, exist_ok=True)
AutoModel.register(SeekV4Config, SeekV4Model, exist_ok=True)
AutoModelForCausalLM.register(SeekV4Config, SeekV4ForCausalLM, exist_ok=True)

__all__ = ["SeekV4Config", "SeekV4PreTrainedModel", "SeekV4Model", "SeekV4ForCausalLM", "list_presets"]
