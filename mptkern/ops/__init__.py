"""Fused ops, one file each: torch path, Triton kernels, cuda (csrc/) path, autograd, dispatch."""

from mptkern.ops.decomposed_prompts import decomposed_prompts
from mptkern.ops.prefix_attention import prefix_attention

__all__ = ["decomposed_prompts", "prefix_attention"]
