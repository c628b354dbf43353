"""Fused ops, one file each: torch path, Triton kernels, cuda (csrc/) path, autograd, dispatch."""

from mptkern.ops.decomposed_prompts import decomposed_prompts

__all__ = ["decomposed_prompts"]
