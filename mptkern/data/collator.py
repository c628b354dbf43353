"""Collators: examples -> padded tensor batches with task ids, ready for ``PromptedLM``.

Training batches (:class:`Collator`) hold the source (instruction, input, answer cue) followed by
the target and EOS; ``labels`` are -100 on the source and on padding, so the loss covers the target
and its EOS only. Generation batches (:class:`GenerationCollator`) hold the source alone, left padded,
for batched greedy decoding.

Tokenization: the source is ``[special prefix] + tok(instruction + "\\n" + input) + tok("\\nAnswer:")``,
the target ``tok(" " + target) + [eos]``, each tokenized without special tokens; the special prefix is
whatever the tokenizer puts before a text (``<|begin_of_text|>`` for Llama 3, nothing for SmolLM2).
Both collators build the source the same way, so a generation prompt is exactly the training prefix.
When ``source + target`` exceeds ``max_length``, the instruction/input part is cut from its end (the
answer cue is kept); a target that alone does not fit is cut and loses its EOS.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mptkern.data.schema import ANSWER_CUE, Example

__all__ = ["Collator", "GenerationCollator"]


class _Base:
    def __init__(self, tokenizer, task_index: Mapping[str, int], max_length: int, padding_side: str):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id: targets must end with EOS")
        self.tokenizer = tokenizer
        self.task_index = dict(task_index)
        self.padding_side = padding_side
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.prefix = self._special_prefix(tokenizer)
        self.cue = self._ids(ANSWER_CUE)
        if max_length < len(self.prefix) + len(self.cue) + 2:
            raise ValueError(f"max_length={max_length} leaves no room for any input")
        self.max_length = max_length
        self.truncated = 0  # examples cut so far (source or target)

    @staticmethod
    def _special_prefix(tokenizer) -> list[int]:
        """Special tokens the tokenizer puts before a text (e.g. BOS), found by comparison."""
        plain = tokenizer("x", add_special_tokens=False)["input_ids"]
        full = tokenizer("x")["input_ids"]
        for i in range(len(full) - len(plain) + 1):
            if full[i : i + len(plain)] == plain:
                return list(full[:i])
        return []

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _task_id(self, ex: Example) -> int:
        try:
            return self.task_index[ex.task]
        except KeyError:
            raise KeyError(f"example of task {ex.task!r}, which is not in task_index {sorted(self.task_index)}") from None

    def _source(self, ex: Example, budget: int) -> list[int]:
        """Source ids (prefix, head cut to fit, cue) of at most ``budget`` tokens."""
        head = self._ids(f"{ex.instruction}\n{ex.input}" if ex.instruction else ex.input)
        room = budget - len(self.prefix) - len(self.cue)
        if len(head) > room:
            head = head[: max(room, 1)]
            self.truncated += 1
        return self.prefix + head + self.cue

    def _pad(self, rows: Sequence[list[int]], value: int) -> torch.Tensor:
        n = max(len(r) for r in rows)
        if self.padding_side == "right":
            return torch.tensor([r + [value] * (n - len(r)) for r in rows], dtype=torch.long)
        return torch.tensor([[value] * (n - len(r)) + r for r in rows], dtype=torch.long)


class Collator(_Base):
    """Training batches for ``PromptedLM.forward(input_ids, attention_mask, task_ids, labels)``.

    Args:
        tokenizer: a Hugging Face tokenizer with ``eos_token_id`` (``pad_token_id`` defaults to EOS).
        task_index: task name -> task id (the row of the prompt module).
        max_length: longest sequence (source + target + EOS) in tokens.
        padding_side: ``"right"`` (default) or ``"left"``; ``PromptedLM`` handles both.

    ``collator(examples)`` returns a dict of CPU tensors:
        ``input_ids (B, n) int64``, ``attention_mask (B, n) int64`` (1 on real tokens),
        ``labels (B, n) int64`` (target ids and EOS; -100 on source and padding),
        ``task_ids (B,) int64``, with ``n`` the longest row of the batch.

    Example::

        collate = Collator(tokenizer, {t.name: i for i, t in enumerate(tasks)}, max_length=128)
        batch = collate(tasks[0].train[:8])
        out = prompted_lm(**batch)  # out.loss
    """

    def __init__(self, tokenizer, task_index: Mapping[str, int], max_length: int = 256, padding_side: str = "right"):
        super().__init__(tokenizer, task_index, max_length, padding_side)

    def encode(self, ex: Example) -> tuple[list[int], list[int]]:
        """``(ids, labels)`` of one example, unpadded."""
        target = self._ids(" " + ex.target) + [self.eos_id]
        cap = self.max_length - len(self.prefix) - len(self.cue) - 1  # at least one input token stays
        if len(target) > cap:
            target = target[:cap]
            self.truncated += 1
        source = self._source(ex, self.max_length - len(target))
        return source + target, [-100] * len(source) + target

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        rows = [self.encode(ex) for ex in examples]
        ids = [r for r, _ in rows]
        return {
            "input_ids": self._pad(ids, self.pad_id),
            "attention_mask": self._pad([[1] * len(r) for r in ids], 0),
            "labels": self._pad([lab for _, lab in rows], -100),
            "task_ids": torch.tensor([self._task_id(ex) for ex in examples], dtype=torch.long),
        }


class GenerationCollator(_Base):
    """Generation batches: the source only (instruction, input, answer cue), left padded by default so
    that every row's next token is at the last position.

    Args:
        max_length: longest source in tokens (the instruction/input part is cut to fit).

    ``collator(examples)`` returns ``input_ids (B, n) int64``, ``attention_mask (B, n) int64`` and
    ``task_ids (B,) int64``. Generated continuations are the target text with a leading space and an
    EOS; :func:`mptkern.data.parse_output` tolerates both (strip the EOS when decoding).
    """

    def __init__(self, tokenizer, task_index: Mapping[str, int], max_length: int = 256, padding_side: str = "left"):
        super().__init__(tokenizer, task_index, max_length, padding_side)

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        ids = [self._source(ex, self.max_length) for ex in examples]
        return {
            "input_ids": self._pad(ids, self.pad_id),
            "attention_mask": self._pad([[1] * len(r) for r in ids], 0),
            "task_ids": torch.tensor([self._task_id(ex) for ex in examples], dtype=torch.long),
        }
