"""Per-model differences, one entry per ``config.model_type``; nothing model-specific lives elsewhere.

Shared-prefix execution needs from a Hugging Face ``*ForCausalLM`` only what its decoders already
give: a decoder body that takes ``inputs_embeds`` and ``position_ids`` and passes extra keyword
arguments down to an attention function dispatched through ``AttentionInterface``, and an
``lm_head``. An entry declares the rest, so that what the paths do is read from it, not assumed:

* ``decoder``: the attribute of the ``*ForCausalLM`` that holds the decoder body;
* ``attention_args``: the keyword arguments the model's attention passes, each of which
  :data:`ATTENTION_ARGS` maps to the ops (a model passing one its entry does not declare is
  refused, naming it: it could change the function, e.g. Gemma 2's ``softcap``);
* ``attention_softcap``: the config field of the attention's score soft-capping (what its
  ``softcap`` keyword carries), which the Triton kernels do not have;
* ``final_softcap``: the config field of a final logit soft-capping (``logits = c tanh(logits / c)``),
  applied wherever mptkern computes logits (the engine, ``PromptedLM``, the fused loss);
* ``reference_attention``: the transformers implementation the concatenation reference runs with.

Which backend runs a model's attention follows from its config: :func:`attention_backends`.
Adding a backbone: one entry here, then the tests of ``tests/test_backbones.py`` on a tiny random
config (docs/extending.md).
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

# what each attention keyword becomes in mptkern's attention ops
ATTENTION_ARGS = {
    "scaling": "softmax_scale",
    "dropout": "must be 0 (the model is frozen)",
    "sliding_window": "window (absolute positions: a query at x sees keys y > x - window)",
    "s_aux": "sinks (one logit per query head, no value)",
    "softcap": "softcap (scores become softcap * tanh(score / softcap); torch path)",
}
# what the decoder body's plumbing passes to every attention call; the attention never reads it
PLUMBING = frozenset({"position_ids", "use_cache", "cache_position", "mptkern_plan"})


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    attention_args: frozenset[str]
    reference_attention: str = "sdpa"
    decoder: str = "model"
    attention_softcap: str | None = None  # config field of the attention's logit soft-capping
    final_softcap: str | None = None

    def __post_init__(self):
        unknown = set(self.attention_args) - set(ATTENTION_ARGS)
        if unknown:
            raise ValueError(f"attention_args {sorted(unknown)} have no mapping in ATTENTION_ARGS")

    def check_attention_kwargs(self, model_type: str, kwargs) -> None:
        """Raise ValueError on a keyword the model's attention passed that this entry does not declare."""
        extra = set(kwargs) - self.attention_args - PLUMBING
        if extra:
            raise ValueError(f"{model_type}'s attention passed {sorted(extra)}, which its registry entry does not "
                             f"declare (declared: {sorted(self.attention_args)}); mptkern cannot know what it does to "
                             "the scores, so it refuses rather than run a different function (mptkern/models/registry.py)")

    def logit_softcap(self, config) -> float | None:
        return getattr(config, self.final_softcap, None) if self.final_softcap else None

    def decoder_of(self, model):
        return getattr(model, self.decoder)

    def logits(self, model, hidden):
        """``lm_head(hidden)``, then the final soft-capping when the model has one."""
        logits = model.lm_head(hidden)
        cap = self.logit_softcap(model.config)
        return logits if cap is None else torch.tanh(logits / cap) * cap


_SWA = frozenset({"scaling", "dropout", "sliding_window"})
REGISTRY: dict[str, ModelEntry] = {
    "llama": ModelEntry(frozenset({"scaling", "dropout"})),  # SmolLM2, Llama 3.1, Meditron3
    "mistral": ModelEntry(_SWA),
    "qwen2": ModelEntry(_SWA),
    "qwen3": ModelEntry(_SWA),  # QK-norm lives inside the attention module, before the kernel
    # softcapped scores are not in transformers' sdpa path; sinks need the eager path in HF
    "gemma2": ModelEntry(_SWA | {"softcap"}, reference_attention="eager", attention_softcap="attn_logit_softcapping",
                         final_softcap="final_logit_softcapping"),
    "gpt_oss": ModelEntry(_SWA | {"s_aux"}, reference_attention="eager"),
}


def entry_for(config) -> ModelEntry:
    model_type = getattr(config, "model_type", None)
    if model_type not in REGISTRY:
        raise ValueError(f"model_type {model_type!r} is not supported; supported types: {sorted(REGISTRY)}")
    return REGISTRY[model_type]


def fallback_note(config, device) -> str | None:
    """The message for a model whose attention cannot run the Triton kernels on ``device``, a CUDA
    device where ``auto`` would otherwise pick them, or None."""
    if torch.device(device).type != "cuda":
        return None
    why = attention_backends(config)["triton"]
    return None if why is None else (f"{config.model_type}: the attention runs mptkern's torch path on this GPU, "
                                     f"not the Triton kernels: {why}")


def warn_on_fallback(model) -> None:
    """Warn when ``model`` sits on a CUDA device and its attention cannot run
    the Triton kernels there (:func:`fallback_note`)."""
    note = fallback_note(model.config, next(model.parameters()).device)
    if note:
        warnings.warn(note, stacklevel=3)


def attention_backends(config) -> dict[str, str | None]:
    """For each backend of the attention ops, None if it runs this model's attention, else why not
    (``auto`` falls back to torch then): the Triton kernels take head dims 16..128 and no softcap."""
    from mptkern.ops.prefix_attention.tiles import HEAD_DIMS

    entry = entry_for(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    triton = None
    if head_dim not in HEAD_DIMS:
        triton = f"head_dim {head_dim} is outside the Triton kernels' head dims {HEAD_DIMS}"
    elif entry.attention_softcap and getattr(config, entry.attention_softcap, None):
        triton = "the Triton kernels have no attention logit soft-capping"
    return {"torch": None, "triton": triton}
