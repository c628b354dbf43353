"""The frozen teachers' outputs, computed once before distillation.

Distillation compares the student with the teachers at the label positions of source examples. The
teachers and the backbone are frozen and the examples fixed, so each example's teacher hidden states
(``predictor_hidden`` at its label positions: the states that predict its target tokens) are the
same at every step. :func:`build_teacher_cache` computes them in large no-grad batches; a step then
runs only the student and reads its batch's rows with :meth:`TeacherCache.rows`.

Modes (``DistillConfig.teacher_cache``): ``memory`` keeps the rows on the trainer's device;
``disk`` writes them as safetensors shards under the output folder and reads a batch's rows back;
``auto`` recomputes (no cache) when the stage's batches visit each example less than twice on
average, since a cache then saves no teacher pass (the CPU demo's 30 x 8 draws over 448 examples:
measured 10% slower cached, in ``bench/results/recipe.csv``), else picks memory when the rows take
at most a quarter of the free memory of the device (host RAM on CPU), else disk; ``off`` (no
cache) recomputes the teachers every step.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

MODES = ("auto", "memory", "disk", "off")
SHARD_BYTES = 256 << 20


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not POSIX: assume it fits
        return 1 << 62


class TeacherCache:
    """Teacher rows per source example. ``rows(indices)`` -> ``(sum of the examples' label counts, d)``
    on ``device``: example ``indices[0]``'s label positions in order, then ``indices[1]``'s, ...,
    the order in which ``predictor_hidden[labels != -100]`` lists a batch of those examples."""

    def __init__(self, device: torch.device, memory: dict[int, torch.Tensor] | None = None,
                 shards: list[Path] | None = None, shard_of: dict[int, int] | None = None):
        self.device = device
        self._memory, self._shards, self._shard_of = memory, shards, shard_of
        self.mode = "memory" if memory is not None else "disk"

    def rows(self, indices) -> torch.Tensor:
        missing = [i for i in indices if i not in (self._memory if self._memory is not None else self._shard_of)]
        if missing:
            raise KeyError(f"examples {missing[:5]} were not cached")
        if self._memory is not None:
            return torch.cat([self._memory[i] for i in indices])
        from safetensors import safe_open

        wanted: dict[int, list[int]] = {}
        for i in indices:
            wanted.setdefault(self._shard_of[i], []).append(i)
        got = {}
        for shard, members in wanted.items():
            with safe_open(str(self._shards[shard]), framework="pt", device="cpu") as f:
                got.update((i, f.get_tensor(str(i))) for i in members)
        return torch.cat([got[i] for i in indices]).to(self.device)


@torch.no_grad()
def build_teacher_cache(teacher_lm, collate, examples, batches, *, device: torch.device, mode: str = "auto",
                        folder: str | os.PathLike | None = None, batch_size: int = 32,
                        disable_bar: bool = False) -> TeacherCache | None:
    """Run ``teacher_lm`` (a ``PromptedLM`` over the teacher prompts) once over every example the
    stage's ``batches`` (lists of indices into ``examples``) use, so the cache never costs more
    teacher passes than recomputing, in no-grad batches of ``batch_size``; returns the cache keyed
    by example index, or None when the teachers are to be recomputed (``off``, or ``auto`` with
    fewer than two visits per example). ``collate``: the distillation stage's
    :class:`mptkern.data.Collator`; ``folder``: where ``disk`` writes its shards (required for
    ``disk`` and ``auto``)."""
    if mode not in MODES:
        raise ValueError(f"teacher_cache must be one of {MODES}, got {mode!r}")
    indices = sorted({i for batch in batches for i in batch})
    if not indices:
        raise ValueError("no source examples to cache")
    if mode == "auto" and sum(map(len, batches)) < 2 * len(indices):
        mode = "off"  # each example is seen about once: a cache would save no teacher pass
    if mode == "off":
        return None
    if mode == "auto":
        labels = sum(sum(lab != -100 for lab in collate.encode(examples[i])[1]) for i in indices)
        param = next(teacher_lm.prompt.parameters())
        need = labels * param.shape[-1] * param.element_size()
        mode = "memory" if need <= _free_bytes(device) // 4 else "disk"
    if mode == "disk":
        if folder is None:
            raise ValueError("teacher_cache 'disk' needs a folder for its shards")
        folder = Path(folder)
        shutil.rmtree(folder, ignore_errors=True)  # a cache belongs to one run of the stage
        folder.mkdir(parents=True)
    memory, shards, shard_of, pending, pending_bytes = {}, [], {}, {}, 0

    def flush():
        nonlocal pending, pending_bytes
        from safetensors.torch import save_file

        path = folder / f"shard-{len(shards):05d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(pending, str(tmp))
        os.replace(tmp, path)
        shards.append(path)
        pending, pending_bytes = {}, 0

    for start in tqdm(range(0, len(indices), batch_size), desc="teacher cache", unit="batch", disable=disable_bar):
        chunk = indices[start : start + batch_size]
        b = {k: v.to(device) for k, v in collate([examples[i] for i in chunk]).items()}
        out = teacher_lm(b["input_ids"], b["attention_mask"], b["task_ids"], return_logits=False)
        valid = b["labels"] != -100
        for row, i in enumerate(chunk):
            h = out.predictor_hidden[row][valid[row]]
            if mode == "memory":
                memory[i] = h.clone()
                continue
            pending[str(i)] = h.to("cpu").contiguous()
            pending_bytes += h.numel() * h.element_size()
            shard_of[i] = len(shards)
            if pending_bytes >= SHARD_BYTES:
                flush()
    if mode == "memory":
        return TeacherCache(device, memory=memory)
    if pending:
        flush()
    return TeacherCache(device, shards=shards, shard_of=shard_of)
