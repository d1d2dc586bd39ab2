"""The decoder-only transformer and its Hugging Face checkpoint I/O."""
from engine.model.checkpoint import CheckpointError, load_model, load_tokenizer, save_model
from engine.model.config import SUPPORTED_MODEL_TYPES, ConfigError, ModelConfig
from engine.model.tiny import char_tokenizer, create_tiny_checkpoint, tiny_config
from engine.model.transformer import Transformer

__all__ = [
    "CheckpointError", "ConfigError", "ModelConfig", "SUPPORTED_MODEL_TYPES", "Transformer",
    "char_tokenizer", "create_tiny_checkpoint", "load_model", "load_tokenizer", "save_model", "tiny_config",
]
