"""Fused ops: the public functions of each op (its torch path, Triton kernels, cuda (csrc/) path, autograd and dispatch)."""

from mptkern.ops.decomposed_prompts import decomposed_prompts
from mptkern.ops.distill_loss import fused_distill_loss
from mptkern.ops.prefix_attention import (PagedDecodePlan, PrefixAttentionPlan, plan_paged_decode, plan_prefix_attention,
                                         prefix_attention, prefix_attention_decode)

__all__ = ["decomposed_prompts", "fused_distill_loss", "prefix_attention", "prefix_attention_decode", "plan_prefix_attention",
           "PrefixAttentionPlan", "plan_paged_decode", "PagedDecodePlan"]
