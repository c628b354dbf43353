"""NLI4CT (SemEval-2023 Task 7): clinical-trial statements against trial report sections.

The release (``Complete_dataset/``) holds statement files (``train.json``, ``dev.json``,
``Gold_test.json``; ``test.json`` is the same as ``Gold_test.json`` without labels), each one JSON
object keyed by record UUID::

    {"<uuid>": {"Type": "Single" | "Comparison", "Section_id": "Eligibility" | "Intervention" |
                "Results" | "Adverse Events", "Primary_id": "NCT...", "Secondary_id": "NCT..."
                (Comparison only), "Statement": "...", "Label": "Entailment" | "Contradiction", ...}}

and one file a trial, ``CT json/<NCT id>.json``, whose sections are lists of text lines.
"""

from __future__ import annotations

import json
from pathlib import Path

from mptkern.data.records import DataFormatError, build_example, read_examples, read_records
from mptkern.data.schema import Example, Task, format_nli_input

__all__ = ["SECTIONS", "read_nli4ct"]

SECTIONS = ("Eligibility", "Intervention", "Results", "Adverse Events")


def _section(trials: dict, trials_dir: Path, nct: str, section: str) -> str:
    """The ``section`` of trial ``nct`` as one string (its lines joined by spaces); trials are
    loaded once into ``trials``. Raises ValueError saying what is wrong."""
    if nct not in trials:
        path = trials_dir / f"{nct}.json"
        if not path.is_file():
            raise ValueError(f"trial file {path} not found")
        with open(path, encoding="utf-8") as f:
            try:
                trials[nct] = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"trial file {path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    lines = trials[nct].get(section) if isinstance(trials[nct], dict) else None
    if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines) or not "".join(lines).strip():
        raise ValueError(f"trial {nct} has no {section!r} section (a non-empty list of text lines)")
    return " ".join(x.strip() for x in lines)


def _record(task: Task, path: Path, uuid: str, item: dict, trials: dict, trials_dir: Path) -> Example:
    """The example of record ``uuid`` (``item``, its JSON object) of ``path``; ValueError if malformed."""
    keys = ("Type", "Section_id", "Primary_id", "Statement", "Label")
    keys += ("Secondary_id",) if item.get("Type") == "Comparison" else ()
    missing = [k for k in keys if not isinstance(item.get(k), str) or not item[k].strip()]
    kind = item.get("Type")
    if missing:
        raise ValueError(f"missing or empty {', '.join(missing)} (keys present: {sorted(item)})")
    if kind not in ("Single", "Comparison"):
        raise ValueError(f"Type {kind!r} is not 'Single' or 'Comparison'")
    section = item["Section_id"]
    if section not in SECTIONS:
        raise ValueError(f"Section_id {section!r} is not one of {list(SECTIONS)}")
    label = task.parse(str(item["Label"]))
    if label is None:
        raise ValueError(f"Label {item['Label']!r} is not one of task {task.name!r}'s labels {list(task.labels)}")
    premise = "Primary trial: " + _section(trials, trials_dir, item["Primary_id"], section)
    if kind == "Comparison":
        premise += " Secondary trial: " + _section(trials, trials_dir, item["Secondary_id"], section)
    meta = {"file": str(path), "id": uuid, "type": kind, "section": section, "primary": item["Primary_id"],
            "secondary": item.get("Secondary_id")}
    return build_example(task, path, None, format_nli_input(premise, str(item["Statement"])), label=label, meta=meta)


def read_nli4ct(path, task: Task, *, trials_dir=None, on_error: str = "raise") -> list[Example]:
    """NLI examples from an NLI4CT statements file.

    Args:
        path: a statements file (``train.json``, ``dev.json``, ``Gold_test.json``).
        task: an ``nli`` task whose labels match ``Entailment`` and ``Contradiction`` up to case and
            ``_ -`` (they are canonicalised with ``task.parse``).
        trials_dir: the folder of ``<NCT id>.json`` trial files; default ``CT json`` beside ``path``.
        on_error: ``"raise"``: a malformed record (a missing key, an unknown ``Type``,
            ``Section_id`` or label, a missing or malformed trial file) raises
            :class:`DataFormatError` naming the file and the record UUID; ``"drop"``: such records are
            skipped and one :class:`DroppedRecordsWarning` gives their number and the first error.

    The premise is the statement's section of the primary trial, ``"Primary trial: <lines>"``, and
    for a Comparison record also ``" Secondary trial: <lines>"``; a section's lines are joined by
    spaces. The hypothesis is the ``Statement``. Both are laid out by :func:`format_nli_input`.
    A file without any ``Label`` (``test.json``) raises :class:`DataFormatError` whatever
    ``on_error`` is: read ``Gold_test.json``, the same records with labels.

    Returns:
        ``list[Example]`` in file order, ``label`` a task label; ``meta`` has ``file``, ``id`` (the
        record UUID), ``type`` (Single/Comparison), ``section``, ``primary`` and ``secondary`` (the
        trial ids; ``secondary`` None for Single records).
    """
    path = Path(path)
    trials_dir = Path(trials_dir) if trials_dir is not None else path.parent / "CT json"
    records = read_records(path, "json", errors=[])  # read again below, record by record
    if records and not any("Label" in rec for _, rec in records):
        raise DataFormatError(path, None, "no record has a Label: this is the unlabelled test file; "
                              "read Gold_test.json (the same records with their labels) instead")
    trials: dict = {}

    def convert(loc, rec):
        try:
            return _record(task, path, rec.pop("_key"), rec, trials, trials_dir)
        except DataFormatError as exc:  # the example's (make_example's), already naming this file
            raise DataFormatError(path, loc, exc.reason) from None
        except ValueError as exc:
            raise DataFormatError(path, loc, str(exc)) from None

    return read_examples("read_nli4ct", path, task, "nli", convert, layout="json", on_error=on_error, engine="json",
                         cache_dir=None, sheet=None)
