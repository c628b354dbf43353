"""The input format and the training collator: examples -> padded tensor batches with task ids.

:class:`InputFormat` turns a task's instruction and input into the source ids, the one function the
collator, the trainer's evaluation and the inference engine share. Training batches
(:class:`Collator`) hold the source (instruction, input, answer cue) followed by the target and EOS;
``labels`` are -100 on the source and on padding, so the loss covers the target and its EOS only.

Tokenization: the source is ``[special prefix] + tok(instruction + "\\n" + input) + tok("\\nAnswer:")``,
the target ``tok(" " + target) + [eos]``, each tokenized without special tokens; the special prefix is
whatever the tokenizer puts before a text (``<|begin_of_text|>`` for Llama 3, nothing for SmolLM2).
A generation prompt is therefore exactly the training prefix.
When ``source + target`` exceeds ``max_length``, the instruction/input part is cut from its end (the
answer cue is kept); the answer is never cut: an example whose target alone leaves no room for input is
an error (``mptkern.data.lengths.fit_to_length`` drops such examples when a task is loaded).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mptkern.data.schema import ANSWER_CUE, Example, source_head

__all__ = ["Collator", "InputFormat"]


class InputFormat:
    """How a task's input becomes token ids: the one function training, evaluation and serving share.

    ``source(instruction, text)`` is ``[special prefix] + tok(instruction + "\\n" + text) +
    tok("\\nAnswer:")`` (just ``tok(text)`` in the middle when the instruction is empty), the
    instruction/input part cut from its end to fit ``budget``; ``target(text)`` is
    ``tok(" " + text) + [eos]``.

    Args:
        tokenizer: a Hugging Face tokenizer with ``eos_token_id``.
    """

    def __init__(self, tokenizer):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id: targets must end with EOS")
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.prefix = self._special_prefix(tokenizer)
        self.cue = self.ids(ANSWER_CUE)

    @staticmethod
    def _special_prefix(tokenizer) -> list[int]:
        """Special tokens the tokenizer puts before a text (e.g. BOS), found by comparison."""
        plain = tokenizer("x", add_special_tokens=False)["input_ids"]
        full = tokenizer("x")["input_ids"]
        for i in range(len(full) - len(plain) + 1):
            if full[i : i + len(plain)] == plain:
                return list(full[:i])
        return []

    @property
    def overhead(self) -> int:
        """Tokens every source has besides its instruction and input."""
        return len(self.prefix) + len(self.cue)

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def source(self, instruction: str, text: str, budget: int | None = None) -> tuple[list[int], bool]:
        """``(ids, cut)``: the source of ``text`` under ``instruction``, at most ``budget`` tokens
        (None: no limit); ``cut`` tells whether the instruction/input part was shortened."""
        head = self.ids(source_head(instruction, text))
        room = None if budget is None else budget - self.overhead
        cut = room is not None and len(head) > room
        if cut:
            head = head[: max(room, 1)]
        return self.prefix + head + self.cue, cut

    def target(self, text: str) -> list[int]:
        return self.ids(" " + text) + [self.eos_id]


class _Base:
    def __init__(self, tokenizer, task_index: Mapping[str, int], max_length: int, padding_side: str):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.format = InputFormat(tokenizer)
        self.tokenizer = tokenizer
        self.task_index = dict(task_index)
        self.padding_side = padding_side
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = self.format.eos_id
        if max_length < self.format.overhead + 2:
            raise ValueError(f"max_length={max_length} leaves no room for any input")
        self.max_length = max_length
        self.truncated = 0  # examples whose input was cut so far

    def _task_id(self, ex: Example) -> int:
        try:
            return self.task_index[ex.task]
        except KeyError:
            raise KeyError(f"example of task {ex.task!r}, which is not in task_index {sorted(self.task_index)}") from None

    def _source(self, ex: Example, budget: int) -> list[int]:
        """Source ids (prefix, head cut to fit, cue) of at most ``budget`` tokens."""
        ids, cut = self.format.source(ex.instruction, ex.input, budget)
        self.truncated += cut
        return ids

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
        target = self.format.target(ex.target)
        cap = self.max_length - self.format.overhead - 1  # at least one input token stays
        if len(target) > cap:
            raise ValueError(f"an example of task {ex.task!r} has a {len(target)}-token answer, which leaves no room "
                             f"for its input in max_length={self.max_length}; answers are never cut: raise "
                             "max_length or drop such examples (mptkern.data.lengths.fit_to_length)")
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
