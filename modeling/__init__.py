from .modeling_seekv4 import (
    SeekV4CausalLMOutput,
    SeekV4DecoderLayer,
    SeekV4ForCausalLM,
    SeekV4Model,
    SeekV4ModelOutput,
    SeekV4PreTrainedModel,
)

__all__ = ["SeekV4PreTrainedModel", "SeekV4Model", "SeekV4ForCausalLM", "SeekV4DecoderLayer",
           "SeekV4ModelOutput", "SeekV4CausalLMOutput"]
