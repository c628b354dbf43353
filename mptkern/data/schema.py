"""Task schema: the paper's five task types as text-to-text examples, with structured gold.

A :class:`Task` names a task, its type (``ner``, ``re``, ``qa``, ``nli``, ``summarization``), the
instruction shown to the model, its label schema and its output format. An :class:`Example` holds the
input text, the target text the model is trained to generate, and the structured gold the metrics
need (entity spans with character offsets, relations, the label or answer, the reference summary).

Output formats (``FORMATS``) differ between tasks on purpose, so that transfer from source to target
tasks has to bridge formats as well as label schemas. Each format has a deterministic serializer
(gold -> target text) and a parser (generated text -> structure) that tolerates extra whitespace,
stray separators and wrapping punctuation but is strict about content: a span, type or label that is
not exactly right never matches, and an item the parser cannot read counts as a wrong prediction.

==================  ======  ==========================================================  ============
format              type    target text                                                 empty
==================  ======  ==========================================================  ============
``ner_typed``       ner     ``drug: metoprolol; dose: 25 mg``                           ``none``
``ner_json``        ner     ``{"drug": ["metoprolol"], "dose": ["25 mg"]}``             ``{}``
``ner_inline``      ner     ``metoprolol [DRUG], 25 mg [DOSE]``                         ``none``
``re_tuple``        re      ``(metoprolol | causes | bradycardia); (...)``              ``none``
``re_json``         re      ``[["25 mg", "dose_of", "metoprolol"]]``                    ``[]``
``re_arrow``        re      ``lisinopril --treats--> hypertension; ...``                ``none``
``qa_letter``       qa      ``B`` (the letter of the correct option)                    -
``qa_text``         qa      ``intravenous`` (the text of the correct option)            -
``nli_label``       nli     ``entailment`` (one of the task's labels)                   -
``free_text``       summ.   the summary as one paragraph                                -
``bullets``         summ.   ``- part one\\n- part two`` (summary parts split on ``; ``)   -
==================  ======  ==========================================================  ============

What :func:`parse_output` returns, per task type (and :func:`gold_output` the same for the gold):

* ``ner``: ``list[Entity]`` without offsets, span text whitespace-collapsed, type mapped to the
  task's label when it matches one up to case and ``_``/``-``/space (else kept, so it never matches).
* ``re``: ``list[Relation]``, the same normalisation for both arguments and the type.
* ``qa``: ``str | None``: the option letter (``qa_letter``) or the normalised option text
  (``qa_text``); None when the text holds no answer.
* ``nli``: ``str | None``: the task label, or None when the text is not one of the labels.
* ``summarization``: ``str``: the summary text, whitespace-collapsed.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = [
    "TASK_TYPES", "ANSWER_CUE", "INPUT_FORMAT", "Entity", "Relation", "Example", "Task", "OutputFormat", "FORMATS",
    "make_example", "serialize_target", "parse_output", "gold_output", "render_source",
    "format_qa_input", "format_nli_input", "normalize_answer", "collapse_ws", "option_letter",
]

TASK_TYPES = ("ner", "re", "qa", "nli", "summarization")
# The source text a model sees is "<instruction>\n<input>" + ANSWER_CUE; the target follows it.
ANSWER_CUE = "\nAnswer:"
# the name of that layout (with InputFormat's special prefix), recorded in exported adapters; a
# change of the layout must change it, so that adapters trained with another refuse to load
INPUT_FORMAT = "mptkern-source-v1: [special prefix] instruction \\n input \\nAnswer:"
_NONE = "none"


# ----------------------------------------------------------------------------------------------
# structured gold
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Entity:
    """An entity mention: span ``text``, entity ``type``, and character offsets ``[start, end)`` into
    the example's input (None for predictions, which have no offsets)."""

    text: str
    type: str
    start: int | None = None
    end: int | None = None

    def key(self) -> tuple[str, str]:
        """``(canonical span text, type)``: what strict matching compares (see :func:`canonical_span`)."""
        return canonical_span(self.text), self.type


@dataclasses.dataclass(frozen=True)
class Relation:
    """A relation ``head --type--> tail`` between two span texts."""

    head: str
    type: str
    tail: str

    def key(self) -> tuple[str, str, str]:
        """``(head, type, tail)`` with canonical argument texts: what strict matching compares."""
        return canonical_span(self.head), self.type, canonical_span(self.tail)


@dataclasses.dataclass
class Example:
    """One text-to-text example.

    Attributes:
        task: name of the task it belongs to (the collator maps it to a task id).
        input: the input text (for QA and NLI already laid out with options / premise and hypothesis).
        target: the text the model is trained to generate (the gold serialized in the task's format).
        instruction: the task's instruction, copied here so an example renders on its own.
        entities: NER gold (and, for RE, the argument mentions when known), offsets into ``input``.
        relations: RE gold.
        label: NLI label, or for QA the text of the correct option.
        choices: QA options in order (option ``i`` has letter ``"ABCD..."[i]``).
        summary: reference summary (for the ``bullets`` format its parts are joined by ``"; "``).
        meta: provenance (file, line, document id, generator template...), never used by metrics.
    """

    task: str
    input: str
    target: str
    instruction: str = ""
    entities: tuple[Entity, ...] = ()
    relations: tuple[Relation, ...] = ()
    label: str | None = None
    choices: tuple[str, ...] = ()
    summary: str | None = None
    meta: dict = dataclasses.field(default_factory=dict, compare=False)

    @property
    def source(self) -> str:
        """The full source text: instruction, input and the answer cue (see :func:`render_source`)."""
        return render_source(self.instruction, self.input)


def source_head(instruction: str, input_text: str) -> str:
    """``"<instruction>\\n<input>"``, or just the input when ``instruction`` is empty: the part of
    the source that may be cut to fit (the answer cue never is)."""
    return f"{instruction}\n{input_text}" if instruction else input_text


def render_source(instruction: str, input_text: str) -> str:
    """``"<instruction>\\n<input>\\nAnswer:"`` (no instruction line when ``instruction`` is empty)."""
    return source_head(instruction, input_text) + ANSWER_CUE


# ----------------------------------------------------------------------------------------------
# text helpers
# ----------------------------------------------------------------------------------------------
_WS = re.compile(r"\s+")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def collapse_ws(text: str) -> str:
    """Strip ``text`` and collapse every run of whitespace to one space."""
    return _WS.sub(" ", text).strip()


_SPAN_EDGE = " ,;|"


def canonical_span(text: str) -> str:
    """A span as strict matching compares it: whitespace collapsed and the list separators ``, ; |``
    stripped from its ends. Real gold has spans like ``"colorectal cancer ,"`` (NCBI-disease tags a
    trailing comma token), which no output format can write back, since the parsers strip
    separators from item edges."""
    return collapse_ws(text).strip(_SPAN_EDGE)


def option_letter(i: int) -> str:
    """Letter of option ``i`` (0 -> ``"A"``)."""
    if not 0 <= i < len(_LETTERS):
        raise ValueError(f"option index {i} out of range (at most {len(_LETTERS)} options)")
    return _LETTERS[i]


_EDGE_PUNCT = " \t\r\n.,;:!?\"'`()[]{}<>*"


def normalize_answer(text: str) -> str:
    """Lower-case, collapse whitespace, strip wrapping punctuation, drop a leading ``answer:``:
    ``" (Beta  blocker)."`` -> ``"beta blocker"``. Inner punctuation is content and stays."""
    s = collapse_ws(text).lower()
    s = re.sub(r"^(?:the\s+)?answer\s*(?::|is\b:?)\s*", "", s)
    return s.strip(_EDGE_PUNCT)


def _label_key(text: str) -> str:
    return re.sub(r"[\s_\-]+", "_", text.strip().lower())


def _canon_label(task: Task, raw: str) -> str:
    """Map ``raw`` to the task label equal to it up to case and ``_``/``-``/space; else return it
    stripped (a type outside the schema then never matches the gold)."""
    return task._label_lookup.get(_label_key(raw), raw.strip())


def _strip_fences(text: str) -> str:
    s = text.strip()
    if s.startswith("```"):
        s = re.sub(r"^```[a-zA-Z]*\s*", "", s)
        s = re.sub(r"\s*```\s*$", "", s)
    return s.strip()


def _is_none(text: str) -> bool:
    return normalize_answer(text) in ("none", "no entities", "no relations", "n/a", "")


def _load_jsonish(text: str) -> Any:
    """JSON, or a Python literal (single quotes), from the outermost bracketed part of ``text``;
    None when neither parses."""
    s = _strip_fences(text)
    starts = [i for i in (s.find("{"), s.find("[")) if i >= 0]
    if not starts:
        return None
    start = min(starts)
    end = max(s.rfind("}"), s.rfind("]"))
    if end <= start:
        return None
    chunk = s[start : end + 1]
    for load in (json.loads, ast.literal_eval):
        try:
            return load(chunk)
        except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
            continue
    return None


def _check_free(text: str, reserved: Sequence[str], what: str, fmt: str) -> str:
    t = collapse_ws(text)
    if not t:
        raise ValueError(f"{what} is empty after whitespace collapsing (format {fmt!r})")
    for r in reserved:
        if r in t:
            raise ValueError(
                f"{what} {t!r} contains {r!r}, which format {fmt!r} uses as a delimiter; "
                f"use a JSON format (ner_json / re_json) for such data"
            )
    return t


# ----------------------------------------------------------------------------------------------
# output formats
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OutputFormat:
    """An output format: its name, task type, a description for humans and instructions, and the
    serializer ``(task, example) -> str`` and parser ``(task, text) -> structure``."""

    name: str
    task_type: str
    description: str
    serialize: Callable[[Task, Example], str]
    parse: Callable[[Task, str], Any]


def _sorted_entities(entities: Iterable[Entity]) -> list[Entity]:
    ents = list(entities)
    if all(e.start is not None for e in ents):
        ents.sort(key=lambda e: (e.start, e.end, e.type))
    return ents


# -- NER ---------------------------------------------------------------------------------------
def _ser_ner_typed(task, ex):
    items = [f"{e.type}: {_check_free(e.text, (';',), 'entity span', 'ner_typed')}" for e in _sorted_entities(ex.entities)]
    return "; ".join(items) if items else _NONE


def _parse_ner_typed(task, text):
    s = _strip_fences(text)
    if _is_none(s):
        return []
    out = []
    for item in re.split(r"[;\n]", s):
        item = item.strip().strip(",")
        if not item.strip():
            continue
        if ":" not in item:  # an item without a type is a claimed entity that cannot be right
            out.append(Entity(collapse_ws(item), ""))
            continue
        typ, span = item.split(":", 1)
        if collapse_ws(span):
            out.append(Entity(collapse_ws(span), _canon_label(task, typ)))
    return out


def _ser_ner_json(task, ex):
    groups: dict[str, list[str]] = {}
    order = {label: i for i, label in enumerate(task.labels)}
    for e in _sorted_entities(ex.entities):
        groups.setdefault(e.type, []).append(collapse_ws(e.text))
    keys = sorted(groups, key=lambda k: (order.get(k, len(order)), k))
    return json.dumps({k: groups[k] for k in keys}, ensure_ascii=False)


def _parse_ner_json(task, text):
    obj = _load_jsonish(text)
    out = []
    if isinstance(obj, dict):
        for typ, spans in obj.items():
            for span in spans if isinstance(spans, list) else [spans]:
                if isinstance(span, str) and collapse_ws(span):
                    out.append(Entity(collapse_ws(span), _canon_label(task, str(typ))))
                elif span not in (None, ""):  # a number or nested object is a wrong claim
                    out.append(Entity(collapse_ws(str(span)), ""))
    elif isinstance(obj, list):  # tolerate [["type", "span"], ...] / [{"type":..,"text":..}]
        for item in obj:
            if isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item):
                out.append(Entity(collapse_ws(item[1]), _canon_label(task, item[0])))
            elif isinstance(item, dict) and isinstance(item.get("type"), str) and isinstance(item.get("text"), str):
                out.append(Entity(collapse_ws(item["text"]), _canon_label(task, item["type"])))
            else:
                out.append(Entity(collapse_ws(str(item)), ""))
    return out


_INLINE_ITEM = re.compile(r"([^\[\]]*?)\s*\[\s*([^\[\]]+?)\s*\]")
_SEP_CHARS = " \t\r\n,;|"


def _ser_ner_inline(task, ex):
    items = [f"{_check_free(e.text, ('[', ']'), 'entity span', 'ner_inline')} [{e.type.upper()}]"
             for e in _sorted_entities(ex.entities)]
    return ", ".join(items) if items else _NONE


def _parse_ner_inline(task, text):
    s = _strip_fences(text)
    if _is_none(s):
        return []
    out, pos = [], 0
    for m in _INLINE_ITEM.finditer(s):
        span = m.group(1).strip(_SEP_CHARS)
        if collapse_ws(span):
            out.append(Entity(collapse_ws(span), _canon_label(task, m.group(2))))
        pos = m.end()
    rest = s[pos:].strip(_SEP_CHARS + ".")
    if rest:  # trailing text without a tag: a claimed entity with no type
        out.append(Entity(collapse_ws(rest), ""))
    return out


# -- RE ----------------------------------------------------------------------------------------
def _ser_re_tuple(task, ex):
    items = []
    for r in ex.relations:
        h = _check_free(r.head, ("(", ")", "|"), "relation head", "re_tuple")
        t = _check_free(r.tail, ("(", ")", "|"), "relation tail", "re_tuple")
        items.append(f"({h} | {r.type} | {t})")
    return "; ".join(items) if items else _NONE


def _parse_re_tuple(task, text):
    s = _strip_fences(text)
    if _is_none(s):
        return []
    out, pos = [], 0
    for m in re.finditer(r"\(([^()]*)\)", s):
        between = s[pos : m.start()].strip(_SEP_CHARS + ".")
        if between:
            out.append(Relation(collapse_ws(between), "", ""))
        parts = m.group(1).split("|")
        if len(parts) == 3:
            out.append(Relation(collapse_ws(parts[0]), _canon_label(task, parts[1]), collapse_ws(parts[2])))
        else:
            out.append(Relation(collapse_ws(m.group(1)), "", ""))
        pos = m.end()
    rest = s[pos:].strip(_SEP_CHARS + ".")
    if rest:
        out.append(Relation(collapse_ws(rest), "", ""))
    return out


def _ser_re_json(task, ex):
    return json.dumps([[collapse_ws(r.head), r.type, collapse_ws(r.tail)] for r in ex.relations], ensure_ascii=False)


def _parse_re_json(task, text):
    obj = _load_jsonish(text)
    if isinstance(obj, dict):
        obj = [obj]
    if not isinstance(obj, list):
        return []
    out = []
    for item in obj:
        if isinstance(item, (list, tuple)) and len(item) == 3 and all(isinstance(x, str) for x in item):
            out.append(Relation(collapse_ws(item[0]), _canon_label(task, item[1]), collapse_ws(item[2])))
        elif isinstance(item, dict) and all(isinstance(item.get(k), str) for k in ("head", "type", "tail")):
            out.append(Relation(collapse_ws(item["head"]), _canon_label(task, item["type"]), collapse_ws(item["tail"])))
        else:
            out.append(Relation(collapse_ws(str(item)), "", ""))
    return out


_ARROW = re.compile(r"^(.*?)\s*--\s*(.+?)\s*-->\s*(.*)$", re.S)


def _ser_re_arrow(task, ex):
    items = []
    for r in ex.relations:
        h = _check_free(r.head, (";", "--"), "relation head", "re_arrow")
        t = _check_free(r.tail, (";", "--"), "relation tail", "re_arrow")
        items.append(f"{h} --{r.type}--> {t}")
    return "; ".join(items) if items else _NONE


def _parse_re_arrow(task, text):
    s = _strip_fences(text)
    if _is_none(s):
        return []
    out = []
    for item in re.split(r"[;\n]", s):
        item = item.strip().strip(",")
        if not item:
            continue
        m = _ARROW.match(item)
        if m and collapse_ws(m.group(1)) and collapse_ws(m.group(3)):
            out.append(Relation(collapse_ws(m.group(1)), _canon_label(task, m.group(2)), collapse_ws(m.group(3))))
        else:
            out.append(Relation(collapse_ws(item), "", ""))
    return out


# -- QA ----------------------------------------------------------------------------------------
def _answer_index(ex: Example) -> int:
    try:
        return ex.choices.index(ex.label)
    except ValueError:
        raise ValueError(f"QA answer {ex.label!r} is not one of the options {list(ex.choices)}") from None


def _ser_qa_letter(task, ex):
    return option_letter(_answer_index(ex))


_LETTER = re.compile(r"^[\s(\[\"'*]*(?:(?:the\s+)?answer\s*(?::|is\b:?)\s*)?[\s(\[\"'*]*([A-Za-z])\s*(?:[)\].:,\-]\s*.*)?$",
                     re.I | re.S)


def _parse_qa_letter(task, text):
    m = _LETTER.match(_strip_fences(text))
    return m.group(1).upper() if m else None


def _ser_qa_text(task, ex):
    _answer_index(ex)
    return collapse_ws(ex.label)


def _parse_qa_text(task, text):
    return normalize_answer(text) or None


# -- NLI ---------------------------------------------------------------------------------------
def _ser_nli_label(task, ex):
    return ex.label


def _parse_nli_label(task, text):
    raw = normalize_answer(text)
    return task._label_lookup.get(_label_key(raw)) if raw else None


# -- summarization -----------------------------------------------------------------------------
def _ser_free_text(task, ex):
    return collapse_ws(ex.summary)


def _parse_free_text(task, text):
    return collapse_ws(text)


def _ser_bullets(task, ex):
    parts = [_check_free(p, ("\n",), "summary part", "bullets") for p in ex.summary.split("; ")]
    return "\n".join(f"- {p}" for p in parts)


def _parse_bullets(task, text):
    parts = [collapse_ws(re.sub(r"^\s*(?:[-*\u2022]|\d+[.)])\s*", "", line)) for line in text.splitlines()]
    return "; ".join(p for p in parts if p)


FORMATS: dict[str, OutputFormat] = {f.name: f for f in (
    OutputFormat("ner_typed", "ner", "entities as 'type: span' items joined by '; ' in text order; 'none' when there are none",
                 _ser_ner_typed, _parse_ner_typed),
    OutputFormat("ner_json", "ner", 'a JSON object mapping each entity type to its list of spans, e.g. {"drug": ["aspirin"]}; {} when there are none',
                 _ser_ner_json, _parse_ner_json),
    OutputFormat("ner_inline", "ner", "entities as 'span [TYPE]' items joined by ', ' in text order; 'none' when there are none",
                 _ser_ner_inline, _parse_ner_inline),
    OutputFormat("re_tuple", "re", "relations as '(head | type | tail)' joined by '; '; 'none' when there are none",
                 _ser_re_tuple, _parse_re_tuple),
    OutputFormat("re_json", "re", 'a JSON list of [head, type, tail] triples; [] when there are none',
                 _ser_re_json, _parse_re_json),
    OutputFormat("re_arrow", "re", "relations as 'head --type--> tail' joined by '; '; 'none' when there are none",
                 _ser_re_arrow, _parse_re_arrow),
    OutputFormat("qa_letter", "qa", "the letter of the correct option", _ser_qa_letter, _parse_qa_letter),
    OutputFormat("qa_text", "qa", "the text of the correct option", _ser_qa_text, _parse_qa_text),
    OutputFormat("nli_label", "nli", "one label word", _ser_nli_label, _parse_nli_label),
    OutputFormat("free_text", "summarization", "a short summary in running text", _ser_free_text, _parse_free_text),
    OutputFormat("bullets", "summarization", "a summary as '- ' bullet lines", _ser_bullets, _parse_bullets),
)}


# ----------------------------------------------------------------------------------------------
# tasks
# ----------------------------------------------------------------------------------------------
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_LABEL = re.compile(r"^[^\s:;|\[\]()\"']([^:;|\[\]()\"']*[^\s:;|\[\]()\"'])?$")


@dataclasses.dataclass
class Task:
    """A task: what it is, how it is asked, how it is answered, and its examples.

    Attributes:
        name: unique name (letters, digits, ``_ . -``).
        type: one of ``TASK_TYPES``.
        instruction: the instruction line shown to the model before every input.
        labels: the label schema: entity types (ner), relation types (re), NLI labels (nli), the
            closed answer vocabulary or fixed choices (qa; may be empty when options vary freely), the
            content fields a summary covers (summarization; descriptive only).
        output_format: a key of ``FORMATS`` whose task type is ``type``.
        train, eval: the task's examples.
        meta: provenance (``{"source": "synthetic", ...}`` or the registry entry).
    """

    name: str
    type: str
    instruction: str
    labels: tuple[str, ...]
    output_format: str
    train: list[Example] = dataclasses.field(default_factory=list, repr=False)
    eval: list[Example] = dataclasses.field(default_factory=list, repr=False)
    meta: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if not _NAME.match(self.name or ""):
            raise ValueError(f"task name {self.name!r} must be letters, digits and '_.-'")
        if self.type not in TASK_TYPES:
            raise ValueError(f"task {self.name!r}: type {self.type!r} is not one of {TASK_TYPES}")
        fmt = FORMATS.get(self.output_format)
        if fmt is None:
            raise ValueError(f"task {self.name!r}: unknown output format {self.output_format!r}; known: {sorted(FORMATS)}")
        if fmt.task_type != self.type:
            raise ValueError(f"task {self.name!r}: format {self.output_format!r} is for {fmt.task_type} tasks, not {self.type}")
        self.labels = tuple(self.labels)
        if self.type in ("ner", "re", "nli") and not self.labels:
            raise ValueError(f"task {self.name!r}: a {self.type} task needs a non-empty label schema")
        for label in self.labels:
            if self.type != "qa" and not _LABEL.match(label):
                raise ValueError(f"task {self.name!r}: label {label!r} must be non-empty without ':;|[]()\"' or edge spaces")
        lookup: dict[str, str] = {}
        for label in self.labels:
            k = _label_key(label)
            if k in lookup:
                raise ValueError(f"task {self.name!r}: labels {lookup[k]!r} and {label!r} differ only in case or '_-'")
            lookup[k] = label
        self._label_lookup = lookup

    @property
    def format(self) -> OutputFormat:
        """The task's :class:`OutputFormat`."""
        return FORMATS[self.output_format]

    @property
    def format_description(self) -> str:
        """Human-readable description of the output format."""
        return self.format.description

    def example(self, input: str, **gold) -> Example:  # noqa: A002
        """Build a validated example of this task (see :func:`make_example`)."""
        return make_example(self, input, **gold)

    def parse(self, text: str):
        """Structure of a generated ``text`` (see :func:`parse_output`)."""
        return parse_output(self, text)

    def examples(self, split: str) -> list[Example]:
        """``train`` or ``eval`` examples."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        return self.train if split == "train" else self.eval


def format_qa_input(question: str, choices: Sequence[str], context: str | None = None) -> str:
    """QA input layout: ``Question: ...``, ``Options: A) .. B) ..``, then the optional context
    line. The context comes last because a source too long for ``max_length`` is cut from its end:
    a long abstract loses its tail, never the question or the options."""
    opts = " ".join(f"{option_letter(i)}) {collapse_ws(c)}" for i, c in enumerate(choices))
    lines = [f"Question: {collapse_ws(question)}", f"Options: {opts}"] + ([collapse_ws(context)] if context else [])
    return "\n".join(lines)


def format_nli_input(premise: str, hypothesis: str) -> str:
    """NLI input layout: ``Hypothesis: ...`` then ``Premise: ...``. The premise comes last because a
    source too long for ``max_length`` is cut from its end: a long trial section loses its tail, never
    the statement being judged."""
    return f"Hypothesis: {collapse_ws(hypothesis)}\nPremise: {collapse_ws(premise)}"


def make_example(task: Task, input: str, *, entities: Iterable[Entity] = (), relations: Iterable[Relation] = (),  # noqa: A002
                 label: str | None = None, choices: Sequence[str] = (), summary: str | None = None,
                 meta: dict | None = None) -> Example:
    """Validate the gold against ``task`` and ``input`` and serialize it into the target text.

    Checks: entity offsets lie in ``input`` and ``input[start:end] == text``; entity and relation
    types are in the task's labels; an NLI label is one of the labels; a QA label is one of
    ``choices`` (and, when the task has labels and no per-example choices are given, the task's
    labels are the choices); a summary is non-empty. Raises ValueError saying which check failed.

    Returns:
        an :class:`Example` whose ``target`` is ``serialize_target(task, example)``.
    """
    entities, relations = tuple(entities), tuple(relations)
    labels = set(task.labels)
    for e in entities:
        if e.start is not None or e.end is not None:
            if e.start is None or e.end is None or not 0 <= e.start < e.end <= len(input):
                raise ValueError(f"entity {e.text!r}: offsets [{e.start}, {e.end}) outside the input (length {len(input)})")
            if input[e.start : e.end] != e.text:
                raise ValueError(f"entity {e.text!r}: input[{e.start}:{e.end}] is {input[e.start:e.end]!r}")
        if task.type == "ner" and e.type not in labels:
            raise ValueError(f"entity type {e.type!r} is not in task {task.name!r}'s labels {list(task.labels)}")
    if task.type == "re":
        for r in relations:
            if r.type not in labels:
                raise ValueError(f"relation type {r.type!r} is not in task {task.name!r}'s labels {list(task.labels)}")
    if task.type == "nli" and label not in labels:
        raise ValueError(f"NLI label {label!r} is not in task {task.name!r}'s labels {list(task.labels)}")
    if task.type == "qa":
        choices = tuple(choices) or task.labels
        if len(choices) < 2:
            raise ValueError("a QA example needs at least two options")
        if len(set(map(normalize_answer, choices))) != len(choices):
            raise ValueError(f"QA options are not distinct after normalisation: {list(choices)}")
        if label not in choices:
            raise ValueError(f"QA answer {label!r} is not one of the options {list(choices)}")
    if task.type == "summarization" and not (summary and summary.strip()):
        raise ValueError("a summarization example needs a non-empty reference summary")
    ex = Example(task.name, input, "", task.instruction, entities, relations, label, tuple(choices), summary,
                 dict(meta or {}))
    ex.target = serialize_target(task, ex)
    return ex


def serialize_target(task: Task, example: Example) -> str:
    """Deterministic target text of ``example``'s gold in ``task``'s output format."""
    return task.format.serialize(task, example)


def parse_output(task: Task, text: str):
    """Parse generated ``text`` into the structure of ``task``'s type (see the module docstring)."""
    return task.format.parse(task, text)


def gold_output(task: Task, example: Example):
    """The gold of ``example`` in the structure :func:`parse_output` returns, so that
    ``parse_output(task, example.target) == gold_output(task, example)`` (lists up to order)."""
    if task.type == "ner":
        return [Entity(canonical_span(e.text), e.type) for e in _sorted_entities(example.entities)]
    if task.type == "re":
        return [Relation(canonical_span(r.head), r.type, canonical_span(r.tail)) for r in example.relations]
    if task.type == "qa":
        choices = example.choices or task.labels
        if task.output_format == "qa_letter":
            return option_letter(list(choices).index(example.label))
        return normalize_answer(example.label)
    if task.type == "nli":
        return example.label
    if task.output_format == "bullets":
        return "; ".join(collapse_ws(p) for p in example.summary.split("; ") if collapse_ws(p))
    return collapse_ws(example.summary)
