"""Hugging Face checkpoints -> GGUF, quantization, header validation (pure core: no CLI, no printing)."""
