"""The engine's paged K/V memory: one pool of fixed-size blocks shared by every layer, and the
per-task prefix entries that live in it.

A block holds ``block_size`` consecutive token positions of one sequence at every layer; the pool is
one tensor ``(2, layers, num_blocks, block_size, Hkv, D)`` (K then V), allocated once from a memory
budget. A request owns the blocks of its own tokens (its block table); a task's prompt K/V fills
blocks that every request of the task reads through the prefix block table, stored once and
reference-counted by the requests using it; a prefix nobody uses stays cached until its blocks are
needed, then the least recently used one is evicted. Written here rather than taken from vLLM: its
block manager is part of its scheduler and engine, not a library a small engine can use.
"""

from __future__ import annotations

import dataclasses
import math

import torch

__all__ = ["PagedKVCache", "Prefix"]


@dataclasses.dataclass(eq=False)
class Prefix:
    """A task's prompt K/V in the pool: ``length`` positions in ``blocks``; ``users`` requests hold it."""

    blocks: list[int]
    length: int
    users: int = 0
    last_used: int = 0


class PagedKVCache:
    """Fixed-size K/V blocks for every layer, a free list and the prefix entries.

    Args:
        num_layers, num_kv_heads, head_dim: the model's attention shape.
        block_size: token positions per block.
        num_blocks: blocks in the pool (see :meth:`blocks_for_memory`).
        dtype, device: the pool's.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, num_blocks: int,
                 dtype: torch.dtype, device: torch.device):
        if block_size < 1 or num_blocks < 1:
            raise ValueError(f"block_size and num_blocks must be >= 1, got {block_size} and {num_blocks}")
        self.block_size, self.num_blocks = block_size, num_blocks
        # zeros, not empty: unwritten rows are masked out, but 0 * NaN garbage would still be NaN
        self.pool = torch.zeros(2, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out the lowest id first
        self.prefixes: dict[str, Prefix] = {}
        self._tick = 0
        self.peak_used = 0

    @staticmethod
    def block_bytes(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block takes (K and V, every layer)."""
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    @classmethod
    def blocks_for_memory(cls, gib: float, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                          dtype: torch.dtype) -> int:
        """How many blocks ``gib`` GiB hold."""
        return int(gib * 2**30) // cls.block_bytes(num_layers, num_kv_heads, head_dim, block_size, dtype)

    def blocks_needed(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s K and V pools, ``(num_blocks, block_size, Hkv, D)`` each."""
        return self.pool[0, i], self.pool[1, i]

    def flat_layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s pools as rows ``(num_blocks * block_size, Hkv, D)``: position p of block b is row
        ``b * block_size + p``."""
        k, v = self.layer(i)
        return k.flatten(0, 1), v.flatten(0, 1)

    def slots(self, blocks: list[int], start: int, stop: int) -> list[int]:
        """Flat rows of positions ``start..stop-1`` of a sequence stored in ``blocks``."""
        bs = self.block_size
        return [blocks[p // bs] * bs + p % bs for p in range(start, stop)]

    # -- allocation -------------------------------------------------------------------------------
    def evictable(self, keep: str | None = None) -> int:
        """Blocks that evicting idle prefixes (other than ``keep``'s) would free."""
        return sum(len(p.blocks) for name, p in self.prefixes.items() if not p.users and name != keep)

    def allocate(self, n: int, keep: str | None = None) -> list[int] | None:
        """``n`` blocks, evicting idle prefixes least recently used first (never ``keep``'s); None,
        with nothing changed, if they cannot be had."""
        if n > len(self._free) + self.evictable(keep):
            return None
        while len(self._free) < n:
            name = min((k for k, p in self.prefixes.items() if not p.users and k != keep),
                       key=lambda k: self.prefixes[k].last_used)
            self.free(self.prefixes.pop(name).blocks)
        got = [self._free.pop() for _ in range(n)]
        self.peak_used = max(self.peak_used, self.num_used)
        return got

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    # -- prefixes ---------------------------------------------------------------------------------
    def acquire(self, name: str) -> None:
        """One more request reads ``name``'s prefix."""
        p = self.prefixes[name]
        p.users += 1
        self._tick += 1
        p.last_used = self._tick

    def release(self, name: str) -> None:
        p = self.prefixes.get(name)
        if p is not None:
            p.users -= 1

    def drop_prefix(self, name: str) -> None:
        """Free ``name``'s prefix blocks (its users must be gone)."""
        p = self.prefixes.pop(name, None)
        if p is not None:
            self.free(p.blocks)
