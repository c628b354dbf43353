"""Checks of the public entry points' arguments: shapes, dtypes and devices always; values where
reading them costs no device sync (host lists, CPU tensors), or once, when a plan is made. Every
check raises ValueError naming the argument."""

from __future__ import annotations

import torch


def _check_keys(q, hkv, whose, **keys):
    """GQA heads and the keys' dtype and device against q."""
    if hkv == 0 or q.shape[1] % hkv:
        raise ValueError(f"q's heads ({q.shape[1]}) must be a multiple of {whose} heads ({hkv})")
    for name, t in keys.items():
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device} but q is {q.dtype} on {q.device}")


def _validate_prefix(q, B, hkv, prefix_k, prefix_v, prefix_ids, prefix_lens, window, sinks, prefix_tables=None):
    """The checks prefill and decode share: the prefix tensors against q's dtype/device, ``B``
    sequences and ``Hkv`` heads; the window; the sinks. With ``prefix_tables`` (paged decode) the
    prefix tensors are block pools and the tables' rows count the prefixes. Raises ValueError."""
    hq, dim = q.shape[1:]

    if (prefix_k is None) != (prefix_v is None) or (prefix_k is None) != (prefix_ids is None):
        raise ValueError("prefix_k, prefix_v and prefix_ids must be given together")
    if prefix_k is not None:
        layout = "(P, Lp" if prefix_tables is None else "pools (num_blocks, block_size"
        if prefix_k.dim() != 4 or prefix_k.shape[2:] != (hkv, dim) or prefix_v.shape != prefix_k.shape:
            raise ValueError(f"prefix_k and prefix_v must have shape {layout}, Hkv={hkv}, D={dim}), "
                 f"got {tuple(prefix_k.shape)} and {tuple(prefix_v.shape)}")
        for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
            if t.dtype != q.dtype or t.device != q.device:
                raise ValueError(f"{name} is {t.dtype} on {t.device} but q is {q.dtype} on {q.device}")
        P = prefix_k.shape[0] if prefix_tables is None else prefix_tables.shape[0]
        if prefix_ids.shape != (B,) or prefix_ids.dtype.is_floating_point or prefix_ids.dtype == torch.bool:
            raise ValueError(f"prefix_ids must be an integer tensor of shape (B={B},), got {prefix_ids.dtype} {tuple(prefix_ids.shape)}")
        if prefix_lens is not None and (prefix_lens.shape != (P,) or prefix_lens.dtype.is_floating_point):
            raise ValueError(f"prefix_lens must be an integer tensor of shape (P={P},), got {prefix_lens.dtype} {tuple(prefix_lens.shape)}")
    elif prefix_lens is not None:
        raise ValueError("prefix_lens given without prefix_k")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if sinks is not None and (sinks.shape != (hq,) or sinks.device != q.device):
        raise ValueError(f"sinks must have shape (Hq={hq},) on {q.device}, got {tuple(sinks.shape)} on {sinks.device}")


def _validate(q, k, v, cu, prefix_k, prefix_v, prefix_ids, prefix_lens, window, sinks):
    """Shapes, dtypes and devices of a prefill/training call (its values are checked by its plan)."""
    if q.dim() != 3:
        raise ValueError(f"q must have shape (N, Hq, D), got {tuple(q.shape)}")
    N, hq, dim = q.shape
    if N == 0:
        raise ValueError("q is empty: expected (N, Hq, D) with N >= 1")
    if k.dim() != 3 or k.shape[0] != N or k.shape[2] != dim or v.shape != k.shape:
        raise ValueError(f"k and v must have shape (N={N}, Hkv, D={dim}), got {tuple(k.shape)} and {tuple(v.shape)}")
    hkv = k.shape[1]
    _check_keys(q, hkv, "k's", k=k, v=v)
    if not q.dtype.is_floating_point:
        raise ValueError(f"q must be floating point, got {q.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 2 or cu.dtype not in (torch.int32, torch.int64) or cu.device != q.device:
        raise ValueError(f"cu_seqlens must be an int32 tensor of shape (B+1,) on {q.device}, got {cu.dtype} {tuple(cu.shape)} on {cu.device}")
    _validate_prefix(q, cu.shape[0] - 1, hkv, prefix_k, prefix_v, prefix_ids, prefix_lens, window, sinks)


def _check_prefix_values(prefix_k, prefix_ids, prefix_lens):
    if prefix_k is not None:
        _check_prefix_ranges(prefix_k.shape[0], prefix_k.shape[1], prefix_ids, prefix_lens)


def _check_prefix_ranges(P, Lp, prefix_ids, prefix_lens, lp_name="Lp"):
    if prefix_ids.numel():
        lo, hi = (int(x) for x in torch.aminmax(prefix_ids))
        if lo < -1 or hi >= P:
            raise ValueError(f"prefix_ids must lie in [-1, {P}) (-1: no prefix), got values in [{lo}, {hi}]")
    if prefix_lens is not None and prefix_lens.numel():
        lo, hi = (int(x) for x in torch.aminmax(prefix_lens))
        if lo < 0 or hi > Lp:
            raise ValueError(f"prefix_lens must lie in [0, {lp_name}={Lp}]")




def _validate_table(name, table, rows, device, what):
    if table.dtype not in (torch.int32, torch.int64) or table.dim() != 2 or table.shape[0] != rows or table.device != device:
        raise ValueError(f"{name} must be an int32 (or int64) tensor of shape ({what}={rows}, max_blocks) on {device}, "
                         f"got {table.dtype} {tuple(table.shape)} on {table.device}")


def _validate_decode(q, k_cache, v_cache, cache_lens, prefix_k, prefix_v, prefix_ids, prefix_lens, window, sinks,
                     block_tables=None, prefix_block_tables=None):
    """Shapes, dtypes and devices of a decode step (dense or paged), then the values, for CPU tensors
    only: reading a CUDA tensor's values is a host sync, which a decode step does not pay, so on the
    GPU (and under torch.compile) out-of-range values are not caught here. Raises ValueError."""
    if q.dim() != 3 or q.shape[0] == 0:
        raise ValueError(f"q must have shape (B, Hq, D) with B >= 1, got {tuple(q.shape)}")
    B, hq, dim = q.shape
    paged = block_tables is not None
    if not paged:
        if prefix_block_tables is not None:
            raise ValueError("prefix_block_tables given without block_tables: a paged prefix goes with a paged cache")
        if k_cache.dim() != 4 or k_cache.shape[0] != B or k_cache.shape[3] != dim or v_cache.shape != k_cache.shape:
            raise ValueError(f"k_cache and v_cache must have shape (B={B}, S, Hkv, D={dim}), got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    else:
        if k_cache.dim() != 4 or 0 in k_cache.shape[:2] or k_cache.shape[3] != dim or v_cache.shape != k_cache.shape:
            raise ValueError("with block_tables, k_cache and v_cache must be pools of shape (num_blocks >= 1, block_size >= 1, Hkv, "
                 f"D={dim}), got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
        _validate_table("block_tables", block_tables, B, q.device, "B")
        if block_tables.shape[1] == 0:
            raise ValueError("block_tables must have at least one column (every sequence holds at least its newest token)")
    hkv = k_cache.shape[2]
    _check_keys(q, hkv, "the cache's", k_cache=k_cache, v_cache=v_cache)
    if cache_lens.shape != (B,) or cache_lens.dtype.is_floating_point or cache_lens.device != q.device:
        raise ValueError(f"cache_lens must be an integer tensor of shape (B={B},) on {q.device}, got {cache_lens.dtype} {tuple(cache_lens.shape)}")
    if paged and prefix_k is not None:
        if prefix_block_tables is None:
            raise ValueError("with block_tables, the prefix must be paged too: pass prefix_block_tables (and prefix_lens) "
                 "with prefix_k/prefix_v as block pools, not a dense (P, Lp, Hkv, D) prefix")
        _validate_table("prefix_block_tables", prefix_block_tables, prefix_block_tables.shape[0], q.device, "P")
        if prefix_lens is None:
            raise ValueError("with prefix_block_tables, prefix_lens (P,) is required")
    elif prefix_block_tables is not None:
        raise ValueError("prefix_block_tables given without prefix_k, prefix_v and prefix_ids")
    _validate_prefix(q, B, hkv, prefix_k, prefix_v, prefix_ids, prefix_lens, window, sinks,
                     prefix_block_tables if paged else None)
    if paged and prefix_k is not None and prefix_k.shape[1] != k_cache.shape[1]:
        raise ValueError(f"the prefix pools' block_size ({prefix_k.shape[1]}) must equal the cache pools' ({k_cache.shape[1]})")
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        _check_decode_values(k_cache, cache_lens, prefix_k, prefix_ids, prefix_lens, block_tables, prefix_block_tables)


def _check_decode_values(k_cache, cache_lens, prefix_k, prefix_ids, prefix_lens, block_tables, prefix_block_tables):
    """The value checks of a decode step (host reads: CPU tensors only)."""
    lens = cache_lens.long()
    bs = k_cache.shape[1]
    cap, cap_name = (k_cache.shape[1], "S") if block_tables is None else (block_tables.shape[1] * bs, "max_blocks * block_size")
    lo, hi = (int(x) for x in torch.aminmax(lens))
    if lo < 1 or hi > cap:
        raise ValueError(f"cache_lens must lie in [1, {cap_name}={cap}], got values in [{lo}, {hi}]")
    if block_tables is None:
        _check_prefix_values(prefix_k, prefix_ids, prefix_lens)
        return
    _check_table_entries("block_tables", block_tables, lens, k_cache.shape[0], bs)
    if prefix_k is not None:
        P, max_pb = prefix_block_tables.shape
        _check_prefix_ranges(P, max_pb * bs, prefix_ids, prefix_lens, "max_prefix_blocks * block_size")
        _check_table_entries("prefix_block_tables", prefix_block_tables, prefix_lens.long(), prefix_k.shape[0], bs)


def _check_table_entries(name, table, lens, num_blocks, block_size):
    """Every entry a row uses (the first ceil(lens / block_size)) names a block of the pool."""
    in_use = torch.arange(table.shape[1])[None] * block_size < lens[:, None]
    bad = (in_use & ((table < 0) | (table >= num_blocks))).nonzero()
    if bad.numel():
        r, c = (int(x) for x in bad[0])
        raise ValueError(f"{name}[{r}, {c}] = {int(table[r, c])} is in use (row {r} holds {int(lens[r])} keys) but is "
                         f"not a block of the pool [0, {num_blocks})")


def _validate_planned(q, k, v, prefix_k, prefix_v, plan, window, sinks):
    """A :class:`PrefixAttentionPlan`'d call: shapes, dtypes and devices against the plan (no values)."""
    if q.dim() != 3 or q.shape[0] != plan.num_tokens or q.device != plan.device:
        raise ValueError(f"q must have shape (N={plan.num_tokens}, Hq, D) on the plan's device {plan.device}, "
                         f"got {tuple(q.shape)} on {q.device}")
    if (prefix_k is None) != (plan.prefix_shape is None):
        raise ValueError("prefix_k and prefix_v go with a plan made with prefix_ids (and prefix_shape)")
    if prefix_k is not None and tuple(prefix_k.shape[:2]) != plan.prefix_shape:
        raise ValueError(f"prefix_k must have shape (P, Lp) = {plan.prefix_shape} in front, as planned, "
                         f"got {tuple(prefix_k.shape)}")
    _validate(q, k, v, plan.cu_seqlens, prefix_k, prefix_v, plan.prefix_ids, plan.prefix_lens, window, sinks)


def _validate_planned_decode(q, k_cache, v_cache, prefix_k, prefix_v, plan, window, sinks):
    """A :class:`PagedDecodePlan`'d call: shapes, dtypes and devices against the plan (no values)."""
    if q.dim() != 3 or q.shape[0] != plan.batch or q.device != plan.cache_lens.device:
        raise ValueError(f"q must have shape (B={plan.batch}, Hq, D) on the plan's device {plan.cache_lens.device}, "
                         f"got {tuple(q.shape)} on {q.device}")
    want = (plan.num_blocks, plan.block_size)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if t is None:
            continue
        if t.dim() != 4 or tuple(t.shape[:2]) != want or t.shape[2:] != k_cache.shape[2:] or t.shape[3] != q.shape[2]:
            raise ValueError(f"{name} must be a pool of shape (num_blocks={want[0]}, block_size={want[1]}, Hkv, "
                             f"D={q.shape[2]}) like k_cache, got {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device} but q is {q.dtype} on {q.device}")
    if (prefix_k is None) != (prefix_v is None) or (prefix_k is None) != (plan.prefix_ids is None):
        raise ValueError("prefix_k and prefix_v go with a plan made with prefix_ids, prefix_lens and prefix_block_tables")
    hkv = k_cache.shape[2]
    if hkv == 0 or q.shape[1] % hkv:
        raise ValueError(f"q's heads ({q.shape[1]}) must be a multiple of the cache's heads ({hkv})")
    _validate_prefix(q, plan.batch, hkv, None, None, None, None, window, sinks)

