"""Plans: the layout of a batch, checked and prepared once on the host, then read by every layer.

FlashInfer's plan/run split: a model runs the same batch layout through all its layers (and the
backward), so whatever depends only on the layout (sequence bounds, prefix ids and lengths, the
kernels' tile schedules, the torch path's per-sequence bounds and masks) is built once, from
lengths the host already has, and a layer call reads nothing back from the device.

* :class:`PrefixAttentionPlan` (:func:`plan_prefix_attention`): a packed varlen batch for
  :func:`mptkern.ops.prefix_attention` (training, prefill).
* :class:`PagedDecodePlan` (:func:`plan_paged_decode`): one paged decode step for
  :func:`mptkern.ops.prefix_attention_decode`.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import torch

from mptkern.ops.prefix_attention.validate import _check_prefix_ranges, _check_table_entries, _validate_table


def _ints(name: str, values, n: int | None = None) -> list[int]:
    try:
        out = [int(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of ints, got {values!r:.80}") from None
    if any(isinstance(v, bool) or int(v) != v for v in values):
        raise ValueError(f"{name} must hold ints, got {values!r:.80}")
    if n is not None and len(out) != n:
        raise ValueError(f"{name} must have {n} entries, got {len(out)}")
    return out


@dataclasses.dataclass(eq=False)
class PrefixAttentionPlan:
    """The layout of one packed batch for :func:`mptkern.ops.prefix_attention`, made by
    :func:`plan_prefix_attention`: B sequences packed back to back, sequence b reading prefix
    ``seq_prefix[b]`` (-1: none) of the ``(P, Lp)`` prefix tensors (``prefix_shape``), whose first
    ``prefix_rows[p]`` rows are valid.

    Its values were checked when it was made; the device tensors the kernels take (``cu_seqlens``
    (B+1,), ``prefix_ids`` (B,), ``prefix_lens`` (P,), int32) were copied once; the Triton tile
    schedules and the torch path's masks are built on first use and kept, so every later layer and
    the backward reuse them."""

    seqlens: tuple[int, ...]
    cu_seqlens_host: tuple[int, ...]  # (B+1,) the sequences' bounds, on the host
    seq_prefix: tuple[int, ...]
    prefix_rows: tuple[int, ...]
    prefix_shape: tuple[int, int] | None
    cu_seqlens: torch.Tensor
    prefix_ids: torch.Tensor | None
    prefix_lens: torch.Tensor | None
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.cu_seqlens_host[-1]

    @property
    def batch(self) -> int:
        return len(self.seqlens)

    @property
    def device(self) -> torch.device:
        return self.cu_seqlens.device

    @property
    def max_seqlen(self) -> int:
        return max(self.seqlens)

    def seq_prefix_len(self, b: int) -> int:
        p = self.seq_prefix[b]
        return self.prefix_rows[p] if p >= 0 else 0

    def _cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def torch_rows(self) -> list[tuple[int, int, int, int]]:
        """(start, end, prefix id, prefix length) of every non-empty sequence: the torch path's loop."""
        cu = self.cu_seqlens_host
        return self._cached("rows", lambda: [(cu[b], cu[b + 1], p, self.seq_prefix_len(b))
                                             for b, p in enumerate(self.seq_prefix) if self.seqlens[b]])

    def blocked_masks(self, window: int | None):
        """The torch path's mask, one boolean matrix that every sequence's mask is a slice of:
        ``blocked[i, j]`` is True where query i may not see key j, i.e. unless ``j <= Lmax + i``
        (and ``j > Lmax + i - window``). Both conditions depend only on ``j - i``, so a sequence of
        ``n`` tokens after ``L`` prefix keys takes ``blocked[:n, Lmax - L : Lmax + n]``. Returns
        ``(blocked, Lmax)``."""
        def build():
            n_max = self.max_seqlen
            l_max = max((self.seq_prefix_len(b) for b in range(self.batch)), default=0)
            i = torch.arange(n_max, device=self.device)[:, None]
            j = torch.arange(l_max + n_max, device=self.device)[None, :]
            allowed = j <= l_max + i
            if window is not None:
                allowed &= j > l_max + i - window
            return ~allowed, l_max
        return self._cached(("masks", window), build)

    def query_schedule(self, block_m: int) -> torch.Tensor:
        """(blocks, 2) int32 (sequence, first row) of every query block, the longest key ranges first."""
        def build():
            blocks = sorted((-(self.seq_prefix_len(b) + i0), b, i0)
                            for b, n in enumerate(self.seqlens) for i0 in range(0, n, block_m))
            return torch.tensor([(b, i0) for _, b, i0 in blocks], dtype=torch.int32).view(-1, 2).to(self.device)
        return self._cached(("query", block_m), build)

    def key_schedule(self, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Work items (own, src, j0, lo, hi) for the dK/dV kernel and the sequence order they index.

        Prefix items come first (each reduces over every sequence of its prefix, the longest work);
        ORDER holds the sequences sorted by prefix id (stable, so the reduction order is the batch
        order within a prefix), then 0..B-1 for the own-key items."""
        def build():
            lens, pids = self.seqlens, self.seq_prefix
            users = sorted((p, b) for b, p in enumerate(pids) if p >= 0 and lens[b] > 0)
            order = [b for _, b in users]
            items = []
            i = 0
            while i < len(users):
                p, j = users[i][0], i
                while j < len(users) and users[j][0] == p:
                    j += 1
                items += [(0, p, j0, i, j) for j0 in range(0, self.prefix_rows[p], block_n)]
                i = j
            own = sorted((-(n - j0), b, j0) for b, n in enumerate(lens) for j0 in range(0, n, block_n))
            items += [(1, b, j0, len(order) + b, len(order) + b + 1) for _, b, j0 in own]
            order += range(self.batch)
            return (torch.tensor(items, dtype=torch.int32).view(-1, 5).to(self.device),
                    torch.tensor(order, dtype=torch.int32).to(self.device))
        return self._cached(("keys", block_n), build)


def plan_prefix_attention(seqlens: Sequence[int], prefix_ids: Sequence[int] | None = None, *,
                          prefix_lens: Sequence[int] | None = None, prefix_shape: tuple[int, int] | None = None,
                          device=None) -> PrefixAttentionPlan:
    """Check and prepare a packed batch's layout once, for :func:`mptkern.ops.prefix_attention`
    ``(plan=)`` calls: every layer of a forward and its backward.

    Args:
        seqlens: host ints >= 0, the B sequences' lengths (packed back to back, N = their sum >= 1).
        prefix_ids: host ints, each sequence's prefix in ``[-1, P)`` (-1: none); None: no prefixes.
        prefix_lens: host ints in ``[0, Lp]``, the valid rows of each of the P prefixes (default Lp).
        prefix_shape: ``(P, Lp)``, the leading dims of the ``prefix_k``/``prefix_v`` the calls pass;
            required with ``prefix_ids``.
        device: where the calls' tensors live.

    Raises ValueError naming the argument. No device is read: everything comes from the host."""
    seqlens = _ints("seqlens", seqlens)
    if not seqlens or min(seqlens) < 0 or sum(seqlens) == 0:
        raise ValueError(f"seqlens must hold B >= 1 lengths >= 0 with a positive sum, got {seqlens[:12]}")
    B = len(seqlens)
    if (prefix_ids is None) != (prefix_shape is None):
        raise ValueError("prefix_ids and prefix_shape go together (prefix_shape: the (P, Lp) of prefix_k)")
    if prefix_ids is None:
        if prefix_lens is not None:
            raise ValueError("prefix_lens given without prefix_ids")
        pids, plens = [-1] * B, []
    else:
        P, Lp = _ints("prefix_shape", prefix_shape, 2)
        pids = _ints("prefix_ids", prefix_ids, B)
        if pids and (min(pids) < -1 or max(pids) >= P):
            raise ValueError(f"prefix_ids must lie in [-1, {P}) (-1: no prefix), got values in [{min(pids)}, {max(pids)}]")
        plens = [Lp] * P if prefix_lens is None else _ints("prefix_lens", prefix_lens, P)
        if plens and (min(plens) < 0 or max(plens) > Lp):
            raise ValueError(f"prefix_lens must lie in [0, Lp={Lp}]")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    i32 = lambda v: torch.tensor(v, dtype=torch.int32, device=dev)  # noqa: E731
    has = prefix_ids is not None
    cu = tuple(itertools.accumulate(seqlens, initial=0))
    return PrefixAttentionPlan(tuple(seqlens), cu, tuple(pids), tuple(plens), (P, Lp) if has else None, i32(cu),
                               i32(pids) if has else None, i32(plens) if has else None)


def plan_from_tensors(cu_seqlens, prefix_ids, prefix_lens, prefix_k, num_tokens: int) -> PrefixAttentionPlan:
    """The plan of a call given tensors (one host read of each): what :func:`prefix_attention` does
    without ``plan=``."""
    c = cu_seqlens.tolist()
    if c[0] != 0 or c[-1] != num_tokens or any(a > b for a, b in zip(c, c[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to N={num_tokens}, got "
                         f"{c if len(c) <= 12 else c[:6] + ['...'] + c[-3:]}")
    has = prefix_k is not None
    return plan_prefix_attention([b - a for a, b in zip(c, c[1:])], prefix_ids.tolist() if has else None,
                                 prefix_lens=prefix_lens.tolist() if has and prefix_lens is not None else None,
                                 prefix_shape=tuple(prefix_k.shape[:2]) if has else None, device=cu_seqlens.device)


def _flat_rows(tables, lens, block_size):
    """Flat pool rows (``block * block_size + offset``) of every row a table addresses, in order,
    ``(R, max_blocks * block_size)`` long, and the mask of the rows at or past ``lens`` (R,), which
    point at row 0 (entries past ``ceil(lens / block_size)`` are not read)."""
    pos = torch.arange(tables.shape[1] * block_size, device=tables.device)
    past = pos[None] >= lens[:, None]
    rows = tables.long().repeat_interleave(block_size, 1) * block_size + pos % block_size
    return rows.masked_fill(past, 0), past


@dataclasses.dataclass(frozen=True, eq=False)
class _PagedTorchLayout:
    """What the torch path of a paged decode step reads, made once per plan: the flat pool rows of
    each sequence's own keys (``own``, ``own_past``: (B, S)) and their count (``own_lens``: (B,)),
    and of each prefix's keys (``pre``, ``pre_past``: (P, Lp)); the queries stacked per prefix, ``n``
    slots per prefix (``q_index``: (P * n,) sequence of each slot, padding slots repeat sequence 0),
    ``slot`` (B,): each sequence's slot, ``P * n`` for a sequence without a prefix;
    ``slot_lens``/``slot_plens`` (P * n,): the cache and prefix length of each slot (for windows).

    ``pre`` is None without prefixes, and also when no two sequences of the step share one and the
    prefixes' blocks are in the caches' pool: the cascade would then read each prefix once per
    sequence anyway, so ``own`` holds each sequence's prefix rows followed by its cache's
    (``own_lens`` = prefix + cache length) and one softmax replaces two and their merge."""

    own: torch.Tensor
    own_past: torch.Tensor
    own_lens: torch.Tensor
    pre: torch.Tensor | None = None
    pre_past: torch.Tensor | None = None
    n: int = 0
    q_index: torch.Tensor | None = None
    slot: torch.Tensor | None = None
    slot_lens: torch.Tensor | None = None
    slot_plens: torch.Tensor | None = None

    @staticmethod
    def build(tables, lens, block_size, prefix_tables, prefix_lens, host_prefix, one_pool):
        own, own_past = _flat_rows(tables, lens, block_size)
        if host_prefix is None:
            return _PagedTorchLayout(own, own_past, lens)
        pids, plens = host_prefix
        groups = [[] for _ in plens]
        for b, p in enumerate(pids):
            if p >= 0 and plens[p] > 0:
                groups[p].append(b)
        n = max(map(len, groups), default=0)
        if n == 0:
            return _PagedTorchLayout(own, own_past, lens)
        P, dev = len(plens), lens.device
        pre, pre_past = _flat_rows(prefix_tables, prefix_lens, block_size)
        if n == 1 and one_pool:  # no prefix shared: [prefix | cache] rows per sequence, key t at position t
            L = torch.tensor([plens[p] if p >= 0 else 0 for p in pids], device=dev)
            t = torch.arange(pre.shape[1] + own.shape[1], device=dev)
            in_prefix = t[None] < L[:, None]
            from_prefix = pre[torch.tensor([max(p, 0) for p in pids], device=dev)][:, t.clamp(max=pre.shape[1] - 1)]
            from_cache = own.gather(1, (t[None] - L[:, None]).clamp(0, own.shape[1] - 1))
            total = L + lens
            past = t[None] >= total[:, None]
            return _PagedTorchLayout(torch.where(in_prefix, from_prefix, from_cache).masked_fill_(past, 0), past, total)
        q_index = [b for members in groups for b in members + [0] * (n - len(members))]
        slot = [P * n] * len(pids)
        for p, members in enumerate(groups):
            for j, b in enumerate(members):
                slot[b] = p * n + j
        q_index = torch.tensor(q_index, device=dev)
        return _PagedTorchLayout(own, own_past, lens, pre, pre_past, n, q_index, torch.tensor(slot, device=dev),
                                 lens[q_index], prefix_lens.repeat_interleave(n))


@dataclasses.dataclass(frozen=True, eq=False)
class PagedDecodePlan:
    """The layout of one paged decode step, checked and prepared once for every layer that reads it
    (an engine step runs the same plan through all its layers): the int32 tensors the kernels take,
    ``block_size`` and ``num_blocks`` of the pools they index, and for the torch path the pool
    coordinates of every key it reads and the queries grouped by prefix (``torch_layout``, built from
    host lists), so its layers never read the device. Made by :func:`plan_paged_decode`."""

    cache_lens: torch.Tensor
    block_tables: torch.Tensor
    prefix_ids: torch.Tensor | None
    prefix_lens: torch.Tensor | None
    prefix_block_tables: torch.Tensor | None
    block_size: int
    num_blocks: int
    host_prefix: tuple[list[int], list[int]] | None  # prefix_ids, prefix_lens on the host
    _layouts: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def batch(self) -> int:
        return self.cache_lens.shape[0]

    def torch_layout(self, one_pool: bool) -> _PagedTorchLayout:
        """The torch path's layout, built on its first use and kept (the Triton kernels read the
        tables themselves). ``one_pool``: the prefixes' blocks live in the caches' pool (the same
        tensors), so one row index can address both."""
        if one_pool not in self._layouts:
            self._layouts[one_pool] = _PagedTorchLayout.build(
                self.block_tables, self.cache_lens.long(), self.block_size, self.prefix_block_tables,
                self.prefix_lens.long() if self.host_prefix is not None else None, self.host_prefix, one_pool)
        return self._layouts[one_pool]


def plan_paged_decode(cache_lens, block_tables, *, block_size: int, num_blocks: int, prefix_ids=None,
                      prefix_lens=None, prefix_block_tables=None, device=None) -> PagedDecodePlan:
    """Check and prepare a paged decode layout once, for :func:`prefix_attention_decode` ``(plan=)``
    calls on pools of ``num_blocks`` blocks of ``block_size`` rows (the cache's and, if any, the
    prefix's pool). Arguments as in :func:`prefix_attention_decode` (the prefix ones go together),
    each a tensor or a host list (tables: lists of equal-length rows; lists are made into int32
    tensors on ``device``). Given as lists, ``prefix_ids`` and ``prefix_lens`` are kept on the host
    for the torch path; given as tensors they are read once here (a host sync on a GPU). Values are
    checked for CPU tensors only. Raises ValueError."""
    if block_size < 1 or num_blocks < 1:
        raise ValueError(f"block_size and num_blocks must be >= 1, got {block_size} and {num_blocks}")
    host = [x if isinstance(x, (list, tuple)) else None for x in (prefix_ids, prefix_lens)]
    as32 = lambda t: t if t is None or torch.is_tensor(t) else torch.tensor(t, dtype=torch.int32, device=device)  # noqa: E731
    cache_lens, block_tables, prefix_ids, prefix_lens, prefix_block_tables = (
        as32(t) for t in (cache_lens, block_tables, prefix_ids, prefix_lens, prefix_block_tables))
    if cache_lens.dim() != 1 or cache_lens.shape[0] == 0 or cache_lens.dtype.is_floating_point:
        raise ValueError(f"cache_lens must be a non-empty 1-D integer tensor, got {cache_lens.dtype} {tuple(cache_lens.shape)}")
    B, dev = cache_lens.shape[0], cache_lens.device
    _validate_table("block_tables", block_tables, B, dev, "B")
    if block_tables.shape[1] == 0:
        raise ValueError("block_tables must have at least one column (every sequence holds at least its newest token)")
    given = [t is not None for t in (prefix_ids, prefix_lens, prefix_block_tables)]
    if any(given) and not all(given):
        raise ValueError("prefix_ids, prefix_lens and prefix_block_tables go together")
    if all(given):
        _validate_table("prefix_block_tables", prefix_block_tables, prefix_block_tables.shape[0], dev, "P")
        P = prefix_block_tables.shape[0]
        for name, t, n in (("prefix_ids", prefix_ids, B), ("prefix_lens", prefix_lens, P)):
            if t.shape != (n,) or t.dtype.is_floating_point or t.device != dev:
                raise ValueError(f"{name} must be an integer tensor of shape ({n},) on {dev}, got {t.dtype} {tuple(t.shape)}")
    lens = cache_lens.long()
    if dev.type == "cpu" and not torch.compiler.is_compiling():
        cap = block_tables.shape[1] * block_size
        lo, hi = (int(x) for x in torch.aminmax(lens))
        if lo < 1 or hi > cap:
            raise ValueError(f"cache_lens must lie in [1, max_blocks * block_size={cap}], got values in [{lo}, {hi}]")
        _check_table_entries("block_tables", block_tables, lens, num_blocks, block_size)
        if all(given):
            _check_prefix_ranges(P, prefix_block_tables.shape[1] * block_size, prefix_ids, prefix_lens,
                                 "max_prefix_blocks * block_size")
            _check_table_entries("prefix_block_tables", prefix_block_tables, prefix_lens.long(), num_blocks, block_size)
    host_prefix = None
    if all(given):
        host_prefix = tuple(list(h) if h is not None else t.tolist() for h, t in zip(host, (prefix_ids, prefix_lens)))
    to32 = lambda t: t.to(torch.int32) if t is not None else None  # noqa: E731
    return PagedDecodePlan(to32(cache_lens), to32(block_tables), to32(prefix_ids), to32(prefix_lens),
                           to32(prefix_block_tables), block_size, num_blocks, host_prefix)

