"""``PromptedLM``: a frozen Hugging Face causal LM with per-task soft prompts.

With ``share_prefix=True`` the prompts of the batch's distinct tasks and the inputs' real tokens are
packed into one token stream: each task's prompt is computed once per batch, whatever the number of
its sequences. Prompt rows sit at positions 0..l-1 and attend causally among themselves; input
tokens sit at positions l, l+1, ... and see their task's whole prompt plus their own earlier tokens,
through :func:`mptkern.ops.prefix_attention`, registered with transformers' AttentionInterface (no
model code is copied). ``share_prefix=False`` is the PEFT-style concatenation, kept as the reference.
Both give the same function.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from mptkern.models.registry import entry_for
from mptkern.ops import fused_distill_loss, prefix_attention

ATTENTION_NAME = "mptkern_prefix"


@dataclasses.dataclass
class _Pack:
    """How the packed stream is laid out: U prompts of l rows, then the B inputs' real tokens."""

    num_prompts: int
    prompt_len: int
    cu_seqlens: torch.Tensor  # (U + B + 1,) int32
    prefix_ids: torch.Tensor  # (U + B,) -1 for the prompt sequences themselves


def _prefix_attention_hf(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                         s_aux=None, mptkern_pack: _Pack | None = None, **kwargs):
    """transformers attention function: query (1, Hq, N, D), key/value (1, Hkv, N, D) -> (1, N, Hq, D)."""
    if mptkern_pack is None:
        raise RuntimeError(f"attention {ATTENTION_NAME!r} runs only inside PromptedLM (it needs the packing layout)")
    if dropout:
        raise ValueError("PromptedLM runs a frozen model: attention dropout must be 0 (call model.eval())")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    rows = mptkern_pack.num_prompts * mptkern_pack.prompt_len
    shape = (mptkern_pack.num_prompts, mptkern_pack.prompt_len, *k.shape[1:])
    out = prefix_attention(
        q, k, v, mptkern_pack.cu_seqlens, k[:rows].reshape(shape), v[:rows].reshape(shape), mptkern_pack.prefix_ids,
        softmax_scale=scaling, window=sliding_window, sinks=s_aux,
    )
    return out.unsqueeze(0), None


AttentionInterface.register(ATTENTION_NAME, _prefix_attention_hf)


@contextlib.contextmanager
def _attention_implementation(model, name: str):
    """Run ``model`` with attention implementation ``name``; the previous one is restored after."""
    old = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(old)


def concat_prompt(prompts: torch.Tensor, embeds: torch.Tensor, attention_mask: torch.Tensor):
    """PEFT's prompt-tuning layout, the reference the shared-prefix paths are tested against.

    Args:
        prompts: ``(B, l, d)`` prompt rows, one prompt per row of the batch.
        embeds: ``(B, n, d)`` input token embeddings (cast to ``prompts.dtype``).
        attention_mask: ``(B, n)`` 0/1 (any integer or bool dtype), left or right padded.

    Returns:
        ``(B, l + n, d)`` embeddings, prompt first, and the ``(B, l + n)`` mask with the prompt's
        columns set to 1. Hugging Face ``generate`` derives positions from this mask, so every real
        token sits at ``l + `` its index among the row's real tokens, as in the packed path.
    """
    if prompts.dim() != 3 or embeds.dim() != 3 or prompts.shape[0] != embeds.shape[0] or prompts.shape[2] != embeds.shape[2]:
        raise ValueError(f"prompts (B, l, d) and embeds (B, n, d) must agree on B and d, got "
                         f"{tuple(prompts.shape)} and {tuple(embeds.shape)}")
    if attention_mask.shape != embeds.shape[:2]:
        raise ValueError(f"attention_mask must have shape {tuple(embeds.shape[:2])}, got {tuple(attention_mask.shape)}")
    mask = torch.cat([attention_mask.new_ones(prompts.shape[:2]), attention_mask], 1)
    return torch.cat([prompts, embeds.to(prompts.dtype)], 1), mask


@dataclasses.dataclass
class PromptedLMOutput:
    """``hidden_states (B, n, d)`` final (normed) hidden states of the input tokens; ``logits (B, n, V)``
    or None; ``loss`` scalar or None; ``predictor_hidden (B, n, d)``: the hidden state that predicts
    token j (its prompt's last row for j = 0), what a loss on token j needs. Values at padding
    positions are unspecified."""

    hidden_states: torch.Tensor
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    predictor_hidden: torch.Tensor | None = None


class PromptedLM(nn.Module):
    """A frozen causal LM with a prompt module (``TaskPrompts`` / ``MultitaskPrompt``).

    Args:
        model: a Hugging Face ``*ForCausalLM`` whose ``config.model_type`` is in the registry
            (``llama``, ``gpt_oss``). Its parameters are frozen here.
        prompt: module mapping ``task_ids (B,)`` to prompts ``(B, l, d)``.
        share_prefix: pack each distinct task's prompt once per batch (default) or concatenate.
    """

    def __init__(self, model: nn.Module, prompt: nn.Module, *, share_prefix: bool = True):
        super().__init__()
        self.entry = entry_for(model.config)
        self.model = model.requires_grad_(False).eval()
        self.prompt = prompt
        self.share_prefix = share_prefix

    def _validate(self, input_ids, attention_mask, task_ids, labels):
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.numel() == 0:
            raise ValueError(f"input_ids must be a non-empty integer tensor of shape (B, n), got {input_ids.dtype} {tuple(input_ids.shape)}")
        B, n = input_ids.shape
        if attention_mask is None or attention_mask.shape != (B, n):
            raise ValueError(f"attention_mask must have shape (B={B}, n={n}), got {None if attention_mask is None else tuple(attention_mask.shape)}")
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()) or bool((attention_mask.sum(1) == 0).any()):
            raise ValueError("attention_mask must hold 0/1 with at least one real token per row")
        if task_ids.shape != (B,) or task_ids.dtype.is_floating_point:
            raise ValueError(f"task_ids must be an integer tensor of shape (B={B},), got {task_ids.dtype} {tuple(task_ids.shape)}")
        if labels is not None and labels.shape != (B, n):
            raise ValueError(f"labels must have shape (B={B}, n={n}), got {tuple(labels.shape)}")

    def forward(self, input_ids, attention_mask, task_ids, labels=None, *, return_logits: bool = True) -> PromptedLMOutput:
        """input_ids, attention_mask, labels: ``(B, n)`` (right or left padded, labels -100 ignored);
        task_ids: ``(B,)``. Returns hidden states and logits of the input tokens only and the mean
        next-token loss over valid labels (the first token is predicted from its prompt's last row)."""
        self._validate(input_ids, attention_mask, task_ids, labels)
        real = attention_mask.bool()
        if labels is not None:
            labels = labels.masked_fill(~real, -100)
        run = self._forward_shared if self.share_prefix else self._forward_concat
        hidden, predictors = run(input_ids, real, task_ids)
        logits = self.model.lm_head(hidden) if return_logits else None
        loss = None
        if labels is not None:
            # predictors[b, j]: the hidden state that predicts token j of row b; the fused loss drops
            # ignored rows and never builds a (tokens, vocab) logits tensor
            h = predictors.reshape(-1, predictors.shape[-1])
            loss = fused_distill_loss(h, h.detach(), self.model.lm_head.weight, labels.reshape(-1),
                                      kl_weight=0.0, ce_weight=1.0)
        return PromptedLMOutput(hidden, logits, loss, predictors)

    def _forward_shared(self, input_ids, real, task_ids):
        B, n = input_ids.shape
        tasks, slot = torch.unique(task_ids, return_inverse=True)
        U, l, d = tasks.numel(), self.prompt.prompt_len, self.prompt.hidden_size
        # one stream: each task's prompt once, then the real tokens row-major; both are written in
        # place, the prompt rows by the prompt module (the fused op for MultitaskPrompt), no cat pass
        weight = self.model.get_input_embeddings().weight
        dtype = self.prompt.dtype
        stream = torch.empty(U * l + int(real.sum()), d, dtype=dtype, device=weight.device)
        if weight.dtype == dtype:
            torch.index_select(weight, 0, input_ids[real], out=stream[U * l :])
        else:
            stream[U * l :] = weight[input_ids[real]]
        stream = self.prompt.write_rows(tasks, stream, torch.arange(U, device=stream.device) * l)
        lengths = real.sum(1)
        token_pos = l + real.cumsum(1)[real] - 1
        positions = torch.cat([torch.arange(l, device=stream.device).repeat(U), token_pos])
        seqlens = torch.cat([torch.full((U,), l, device=lengths.device), lengths])
        cu = F.pad(seqlens.cumsum(0), (1, 0)).to(torch.int32)
        pack = _Pack(U, l, cu, torch.cat([torch.full((U,), -1, device=slot.device), slot]))
        with _attention_implementation(self.model, ATTENTION_NAME):
            out = self.model.model(inputs_embeds=stream[None], position_ids=positions[None], use_cache=False, mptkern_pack=pack)
        h = out.last_hidden_state[0]
        h_tok = h[U * l:]
        hidden = h_tok.new_zeros(B, n, d).masked_scatter(real[..., None], h_tok)
        # token 0 of each row is predicted by its prompt's last row, token j by token j-1
        starts = cu[U:-1].long()
        pred_rows = torch.arange(U * l, h.shape[0], device=h.device) - 1
        pred_rows[starts - U * l] = slot * l + l - 1
        predictors = h.new_zeros(B, n, d).masked_scatter(real[..., None], h[pred_rows])
        return hidden, predictors

    def _forward_concat(self, input_ids, real, task_ids):
        B, n = input_ids.shape
        # move real tokens to the front (right padding) so positions and sliding windows count
        # real tokens only, as in the packed path
        order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)
        ids_r = input_ids.gather(1, order)
        mask_r = real.gather(1, order)
        prompts = self.prompt(task_ids)
        l = prompts.shape[1]
        embeds, mask = concat_prompt(prompts, self.model.get_input_embeddings()(ids_r), mask_r.long())
        with _attention_implementation(self.model, self.entry.reference_attention):
            out = self.model.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
        h = out.last_hidden_state
        inverse = torch.argsort(order, dim=1)
        take = lambda x: x.gather(1, inverse[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
        return take(h[:, l:]), take(h[:, l - 1 : -1])
