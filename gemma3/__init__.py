"""Gemma 3 in JAX/Flax NNX: the model library (no serving code here)."""

from gemma3 import heap
from gemma3.cache import KVCache
from gemma3.checkpoint import Checkpoint, CheckpointError
from gemma3.config import ConfigError, Gemma3Config, Gemma3TextConfig, SiglipVisionConfig
from gemma3.generation import GenerateOutput, generate, sample_tokens
from gemma3.multimodal import (
    Gemma3ForConditionalGeneration,
    Gemma3ImageEncoder,
    Gemma3Model,
    Gemma3MultimodalCausalLMOutputWithPast,
    Gemma3MultiModalProjector,
)
from gemma3.outputs import (
    Gemma3CausalLMOutputWithPast,
    Gemma3ModelOutputWithPast,
    Gemma3SequenceClassifierOutputWithPast,
)
from gemma3.sharding import create_mesh, shard_model
from gemma3.text import (
    Gemma3Attention,
    Gemma3DecoderLayer,
    Gemma3ForCausalLM,
    Gemma3ForSequenceClassification,
    Gemma3MLP,
    Gemma3RMSNorm,
    Gemma3TextModel,
)
from gemma3.vision import SiglipVisionModel

heap.trim_after_compiles()  # a compile's freed heap goes back to the OS (see gemma3/heap.py)

__all__ = [
    "Checkpoint", "CheckpointError", "ConfigError", "GenerateOutput", "Gemma3Attention",
    "Gemma3CausalLMOutputWithPast", "Gemma3Config", "Gemma3DecoderLayer", "Gemma3ForCausalLM",
    "Gemma3ForConditionalGeneration", "Gemma3ForSequenceClassification", "Gemma3ImageEncoder", "Gemma3MLP",
    "Gemma3Model",
    "Gemma3ModelOutputWithPast", "Gemma3MultiModalProjector", "Gemma3MultimodalCausalLMOutputWithPast",
    "Gemma3RMSNorm", "Gemma3SequenceClassifierOutputWithPast", "Gemma3TextConfig", "Gemma3TextModel", "KVCache",
    "SiglipVisionConfig", "SiglipVisionModel", "create_mesh", "generate", "sample_tokens", "shard_model",
]
