"""Hugging Face integration: the model registry, PromptedLM, and the embedded default model."""

from mptkern.models.default import load_default
from mptkern.models.prompted import PromptedLM, PromptedLMOutput, concat_prompt
from mptkern.models.registry import REGISTRY

__all__ = ["load_default", "PromptedLM", "PromptedLMOutput", "REGISTRY", "concat_prompt"]
