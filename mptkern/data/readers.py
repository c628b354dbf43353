"""Readers for the formats real clinical datasets come in, from local files, into :class:`Example`s.

=====================================  =================================================================
reader                                 format
=====================================  =================================================================
:func:`read_conll`                     BIO / IOB2 / BIOES token-per-line files (token and tag columns,
                                       blank line between sentences) -> NER examples, one per sentence
:func:`read_brat`                      brat standoff ``.txt`` + ``.ann`` (n2c2 2018 medication/ADE,
                                       n2c2 2022 SDoH, converted i2b2 2010, DDI 2013) -> NER or RE
                                       examples, one per document, paragraph, line or sentence
:func:`read_qa`                        multiple-choice QA records (question, options or the task's fixed
                                       labels, answer, optional context): PubMedQA, MedQA, MedMCQA
:func:`read_nli`                       NLI records (premise, hypothesis, label): COVID-Fact, MedNLI
:func:`read_summarization`             summarization records (text, summary): MEDIQA RRS, MTS-Dialog,
                                       MeQSum
:func:`~mptkern.data.nli4ct.read_nli4ct`  NLI4CT statements with the trial sections they reference
=====================================  =================================================================

Every reader takes the :class:`Task` the examples belong to (its type, labels and output format decide
what is read and how the target is written) and returns ``list[Example]``. The record readers take
any layout :func:`~mptkern.data.records.read_records` reads: JSON lines, a JSON array of objects, a
JSON object of objects keyed by id, CSV, TSV and xlsx (``layout="auto"`` picks by suffix); record
fields (or table column positions) are mapped with ``fields=``. ``read_jsonl_qa``,
``read_jsonl_nli`` and ``read_jsonl_summarization`` are their former names. Malformed input raises
:class:`DataFormatError`, whose message starts with ``<file>:<line>:`` or ``<file>: record KEY:``
(``item I``, ``row N``); the record readers can drop such records instead (``on_error="drop"``).
"""

from __future__ import annotations

import bisect
import collections
import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from mptkern.data.nli4ct import read_nli4ct
from mptkern.data.records import (
    DataFormatError, DroppedRecordsWarning, build_example, check_choice, read_examples, read_jsonl, read_records,
)
from mptkern.data.schema import (
    Entity, Example, Relation, Task, collapse_ws, format_nli_input, format_qa_input,
    normalize_answer,
)

__all__ = [
    "DataFormatError", "DroppedRecordsWarning", "IgnoredAnnotationsWarning", "read_conll", "read_brat",
    "read_records", "read_jsonl", "read_qa", "read_nli", "read_summarization", "read_jsonl_qa", "read_jsonl_nli",
    "read_jsonl_summarization", "READERS",
]

log = logging.getLogger(__name__)


class IgnoredAnnotationsWarning(UserWarning):
    """brat annotations a reader read but did not use: lines it ignores (events, attributes,
    normalizations, notes), and entities or relations dropped because they cross segments."""


def _map_type(raw: str, mapping: Mapping[str, str | None] | None) -> str | None:
    """Apply ``mapping`` (absent key: unchanged; value None: drop)."""
    if mapping and raw in mapping:
        return mapping[raw]
    return raw


# ----------------------------------------------------------------------------------------------
# BIO / CoNLL
# ----------------------------------------------------------------------------------------------
_TAG = re.compile(r"^([BIES])[-_](.+)$")


def read_conll(path, task: Task, *, token_col: int = 0, tag_col: int = -1, delimiter: str | None = None,
               type_map: Mapping[str, str | None] | None = None, on_unknown: str = "error",
               strict: bool = False, docstart: str = "-DOCSTART-", encoding: str = "utf-8") -> list[Example]:
    """NER examples from a token-per-line file: one example per sentence (blank-line separated).

    Args:
        path: the file.
        task: an ``ner`` task; entity types must be in ``task.labels`` after ``type_map``.
        token_col, tag_col: column indices of the token and the tag (negative counts from the end).
        delimiter: column separator (None: any whitespace; ``"\\t"`` for tokens holding spaces).
        type_map: rename tag types (``{"problem": "condition"}``); a value of None drops that type.
        on_unknown: ``"error"`` or ``"drop"`` for entity types not in ``task.labels``.
        strict: with False an ``I-``/``E-`` tag that does not continue an entity of its type starts one
            (the conlleval convention); with True it is an error.
        docstart: lines starting with this are document separators (ignored).

    Tags: ``O``, ``B-T``, ``I-T`` (BIO / IOB2) and ``E-T``, ``S-T`` (BIOES); ``_`` may replace ``-``.
    The input text is the tokens joined by single spaces; entity offsets point into it.

    Returns:
        ``list[Example]`` in file order; ``meta`` holds ``file`` and ``line`` (first line of the sentence).
    """
    if task.type != "ner":
        raise ValueError(f"read_conll builds NER examples; task {task.name!r} is {task.type}")
    check_choice("on_unknown", on_unknown, ("error", "drop"))
    path = Path(path)
    examples: list[Example] = []
    rows: list[tuple[int, str, str]] = []

    def flush():
        if not rows:
            return
        text, offsets = "", []
        for _, tok, _ in rows:
            if text:
                text += " "
            offsets.append((len(text), len(text) + len(tok)))
            text += tok
        entities, cur = [], None  # cur: [type, start_index, end_index, line]

        def close():
            nonlocal cur
            if cur is not None:
                etype = _map_type(cur[0], type_map)
                if etype is not None:
                    if etype not in task.labels:
                        if on_unknown == "error":
                            raise DataFormatError(path, cur[3], f"entity type {etype!r} is not in task {task.name!r}'s "
                                                  f"labels {list(task.labels)} (map it with type_map or pass on_unknown='drop')")
                    else:
                        s, e = offsets[cur[1]][0], offsets[cur[2]][1]
                        entities.append(Entity(text[s:e], etype, s, e))
                cur = None

        for i, (line, _, tag) in enumerate(rows):
            if tag == "O":
                close()
                continue
            m = _TAG.match(tag)
            if not m:
                raise DataFormatError(path, line, f"tag {tag!r} is not O, B-TYPE, I-TYPE, E-TYPE or S-TYPE")
            prefix, etype = m.groups()
            continues = cur is not None and cur[0] == etype and prefix in "IE"
            if prefix in "IE" and not continues:
                if strict:
                    raise DataFormatError(path, line, f"tag {tag!r} does not continue an entity of type {etype!r}")
            if continues:
                cur[2] = i
            else:
                close()
                cur = [etype, i, i, line]
            if prefix in "ES":
                close()
        close()
        examples.append(build_example(task, path, rows[0][0], text, entities=entities,
                                      meta={"file": str(path), "line": rows[0][0]}))
        rows.clear()

    with open(path, encoding=encoding) as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                flush()
                continue
            if docstart and line.startswith(docstart):
                flush()
                continue
            cols = line.split(delimiter) if delimiter is not None else line.split()
            need = max(token_col if token_col >= 0 else -token_col - 1, tag_col if tag_col >= 0 else -tag_col - 1) + 1
            if len(cols) < need or len(cols) < 2:
                raise DataFormatError(path, lineno, f"expected at least {max(need, 2)} columns (token and tag), "
                                      f"got {len(cols)}: {line!r}")
            tok, tag = cols[token_col].strip(), cols[tag_col].strip()
            if not tok:
                raise DataFormatError(path, lineno, "empty token")
            rows.append((lineno, tok, tag))
        flush()
    return examples


# ----------------------------------------------------------------------------------------------
# brat standoff
# ----------------------------------------------------------------------------------------------
_SEGMENTS = ("document", "paragraph", "line", "sentence")
_DISCONTINUOUS = ("error", "skip", "span", "first", "join")
_IGNORED_KINDS = {"A": "attribute (A)", "M": "attribute (M)", "N": "normalization (N)", "#": "note (#)",
                  "*": "equivalence (*)", "E": "event (E)"}


def _brat_pairs(path: Path, recursive: bool) -> list[tuple[Path, Path]]:
    if path.is_dir():
        anns = sorted(path.rglob("*.ann") if recursive else path.glob("*.ann"))
        if not anns:
            raise DataFormatError(path, None, "directory holds no .ann files")
    elif path.suffix in (".ann", ".txt"):
        anns = [path.with_suffix(".ann")]
        if not anns[0].is_file():
            raise DataFormatError(anns[0], None, "annotation file not found")
    else:
        raise DataFormatError(path, None, "expected a directory of brat files or a .ann / .txt file")
    pairs = []
    for ann in anns:
        txt = ann.with_suffix(".txt")
        if not txt.is_file():
            raise DataFormatError(ann, None, f"no text file {txt.name} beside the annotation file")
        pairs.append((txt, ann))
    return pairs


# A sentence ends at . ! or ? (plus any closing quotes or brackets) followed by whitespace and an
# upper-case letter or a digit; group 1 is the end of the sentence, the match's end the next start.
# No sentence ends at these abbreviations ("24% vs. 31%", "St. John's wort").
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*()\s+(?=[A-Z0-9])")
_NOT_AN_END = re.compile(r"\b(?:vs|e\.g|i\.e|cf|al|approx|St|Dr|Fig)\.\Z")


def _sentences(text: str, group: list[tuple[int, int]], protected: Sequence[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Split a paragraph (its ``(start, end)`` lines) at sentence ends (``_SENTENCE_END``), except
    where a ``protected`` span ``[lo, hi)`` (an entity) would be cut. Returns each sentence's lines."""
    start, stop = group[0][0], group[-1][1]
    cuts = [start]
    for m in _SENTENCE_END.finditer(text, start, stop):
        end, nxt = m.start(1), m.end()
        if _NOT_AN_END.search(text, max(start, m.start() - 8), m.start() + 1):
            continue
        if not any(lo < nxt and hi > end for lo, hi in protected):
            cuts.append(nxt)
    cuts.append(stop)
    out = []
    for a, b in zip(cuts, cuts[1:]):
        out.append([(max(s, a), min(e, b)) for s, e in group if s < b and e > a])
    return out


def _segments(text: str, mode: str, max_chars: int | None,
              protected: Sequence[tuple[int, int]] = ()) -> list[tuple[int, int]]:
    """``[start, end)`` spans of the non-blank segments of ``text`` (trimmed of edge whitespace).

    ``mode`` is one of ``_SEGMENTS``; sentences are cut inside paragraphs, never through a
    ``protected`` span. With ``max_chars`` a longer segment is cut further at line boundaries."""
    lines, pos = [], 0
    for piece in text.splitlines(keepends=True):
        lines.append((pos, pos + len(piece.rstrip("\r\n"))))
        pos += len(piece)
    groups: list[list[tuple[int, int]]] = [[]]
    for s, e in lines:
        blank = not text[s:e].strip()
        if mode == "line" or (mode in ("paragraph", "sentence") and blank):
            groups.append([])
        if not blank:
            groups[-1].append((s, e))
    if mode == "document":
        groups = [[(s, e) for g in groups for s, e in g]]
    if mode == "sentence":
        groups = [sent for g in groups if g for sent in _sentences(text, g, protected)]
    out = []
    for g in groups:
        if not g:
            continue
        chunks = [[g[0]]]
        for s, e in g[1:]:  # split long groups at line boundaries, never inside a line
            if max_chars and e - chunks[-1][0][0] > max_chars:
                chunks.append([])
            chunks[-1].append((s, e))
        for c in chunks:
            s, e = c[0][0], c[-1][1]
            seg = text[s:e]
            s += len(seg) - len(seg.lstrip())
            e -= len(seg) - len(seg.rstrip())
            if e > s:
                out.append((s, e))
    return out


def read_brat(path, task: Task, *, segment: str = "document", max_chars: int | None = None,
              discontinuous: str = "error", entity_map: Mapping[str, str | None] | None = None,
              relation_map: Mapping[str, str | None] | None = None, events: str = "ignore",
              on_unknown: str = "error", keep_empty: bool = True, recursive: bool = False,
              encoding: str = "utf-8", report: collections.Counter | None = None) -> list[Example]:
    """NER or RE examples from brat standoff files.

    Args:
        path: a directory of ``*.ann`` files with their ``*.txt`` beside them, or one ``.ann``/``.txt``.
        task: an ``ner`` task (gold = the T entities whose types are in ``task.labels``) or an ``re``
            task (gold = the relations whose types are in ``task.labels``; their argument mentions are
            kept as ``entities``).
        segment: one example per ``"document"``, ``"paragraph"`` (blank-line separated), ``"line"``
            or ``"sentence"``. Sentences are cut inside paragraphs after ``.``, ``!`` or ``?`` (and
            any closing ``"')]``) followed by whitespace and an upper-case letter or a digit, except
            after ``vs. e.g. i.e. cf. al. approx. St. Dr. Fig.`` and where the cut would fall inside
            a T entity's span; other abbreviations (``Inc. Pfizer``) are cut. A line break alone
            does not end a sentence. Entities and relations crossing a segment boundary are
            dropped, counted in ``report`` and in one :class:`IgnoredAnnotationsWarning` per call.
        max_chars: split segments longer than this at line boundaries (never inside a line); a
            single line longer than this stays whole.
        discontinuous: what to do with a T line of several fragments (``"0 5;9 14"``): ``"error"``
            (raise), ``"skip"`` (drop it and the relations using it), ``"span"`` (one span from the
            first start to the last end), ``"first"`` (the first fragment), ``"join"`` (fragments
            joined by a space, no offsets).
        entity_map, relation_map: rename types; a value of None drops that type.
        events: ``"ignore"`` (E lines are skipped, with a warning) or ``"relations"``: each argument of
            an event becomes a relation ``(trigger text, role, argument text)`` with trailing digits
            stripped from the role (``Type2`` -> ``Type``); the n2c2 2022 SDoH corpus annotates its
            relations this way.
        on_unknown: ``"error"`` or ``"drop"`` for gold types outside ``task.labels``.
        keep_empty: keep segments with no gold (negative examples).
        report: a Counter updated with what was dropped or ignored.

    A/M (attributes), N (normalizations), ``#`` (notes) and ``*`` (equivalences) lines are always
    ignored: NER/RE targets hold spans, types and relations only. One
    :class:`IgnoredAnnotationsWarning` per call says how many lines were ignored. Other drops the
    options ask for (maps, ``on_unknown="drop"``, ``discontinuous="skip"``) are logged at INFO. Files are read
    with ``newline=""`` so that brat's character offsets hold for CRLF files too.

    Returns:
        ``list[Example]`` ordered by file then segment; ``meta`` has ``file``, ``doc``, ``offset`` (the
        segment's start in the document) and ``line`` (its first line number).
    """
    if task.type not in ("ner", "re"):
        raise ValueError(f"read_brat builds NER or RE examples; task {task.name!r} is {task.type}")
    check_choice("segment", segment, _SEGMENTS)
    check_choice("discontinuous", discontinuous, _DISCONTINUOUS)
    check_choice("events", events, ("ignore", "relations"))
    check_choice("on_unknown", on_unknown, ("error", "drop"))
    counts = collections.Counter()
    examples = []
    for txt_path, ann_path in _brat_pairs(Path(path), recursive):
        examples += _read_brat_doc(txt_path, ann_path, task, segment, max_chars, discontinuous, entity_map,
                                   relation_map, events, on_unknown, keep_empty, encoding, counts)
    ignored = {k: v for k, v in counts.items() if k.startswith("ignored ")}
    if ignored:
        hint = " (pass events='relations' to use events as relations)" if "ignored event (E) lines" in ignored else ""
        warnings.warn(f"read_brat({path}): " + ", ".join(f"{k} {v}" for k, v in sorted(ignored.items()))
                      + f"; NER/RE targets use entities and relations only{hint}",
                      IgnoredAnnotationsWarning, stacklevel=2)
    crossing = {k: v for k, v in counts.items() if k.endswith(" crossing segments")}
    if crossing:  # a loss the segmentation caused, not one the options asked for: warn
        warnings.warn(f"read_brat({path}, segment={segment!r}, max_chars={max_chars}): "
                      + ", ".join(f"{k} {v}" for k, v in sorted(crossing.items()))
                      + " (their spans or arguments lie in different segments; a larger segment keeps them)",
                      IgnoredAnnotationsWarning, stacklevel=2)
    dropped = {k: v for k, v in counts.items() if k.startswith("dropped ") and k not in crossing}
    if dropped:
        log.info("read_brat(%s): %s", path, ", ".join(f"{k} {v}" for k, v in sorted(dropped.items())))
    if report is not None:
        report.update(counts)
    return examples


def _read_brat_doc(txt_path, ann_path, task, segment, max_chars, discontinuous, entity_map, relation_map,
                   events, on_unknown, keep_empty, encoding, counts):
    with open(txt_path, encoding=encoding, newline="") as f:
        text = f.read()
    ents: dict[str, tuple[Entity, int]] = {}  # id -> (entity with document offsets or none, line)
    bounds: dict[str, tuple[int, int]] = {}  # id -> covering [start, end) for segment membership
    skipped: set[str] = set()
    rels: list[tuple[str, str, str, int]] = []  # (type, head id, tail id, line)
    event_lines: list[tuple[str, str, int]] = []
    with open(ann_path, encoding=encoding, newline="") as f:
        ann_lines = f.read().splitlines()
    for lineno, line in enumerate(ann_lines, 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        ident = fields[0].strip()
        kind = ident[:1]
        if kind == "T":
            if len(fields) < 3:
                raise DataFormatError(ann_path, lineno, f"T line needs 'ID<TAB>TYPE SPANS<TAB>TEXT', got {line!r}")
            head = fields[1].split(" ", 1)
            if len(head) != 2:
                raise DataFormatError(ann_path, lineno, f"T line has no spans: {line!r}")
            etype, spans_s = head
            frags = []
            for part in spans_s.split(";"):
                nums = part.split()
                if len(nums) != 2 or not all(n.isdigit() for n in nums):
                    raise DataFormatError(ann_path, lineno, f"span {part!r} is not 'START END'")
                s, e = int(nums[0]), int(nums[1])
                if not 0 <= s < e <= len(text):
                    raise DataFormatError(ann_path, lineno, f"span {s} {e} is outside {txt_path.name} "
                                          f"({len(text)} characters) or empty")
                frags.append((s, e))
            ann_text = fields[2]
            got = " ".join(text[s:e] for s, e in frags)
            if collapse_ws(got) != collapse_ws(ann_text):
                raise DataFormatError(ann_path, lineno, f"annotated text {ann_text!r} does not match {txt_path.name}"
                                      f"[{spans_s}] = {got!r} (wrong encoding or line endings?)")
            if ident in ents or ident in skipped:
                raise DataFormatError(ann_path, lineno, f"duplicate id {ident}")
            mapped = _map_type(etype, entity_map)
            if mapped is None:
                skipped.add(ident)
                counts["dropped entities by entity_map"] += 1
                continue
            if len(frags) > 1:
                if discontinuous == "error":
                    raise DataFormatError(ann_path, lineno, f"discontinuous span {spans_s!r} ({ident}); pass "
                                          "discontinuous='span', 'first', 'join' or 'skip' to read such entities")
                if discontinuous == "skip":
                    skipped.add(ident)
                    counts["dropped discontinuous entities"] += 1
                    continue
                if discontinuous == "span":
                    frags = [(frags[0][0], max(e for _, e in frags))]
                elif discontinuous == "first":
                    frags = frags[:1]
            lo, hi = min(s for s, _ in frags), max(e for _, e in frags)
            if len(frags) == 1:
                ent = Entity(text[lo:hi], mapped, lo, hi)
            else:  # join: the fragments' text, no offsets
                ent = Entity(collapse_ws(" ".join(text[s:e] for s, e in frags)), mapped)
            ents[ident] = (ent, lineno)
            bounds[ident] = (lo, hi)
        elif kind == "R":
            parts = fields[1].split() if len(fields) > 1 else []
            if len(parts) != 3 or not all(":" in p for p in parts[1:]):
                raise DataFormatError(ann_path, lineno, f"R line needs 'ID<TAB>TYPE Arg1:ID Arg2:ID', got {line!r}")
            rels.append((parts[0], parts[1].split(":", 1)[1], parts[2].split(":", 1)[1], lineno))
        elif kind == "E":
            if events == "ignore":
                counts["ignored event (E) lines"] += 1
            else:
                if len(fields) < 2 or not fields[1].strip():
                    raise DataFormatError(ann_path, lineno, f"E line needs 'ID<TAB>TYPE:TRIGGER [ROLE:ARG ...]', got {line!r}")
                event_lines.append((ident, fields[1], lineno))
        elif kind in _IGNORED_KINDS:
            counts[f"ignored {_IGNORED_KINDS[kind]} lines"] += 1
        else:
            raise DataFormatError(ann_path, lineno, f"unknown annotation line (expected T, R, E, A, M, N, # or *): {line!r}")

    # events -> relations (trigger, role, argument); an argument may itself be an event (its trigger)
    triggers: dict[str, str] = {}
    parsed_events = []
    for ident, body, lineno in event_lines:
        items = body.split()
        if ":" not in items[0]:
            raise DataFormatError(ann_path, lineno, f"event {ident} has no TYPE:TRIGGER")
        triggers[ident] = items[0].split(":", 1)[1]
        parsed_events.append((ident, items, lineno))
    for ident, items, lineno in parsed_events:
        for item in items[1:]:
            if ":" not in item:
                raise DataFormatError(ann_path, lineno, f"event argument {item!r} is not ROLE:ID")
            role, arg = item.split(":", 1)
            rels.append((re.sub(r"\d+$", "", role), triggers[ident], triggers.get(arg, arg), lineno))

    resolved: list[tuple[Relation, str, str]] = []
    for rtype, h, t, lineno in rels:
        for arg in (h, t):
            if arg not in ents and arg not in skipped:
                raise DataFormatError(ann_path, lineno, f"relation argument {arg} is not a T entity of {ann_path.name}")
        if h in skipped or t in skipped:
            counts["dropped relations on dropped entities"] += 1
            continue
        mapped = _map_type(rtype, relation_map)
        if mapped is None:
            counts["dropped relations by relation_map"] += 1
            continue
        if task.type == "re" and mapped not in task.labels:
            if on_unknown == "error":
                raise DataFormatError(ann_path, lineno, f"relation type {mapped!r} is not in task {task.name!r}'s labels "
                                      f"{list(task.labels)} (map it with relation_map or pass on_unknown='drop')")
            counts["dropped relations of unknown type"] += 1
            continue
        resolved.append((Relation(ents[h][0].text, mapped, ents[t][0].text), h, t))

    if task.type == "ner":
        kept = {}
        for ident, (ent, lineno) in ents.items():
            if ent.type not in task.labels:
                if on_unknown == "error":
                    raise DataFormatError(ann_path, lineno, f"entity type {ent.type!r} is not in task {task.name!r}'s "
                                          f"labels {list(task.labels)} (map it with entity_map or pass on_unknown='drop')")
                counts["dropped entities of unknown type"] += 1
                continue
            kept[ident] = ent
    else:  # RE: the entities are the mentions the gold relations use
        used = {i for _, h, t in resolved for i in (h, t)}
        kept = {i: ents[i][0] for i in ents if i in used}

    line_starts = [0] + [m.end() for m in re.finditer(r"\r\n|\r|\n", text)]
    examples, used_rels, placed = [], set(), set()
    for seg_start, seg_end in _segments(text, segment, max_chars, sorted(bounds.values())):
        inside = {i for i in kept if seg_start <= bounds[i][0] and bounds[i][1] <= seg_end}
        placed |= inside
        seg_ents = []
        for i in sorted(inside, key=lambda i: (bounds[i], i)):
            e = kept[i]
            seg_ents.append(e if e.start is None else Entity(e.text, e.type, e.start - seg_start, e.end - seg_start))
        seg_rels = []
        if task.type == "re":
            for k, (rel, h, t) in enumerate(resolved):
                if h in inside and t in inside:
                    seg_rels.append(rel)
                    used_rels.add(k)
        gold = seg_rels if task.type == "re" else seg_ents
        if not gold and not keep_empty:
            continue
        line = bisect.bisect_right(line_starts, seg_start)
        examples.append(build_example(
            task, txt_path, line, text[seg_start:seg_end], entities=seg_ents, relations=seg_rels,
            meta={"file": str(txt_path), "doc": txt_path.stem, "offset": seg_start, "line": line},
        ))
    if len(placed) < len(kept):  # each entity once, however many segments it overlaps
        counts["dropped entities crossing segments"] += len(kept) - len(placed)
    if task.type == "re" and len(used_rels) < len(resolved):
        counts["dropped relations crossing segments"] += len(resolved) - len(used_rels)
    return examples


# ----------------------------------------------------------------------------------------------
# Records: JSONL, JSON, CSV, TSV, xlsx (read by mptkern.data.records)
# ----------------------------------------------------------------------------------------------


def _fields(defaults: dict, fields: Mapping | None, reader: str) -> dict:
    out = dict(defaults)
    for k, v in (fields or {}).items():
        if k not in defaults:
            raise ValueError(f"{reader}: unknown field key {k!r}; keys: {sorted(defaults)}")
        out[k] = v
    return out


def _present(row: dict) -> str:
    names = sorted(k for k in row if isinstance(k, str))
    ncols = sum(isinstance(k, int) for k in row)
    return f"fields present: {names}" + (f", or column positions 0-{ncols - 1}" if ncols else "")


def _get(row: dict, key, path, loc, *, required: bool = True):
    """``row[key]`` (``key`` a field name or, in tables, a column position); None when ``key`` is
    None. A required field that is absent, None or blank raises :class:`DataFormatError`."""
    if key is None:
        return None
    value = row.get(key)
    if required and (value is None or (isinstance(value, str) and not value.strip()) or value == []):
        raise DataFormatError(path, loc, f"missing or empty field {key!r} ({_present(row)})")
    return value


def _text(row: dict, key, path, loc, *, required: bool = True) -> str | None:
    """A text field: a string, a number, or a list of strings joined by one space (PubMedQA's
    ``CONTEXTS``, COVID-Fact's ``evidence``)."""
    value = _get(row, key, path, loc, required=required)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return " ".join(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataFormatError(path, loc, f"field {key!r} must be text or a list of strings, got {type(value).__name__}")


def _options(row, spec, path, lineno, text_key):
    """Options of a row as a list of strings, plus the keys they came from (letters for dicts)."""
    if isinstance(spec, (list, tuple)):  # options spread over several fields (MedMCQA: opa..opd)
        opts = [_get(row, k, path, lineno) for k in spec]
        keys = list(spec)
    else:
        raw = _get(row, spec, path, lineno)
        if isinstance(raw, dict):  # {"A": ..., "B": ...}; Arrow fills absent keys with None
            keys = [k for k in raw if raw[k] is not None]
            opts = [raw[k] for k in keys]
        elif isinstance(raw, list):
            keys = None
            opts = raw
        else:
            raise DataFormatError(path, lineno, f"field {spec!r} must be a list or an object of options, got {type(raw).__name__}")
    out = []
    for o in opts:
        if isinstance(o, dict):
            if text_key is None or not isinstance(o.get(text_key), str):
                raise DataFormatError(path, lineno, f"option {o!r} is an object: pass option_text_key naming its text field")
            o = o[text_key]
        if not isinstance(o, (str, int, float)) or not str(o).strip():
            raise DataFormatError(path, lineno, f"option {o!r} is not a non-empty string")
        out.append(collapse_ws(str(o)))
    return out, keys


def _resolve_answer(answer, choices, keys, answer_format, path, lineno) -> int:
    n = len(choices)
    fmt = answer_format
    if fmt == "auto":
        if isinstance(answer, bool):
            fmt = "text"
        elif isinstance(answer, int):
            fmt = "index0"
        elif isinstance(answer, str) and keys is not None and answer in keys:
            return keys.index(answer)
        elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n]:
            fmt = "letter"
        else:
            fmt = "text"
    try:
        if fmt == "letter":
            idx = "ABCDEFGHIJKLMNOPQRSTUVWXYZ".index(str(answer).strip().upper())
        elif fmt in ("index0", "index1"):
            idx = int(answer) - (fmt == "index1")
        elif fmt == "key":
            idx = keys.index(answer) if keys is not None else -1
        else:
            wanted = normalize_answer(str(answer))
            matches = [i for i, c in enumerate(choices) if normalize_answer(c) == wanted]
            idx = matches[0] if len(matches) == 1 else -1
    except (ValueError, TypeError):
        idx = -1
    if not 0 <= idx < n:
        raise DataFormatError(path, lineno, f"answer {answer!r} (read as {fmt}) does not pick one of the {n} options {choices}")
    return idx


def _meta(path, loc, row, id_key) -> dict:
    meta = {"file": str(path), ("line" if isinstance(loc, int) else "record"): loc}
    if id_key is not None:
        meta["id"] = row.get(id_key)
    return meta


def read_qa(path, task: Task, *, layout: str = "auto", fields: Mapping | None = None, answer_format: str = "auto",
            option_text_key: str | None = None, on_error: str = "raise", engine: str = "json",
            cache_dir: str | None = None, sheet: str | None = None) -> list[Example]:
    """Multiple-choice QA examples from any record layout.

    Args:
        path: the file.
        task: a ``qa`` task.
        fields: map of ``question``, ``options``, ``answer``, ``context``, ``id`` to the record's field
            names, or column positions (int) in tables (defaults: the same names, ``context`` and ``id``
            unused). ``options`` names a list field, an object field (``{"A": ..., "B": ...}``, MedQA)
            or a list of fields (``["opa", "opb", "opc", "opd"]``, MedMCQA); None means the task's
            ``labels`` are the fixed options of every question (PubMedQA's yes/no/maybe). A question or
            context that is a list of strings (PubMedQA's ``CONTEXTS``) is joined by one space.
            A JSON object of objects gives its keys as field ``_key`` (``"id": "_key"``).
        answer_format: ``"auto"``, ``"letter"`` (``"B"``), ``"index0"``, ``"index1"``, ``"key"`` (a key
            of the options object) or ``"text"`` (the option's text). ``"auto"`` reads an int as a
            0-based index, a key of the options object as that option, a single letter within range as
            a letter, anything else as text (table cells are strings: pass ``"index0"``/``"index1"``
            for numeric answers there).
        option_text_key: when options are objects (HEAD-QA ``{"aid": 1, "atext": ...}``), their text field.
        layout: ``"auto"`` (by suffix) or ``"jsonl"``, ``"json"``, ``"csv"``, ``"tsv"``, ``"xlsx"``
            (see :func:`~mptkern.data.records.read_records`).
        on_error: ``"raise"`` (default) the first malformed record's :class:`DataFormatError`, or
            ``"drop"`` such records and warn once (:class:`DroppedRecordsWarning`) with their count
            and the first error.
        engine, cache_dir: how a JSONL file is parsed (see :func:`read_jsonl`).
        sheet: the sheet of an xlsx workbook (default: the first).

    Returns:
        ``list[Example]``: input laid out by :func:`format_qa_input` (whitespace collapsed), ``label``
        the correct option's text; ``meta`` has ``file`` and ``line`` (a line number) or ``record``
        (``"record KEY"``, ``"item I"``, ``"row N"``), and ``id`` when mapped.
    """
    check_choice("answer_format", answer_format, ("auto", "letter", "index0", "index1", "key", "text"))
    f = _fields({"question": "question", "options": "options", "answer": "answer", "context": None, "id": None},
                fields, "read_qa")
    if task.type == "qa" and f["options"] is None and not task.labels:
        raise ValueError(f"task {task.name!r} has no labels to use as fixed options; map the 'options' field")

    def convert(loc, row):
        question = _text(row, f["question"], path, loc)
        if f["options"] is None:
            choices, keys = list(task.labels), None
        else:
            choices, keys = _options(row, f["options"], path, loc, option_text_key)
        if len(set(map(normalize_answer, choices))) != len(choices):
            raise DataFormatError(path, loc, f"options are not distinct: {choices}")
        idx = _resolve_answer(_get(row, f["answer"], path, loc), choices, keys, answer_format, path, loc)
        context = _text(row, f["context"], path, loc, required=False)
        return build_example(task, path, loc, format_qa_input(question, choices, context), label=choices[idx],
                             choices=choices, meta=_meta(path, loc, row, f["id"]))

    return read_examples("read_qa", path, task, "qa", convert, layout=layout, on_error=on_error, engine=engine,
                         cache_dir=cache_dir, sheet=sheet)


def read_nli(path, task: Task, *, layout: str = "auto", fields: Mapping | None = None, label_map: Mapping | None = None,
             on_unknown: str = "error", on_error: str = "raise", engine: str = "json", cache_dir: str | None = None,
             sheet: str | None = None) -> list[Example]:
    """NLI examples from any record layout.

    Args:
        path: the file.
        task: an ``nli`` task.
        fields: map of ``premise``, ``hypothesis``, ``label``, ``id`` to the record's field names or
            table column positions (MedNLI: ``{"premise": "sentence1", "hypothesis": "sentence2",
            "label": "gold_label"}``; COVID-Fact RTE TSVs: ``{"premise": 1, "hypothesis": 2, "label": 3}``,
            since ``dev.tsv`` names its label column ``entailment``). A premise that is a list of
            strings (COVID-Fact's ``evidence``) is joined by one space.
        label_map: raw label -> task label (keys compared as strings, so ``{"0": "entailment"}`` maps
            the integer 0); labels equal to a task label up to case and ``_ -`` need no mapping.
        on_unknown: ``"error"`` or ``"skip"`` (silently) for records whose label maps to no task label
            (e.g. SNLI's ``-``).
        layout, on_error, engine, cache_dir, sheet: as for :func:`read_qa`.

    Returns:
        ``list[Example]`` with input from :func:`format_nli_input` (whitespace collapsed) and ``label`` a
        task label; ``meta`` as for :func:`read_qa`.
    """
    check_choice("on_unknown", on_unknown, ("error", "skip"))
    f = _fields({"premise": "premise", "hypothesis": "hypothesis", "label": "label", "id": None}, fields, "read_nli")
    lmap = {str(k): v for k, v in (label_map or {}).items()}

    def convert(loc, row):
        premise = _text(row, f["premise"], path, loc)
        hypothesis = _text(row, f["hypothesis"], path, loc)
        raw = _get(row, f["label"], path, loc)
        label = lmap.get(str(raw), raw)
        label = task.parse(str(label)) if label is not None else None
        if label is None:
            if on_unknown == "skip":
                return None
            raise DataFormatError(path, loc, f"label {raw!r} is not one of task {task.name!r}'s labels "
                                  f"{list(task.labels)} (pass label_map, or on_unknown='skip')")
        return build_example(task, path, loc, format_nli_input(premise, hypothesis), label=label,
                             meta=_meta(path, loc, row, f["id"]))

    return read_examples("read_nli", path, task, "nli", convert, layout=layout, on_error=on_error, engine=engine,
                         cache_dir=cache_dir, sheet=sheet)


def _newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_summarization(path, task: Task, *, layout: str = "auto", fields: Mapping | None = None,
                       on_error: str = "raise", engine: str = "json", cache_dir: str | None = None,
                       sheet: str | None = None) -> list[Example]:
    """Summarization examples from any record layout.

    Args:
        path: the file.
        task: a ``summarization`` task.
        fields: map of ``text``, ``summary``, ``id`` to the record's field names or table column
            positions (MIMIC-CXR / MEDIQA RRS: ``{"text": "findings", "summary": "impression"}``;
            MTS-Dialog: ``{"text": "dialogue", "summary": "section_text", "id": "ID"}``; MeQSum:
            ``{"text": "CHQ", "summary": "Summary", "id": "File"}``).
        layout, on_error, engine, cache_dir, sheet: as for :func:`read_qa`.

    The text and summary are kept as written, line breaks included (a dialogue keeps its turns on
    their lines), except that ``\\r\\n`` and ``\\r`` become ``\\n``: MTS-Dialog's training CSV has
    CRLF inside its fields, its validation and test files LF. (The target is the summary in the
    task's format: ``free_text`` collapses whitespace.)

    Returns:
        ``list[Example]`` with the text as input and ``summary`` the reference; ``meta`` as for
        :func:`read_qa`.
    """
    f = _fields({"text": "text", "summary": "summary", "id": None}, fields, "read_summarization")

    def convert(loc, row):
        text = _newlines(_text(row, f["text"], path, loc))
        summary = _newlines(_text(row, f["summary"], path, loc))
        return build_example(task, path, loc, text, summary=summary, meta=_meta(path, loc, row, f["id"]))

    return read_examples("read_summarization", path, task, "summarization", convert, layout=layout, on_error=on_error,
                         engine=engine, cache_dir=cache_dir, sheet=sheet)


# The names of the JSONL-only readers these replaced (same arguments, plus layout, on_error, sheet).
read_jsonl_qa = read_qa
read_jsonl_nli = read_nli
read_jsonl_summarization = read_summarization

# The registry (registry.yaml) names readers by these keys.
READERS = {
    "conll": read_conll,
    "brat": read_brat,
    "qa": read_qa,
    "nli": read_nli,
    "summarization": read_summarization,
    "nli4ct": read_nli4ct,
    "jsonl_qa": read_qa,
    "jsonl_nli": read_nli,
    "jsonl_summarization": read_summarization,
}
