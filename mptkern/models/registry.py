"""Per-model differences, one entry per ``config.model_type``; nothing model-specific lives elsewhere.

Shared-prefix execution needs from a model only what every Hugging Face decoder already gives: a
decoder body (``model.model``) that takes ``inputs_embeds`` and ``position_ids`` and passes extra
keyword arguments down to its attention function, an ``lm_head``, and the attention function's
``sliding_window`` / ``s_aux`` (sinks) keywords. An entry records what differs: which attention
implementation the reference (concatenation) path must run with.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    reference_attention: str  # attention implementation of the plain concatenation path
    has_sinks: bool = False


REGISTRY: dict[str, ModelEntry] = {
    "llama": ModelEntry(reference_attention="sdpa"),  # SmolLM2, Llama 3.1, Meditron3
    "gpt_oss": ModelEntry(reference_attention="eager", has_sinks=True),  # sinks need the eager path in HF
}


def entry_for(config) -> ModelEntry:
    model_type = getattr(config, "model_type", None)
    if model_type not in REGISTRY:
        raise ValueError(f"model_type {model_type!r} is not supported; supported types: {sorted(REGISTRY)}")
    return REGISTRY[model_type]
