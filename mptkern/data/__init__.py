"""Task data for MPT: schema, readers for standard formats, the dataset registry, the synthetic
clinical-style suite, collators and task samplers.

Data flows one way: readers / registry / synthetic suite -> :class:`Task` with ``train`` and ``eval``
:class:`Example` lists -> samplers pick indices into :func:`flatten` -> :class:`Collator` builds
tensors -> ``PromptedLM``. Metrics on generated text live in :mod:`mptkern.eval`.

Example::

    from mptkern.data import Collator, TaskSubsetSampler, flatten, make_suite, task_sizes
    suite = make_suite(seed=0, n_train=64, n_eval=32)          # synthetic: 14 sources, 5 targets
    tasks = suite["sources"]
    collate = Collator(tokenizer, {t.name: i for i, t in enumerate(tasks)}, max_length=160)
    examples = flatten(tasks)
    for idx in TaskSubsetSampler(task_sizes(tasks), batch_size=16, seed=0):
        batch = collate([examples[i] for i in idx])            # input_ids, attention_mask, labels, task_ids
"""

from mptkern.data.collator import Collator, InputFormat
from mptkern.data.readers import (
    READERS, DataFormatError, DroppedRecordsWarning, IgnoredAnnotationsWarning, read_brat, read_conll, read_jsonl,
    read_jsonl_nli, read_jsonl_qa, read_jsonl_summarization, read_nli, read_qa, read_records, read_summarization,
)
from mptkern.data.registry import (
    SHIPPED, LicenseWarning, RegistryEntry, load_registry, missing_files, read_registry, registry_path,
)
from mptkern.data.sampling import MixedTaskSampler, TaskSubsetSampler, flatten, task_sizes
from mptkern.data.schema import (
    ANSWER_CUE, FORMATS, TASK_TYPES, Entity, Example, OutputFormat, Relation, Task, format_nli_input,
    format_qa_input, gold_output, make_example, normalize_answer, parse_output, render_source, serialize_target,
)
from mptkern.data.synthetic import SOURCE_TASKS, TARGET_TASKS, make_suite

__all__ = [
    # schema
    "TASK_TYPES", "ANSWER_CUE", "FORMATS", "OutputFormat", "Entity", "Relation", "Example", "Task",
    "make_example", "serialize_target", "parse_output", "gold_output", "render_source", "format_qa_input",
    "format_nli_input", "normalize_answer",
    # readers and registry
    "DataFormatError", "DroppedRecordsWarning", "IgnoredAnnotationsWarning", "READERS", "read_conll", "read_brat",
    "read_records", "read_jsonl", "read_qa", "read_nli", "read_summarization", "read_jsonl_qa", "read_jsonl_nli",
    "read_jsonl_summarization", "SHIPPED", "LicenseWarning", "RegistryEntry", "registry_path", "read_registry",
    "missing_files", "load_registry",
    # synthetic suite
    "make_suite", "SOURCE_TASKS", "TARGET_TASKS",
    # batching
    "Collator", "InputFormat", "MixedTaskSampler", "TaskSubsetSampler", "flatten", "task_sizes",
]
