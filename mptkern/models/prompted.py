"""``PromptedLM``: a frozen Hugging Face causal LM with per-task soft prompts.

With ``share_prefix=True`` the prompts of the batch's distinct tasks and the inputs' real tokens are
packed into one token stream: each task's prompt is computed once per batch, whatever the number of
its sequences. Prompt rows sit at positions 0..l-1 and attend causally among themselves; input
tokens sit at positions l, l+1, ... and see their task's whole prompt plus their own earlier tokens,
through :func:`mptkern.ops.prefix_attention`, run by the one attention function of
:mod:`mptkern.models.attention` (no model code is copied). The layout is planned once per forward on
the host (one read of the rows' lengths and task ids) and every layer and the backward reuse it.
``share_prefix=False`` is the PEFT-style concatenation, kept as the reference. Both give the same
function.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mptkern.models.attention import attention_implementation, run_decoder
from mptkern.models.registry import entry_for, warn_on_fallback
from mptkern.ops import PrefixAttentionPlan, fused_distill_loss, plan_prefix_attention, prefix_attention


@dataclasses.dataclass(frozen=True)
class PromptPack:
    """The attention plan of one shared-prefix forward: U prompts of l rows packed first, then the B
    inputs' real tokens; ``plan`` lays out the U + B sequences (the prompts see nobody's prefix, each
    input sees its task's prompt, which is the first U * l rows of every layer's k and v)."""

    num_prompts: int
    prompt_len: int
    plan: PrefixAttentionPlan

    def attend(self, layer, q, k, v, *, scale, window, sinks, softcap):
        rows = self.num_prompts * self.prompt_len
        shape = (self.num_prompts, self.prompt_len, *k.shape[1:])
        return prefix_attention(q, k, v, None, k[:rows].view(shape), v[:rows].view(shape), plan=self.plan,
                                softmax_scale=scale, window=window, sinks=sinks, softcap=softcap)


def concat_prompt(prompts: torch.Tensor, embeds: torch.Tensor, attention_mask: torch.Tensor):
    """PEFT's prompt-tuning layout, the reference the shared-prefix paths are tested against.

    Args:
        prompts: ``(B, l, d)`` prompt rows, one prompt per row of the batch.
        embeds: ``(B, n, d)`` input token embeddings, in the backbone's dtype (the prompts are
            cast to it, e.g. a float32 prompt before a bfloat16 model).
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
    return torch.cat([prompts.to(embeds.dtype), embeds], 1), mask


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
        prompt: module mapping ``task_ids (B,)`` to prompts ``(B, l, d)``. Its dtype may differ
            from the model's (float32 prompts on a bfloat16 model, as the trainer keeps them): the
            rows are cast to the model's dtype as they enter it, and gradients reach the prompt's
            parameters in their own dtype.
        share_prefix: pack each distinct task's prompt once per batch (default) or concatenate.
    """

    def __init__(self, model: nn.Module, prompt: nn.Module, *, share_prefix: bool = True):
        super().__init__()
        self.entry = entry_for(model.config)
        warn_on_fallback(model)
        self.logit_softcap = self.entry.logit_softcap(model.config)  # final soft-capping of the logits, or None
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
        logits = self.entry.logits(self.model, hidden) if return_logits else None
        loss = None
        if labels is not None:
            # predictors[b, j]: the hidden state that predicts token j of row b; the fused loss drops
            # ignored rows and never builds a (tokens, vocab) logits tensor
            h = predictors.reshape(-1, predictors.shape[-1])
            loss = self.head_loss(h, h.detach(), labels.reshape(-1), kl_weight=0.0, ce_weight=1.0)
        return PromptedLMOutput(hidden, logits, loss, predictors)

    def head_loss(self, student_hidden, teacher_hidden, labels, **kwargs):
        """:func:`mptkern.ops.fused_distill_loss` of hidden rows ``(N, d)`` (and labels ``(N,)``)
        through this model's frozen lm_head and its final soft-capping; ``kwargs`` are the loss's
        weights, temperature and reduction."""
        return fused_distill_loss(student_hidden, teacher_hidden, self.model.lm_head.weight, labels,
                                  logit_softcap=self.logit_softcap, **kwargs)

    def _forward_shared(self, input_ids, real, task_ids):
        B, n = input_ids.shape
        # the layout on the host, in one read: each row's real length and task; and the flat index
        # of every real token (one more), which every gather and scatter below reuses
        lengths, task_list = torch.stack([real.sum(1), task_ids.to(real.device)]).tolist()
        flat = real.view(-1).nonzero().squeeze(1)
        tasks = sorted(set(task_list))
        slot_of = {t: i for i, t in enumerate(tasks)}
        slot = [slot_of[t] for t in task_list]
        U, l, d = len(tasks), self.prompt.prompt_len, self.prompt.hidden_size
        dev = input_ids.device
        pack = PromptPack(U, l, plan_prefix_attention([l] * U + lengths, [-1] * U + slot, prefix_shape=(U, l), device=dev))
        # one stream: each task's prompt once, then the real tokens row-major; both are written in
        # place, the prompt rows by the prompt module (the fused op for MultitaskPrompt), no cat pass
        embed = self.model.get_input_embeddings()
        dtype = embed.weight.dtype  # the backbone's: a float32 prompt on a bf16 model enters it cast
        stream = torch.empty(U * l + flat.numel(), d, dtype=dtype, device=embed.weight.device)
        tokens = input_ids.view(-1).index_select(0, flat)
        if type(embed) is nn.Embedding:  # a plain lookup: straight into the stream
            torch.index_select(embed.weight, 0, tokens, out=stream[U * l :])
        else:  # e.g. Gemma's embeddings scaled by sqrt(d) in the module
            stream[U * l :] = embed(tokens)
        slots = torch.tensor(tasks, device=dev)
        if self.prompt.dtype == dtype:
            stream = self.prompt.write_rows(slots, stream, torch.arange(U, device=dev) * l)
        else:  # the (U, l, d) prompt rows in the prompt's dtype, cast as they are copied in
            stream[: U * l] = self.prompt(slots).flatten(0, 1)
        token_pos = (real.cumsum(1) + (l - 1)).view(-1).index_select(0, flat)
        positions = torch.cat([torch.arange(l, device=dev).repeat(U), token_pos])
        h = run_decoder(self.model, stream, positions, pack)
        # token 0 of each row is predicted by its prompt's last row, token j by token j-1
        pred_rows = torch.arange(U * l, h.shape[0], device=dev) - 1
        starts = torch.tensor(pack.plan.cu_seqlens_host[U:-1], device=dev) - U * l
        pred_rows[starts] = torch.tensor(slot, device=dev) * l + l - 1
        padded = lambda rows: h.new_zeros(B * n, d).index_copy_(0, flat, rows).view(B, n, d)  # noqa: E731
        return padded(h[U * l:]), padded(h.index_select(0, pred_rows))

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
        with attention_implementation(self.model, self.entry.reference_attention):
            out = self.model.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
        h = out.last_hidden_state
        inverse = torch.argsort(order, dim=1)
        take = lambda x: x.gather(1, inverse[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
        return take(h[:, l:]), take(h[:, l - 1 : -1])
