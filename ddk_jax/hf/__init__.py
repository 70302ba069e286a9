"""Hugging Face checkpoints: config.json mapping, safetensors import and export.

Supported architectures: LlamaForCausalLM (Llama 1/2/3, TinyLlama), MistralForCausalLM,
Qwen2ForCausalLM (Qwen1.5 and Qwen2).  Safetensors only; see docs/checkpoints.md.
"""

from ddk_jax.hf.hf_config import (
    SUPPORTED_ARCHITECTURES,
    UnsupportedCheckpointError,
    hf_config_from_model_config,
    model_config_from_hf,
)
from ddk_jax.hf.hf_export import export_hf_checkpoint
from ddk_jax.hf.hf_import import (
    HFCheckpointError,
    check_vocab_compatible,
    load_hf_checkpoint,
    open_checkpoint,
    validate_checkpoint_dir,
)
from ddk_jax.hf.param_names import param_mapping

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "HFCheckpointError",
    "UnsupportedCheckpointError",
    "check_vocab_compatible",
    "export_hf_checkpoint",
    "hf_config_from_model_config",
    "load_hf_checkpoint",
    "model_config_from_hf",
    "open_checkpoint",
    "param_mapping",
    "validate_checkpoint_dir",
]
