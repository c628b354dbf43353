"""The one attention function mptkern registers with transformers' ``AttentionInterface``.

Shared-prefix execution runs a Hugging Face decoder body over one packed token stream (batch 1,
``N`` rows) and replaces its attention by :func:`mptkern_attention`, which hands each layer's
``q``/``k``/``v`` to the *plan* that travels down through ``model.model(..., mptkern_plan=plan)``:
an object made once per forward on the host, with an ``attend(layer, q, k, v, scale=, window=,
sinks=, softcap=)`` method. Two kinds exist: PromptedLM's training pack (:class:`mptkern.models.prompted.PromptPack`)
and the engine's step plan (:class:`mptkern.serve.engine.StepPlan`). The layers themselves
only run the plan.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
from torch import nn
from transformers import AttentionInterface

from mptkern.models.registry import entry_for

ATTENTION_NAME = "mptkern"


class AttentionPlan(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None,
               window: int | None, sinks: torch.Tensor | None, softcap: float | None) -> torch.Tensor:
        """q ``(N, Hq, D)``, k/v ``(N, Hkv, D)`` of layer ``layer`` -> ``(N, Hq, D)``."""


def mptkern_attention(module, query, key, value, attention_mask, mptkern_plan: AttentionPlan | None = None, **kwargs):
    """transformers attention function: query ``(1, Hq, N, D)``, key/value ``(1, Hkv, N, D)`` ->
    ``((1, N, Hq, D), None)``. ``attention_mask`` is not read: the plan defines who sees whom. The
    other keywords are those the model's registry entry declares, mapped as
    :data:`mptkern.models.registry.ATTENTION_ARGS` says; any other raises ValueError."""
    if mptkern_plan is None:
        raise RuntimeError(f"attention {ATTENTION_NAME!r} runs only with a plan (PromptedLM, MultiTaskEngine)")
    entry_for(module.config).check_attention_kwargs(module.config.model_type, kwargs)
    if kwargs.get("dropout"):
        raise ValueError("mptkern runs a frozen model: attention dropout must be 0 (call model.eval())")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    out = mptkern_plan.attend(module.layer_idx, q, k, v, scale=kwargs.get("scaling"), window=kwargs.get("sliding_window"),
                              sinks=kwargs.get("s_aux"), softcap=kwargs.get("softcap"))
    return out.unsqueeze(0), None


AttentionInterface.register(ATTENTION_NAME, mptkern_attention)


@contextlib.contextmanager
def attention_implementation(model: nn.Module, name: str):
    """Run ``model`` with attention implementation ``name``; the previous one is restored after. A
    no-op when the model already runs ``name`` (switching walks every module: ~5 ms on SmolLM2)."""
    old = model.config._attn_implementation
    if old == name:
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(old)


def run_decoder(model: nn.Module, embeds: torch.Tensor, positions: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """The decoder body of ``model`` (its registry entry's ``decoder``) over one packed stream: embeds
    ``(N, d)``, positions ``(N,)`` -> final hidden states ``(N, d)``, every layer's attention run by ``plan``."""
    with attention_implementation(model, ATTENTION_NAME):
        decoder = entry_for(model.config).decoder_of(model)
        out = decoder(inputs_embeds=embeds[None], position_ids=positions[None], use_cache=False, mptkern_plan=plan)
    return out.last_hidden_state[0]
