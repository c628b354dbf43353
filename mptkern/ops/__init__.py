"""Fused ops, one file each: torch path, Triton kernels, cuda (csrc/) path, autograd, dispatch."""

from mptkern.ops.decomposed_prompts import decomposed_prompts
from mptkern.ops.distill_loss import fused_distill_loss
from mptkern.ops.prefix_attention import PagedDecodePlan, plan_paged_decode, prefix_attention, prefix_attention_decode

__all__ = ["decomposed_prompts", "fused_distill_loss", "prefix_attention", "prefix_attention_decode", "plan_paged_decode",
           "PagedDecodePlan"]
