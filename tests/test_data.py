"""mptkern.data: schema and output formats, readers, registry, synthetic suite, collators, samplers."""

import json
import re
import warnings
from collections import Counter

import pytest
import torch

from mptkern.data import (
    FORMATS, TASK_TYPES, Collator, DataFormatError, Entity, IgnoredAnnotationsWarning, InputFormat,
    MixedTaskSampler, Relation, Task, TaskSubsetSampler, flatten, gold_output, load_registry, make_example,
    make_suite, parse_output, read_brat, read_conll, read_jsonl, read_jsonl_nli, read_jsonl_qa,
    read_jsonl_summarization, read_registry, registry_path, task_sizes,
)
from mptkern.data.schema import ANSWER_CUE


@pytest.fixture(scope="module")
def suite():
    return make_suite(seed=0, n_train=24, n_eval=12)


def all_tasks(s):
    return s["sources"] + s["targets"]


def ner(fmt="ner_typed", labels=("drug", "dose", "adverse_event")):
    return Task("t_ner", "ner", "Extract.", labels, fmt)


def rel(fmt="re_tuple", labels=("causes", "treats", "Strength-Drug")):
    return Task("t_re", "re", "Relate.", labels, fmt)


def same(parsed, gold):
    return Counter(parsed) == Counter(gold) if isinstance(gold, list) else parsed == gold


# ----------------------------------------------------------------------------------------------
# schema and formats
# ----------------------------------------------------------------------------------------------
def test_round_trip_target_parse_gold_for_every_synthetic_example(suite):
    formats = set()
    for task in all_tasks(suite):
        formats.add(task.output_format)
        for ex in task.train + task.eval:
            assert ex.task == task.name and ex.instruction == task.instruction
            assert same(parse_output(task, ex.target), gold_output(task, ex)), (task.name, ex.target)
            for e in ex.entities:
                assert ex.input[e.start:e.end] == e.text
            assert ex.source == f"{task.instruction}\n{ex.input}{ANSWER_CUE}"
    assert formats == set(FORMATS), "every output format is used by some synthetic task"


@pytest.mark.parametrize("fmt,text,expect", [
    ("ner_typed", "  drug:  aspirin ;dose: 81   mg;; \n", [("aspirin", "drug"), ("81 mg", "dose")]),
    ("ner_typed", "Drug: aspirin; ADVERSE EVENT: rash", [("aspirin", "drug"), ("rash", "adverse_event")]),
    ("ner_typed", " None. ", []),
    ("ner_json", '```json\n{"drug": ["aspirin", "heparin"], "dose": "81 mg"}\n```', [("aspirin", "drug"), ("heparin", "drug"), ("81 mg", "dose")]),
    ("ner_json", "{'drug': ['aspirin']}.", [("aspirin", "drug")]),
    ("ner_json", '[["drug", "aspirin"]]', [("aspirin", "drug")]),
    ("ner_json", "{}", []),
    ("ner_inline", "aspirin [DRUG] | 81 mg [ dose ],rash [Adverse_Event].", [("aspirin", "drug"), ("81 mg", "dose"), ("rash", "adverse_event")]),
    ("ner_inline", "none", []),
])
def test_ner_parsers_tolerate_whitespace_and_punctuation(fmt, text, expect):
    assert [e.key() for e in parse_output(ner(fmt), text)] == expect


@pytest.mark.parametrize("fmt,text,expect", [
    ("re_tuple", " ( metoprolol |causes|  bradycardia ) ;(x | TREATS | y). ", [("metoprolol", "causes", "bradycardia"), ("x", "treats", "y")]),
    ("re_json", "[['a', 'causes', 'b'], {\"head\": \"c\", \"type\": \"treats\", \"tail\": \"d\"}]", [("a", "causes", "b"), ("c", "treats", "d")]),
    ("re_json", "[]", []),
    ("re_arrow", "5 mg --Strength-Drug--> aspirin;\nlisinopril -- treats --> hypertension", [("5 mg", "Strength-Drug", "aspirin"), ("lisinopril", "treats", "hypertension")]),
    ("re_arrow", "none.", []),
])
def test_re_parsers_tolerate_whitespace_and_punctuation(fmt, text, expect):
    assert [r.key() for r in parse_output(rel(fmt), text)] == expect


def test_parsers_are_strict_about_content():
    t = ner("ner_typed")
    # span text is compared exactly (case included); an unknown type is kept, so it cannot match
    assert [e.key() for e in parse_output(t, "drug: Aspirin; med: heparin")] == [("Aspirin", "drug"), ("heparin", "med")]
    # an item without a type is a wrong claim, not silently dropped
    assert [e.key() for e in parse_output(t, "drug: aspirin; heparin")] == [("aspirin", "drug"), ("heparin", "")]
    assert [e.key() for e in parse_output(ner("ner_inline"), "aspirin [DRUG] and heparin")] == [("aspirin", "drug"), ("and heparin", "")]
    assert parse_output(ner("ner_json"), '{"drug": ["aspirin"') == []  # unparseable JSON holds no entities
    assert [r.key() for r in parse_output(rel("re_tuple"), "(a | causes)")] == [("a | causes", "", "")]
    assert [r.key() for r in parse_output(rel("re_json"), '[["a", "causes"]]')][0][1] == ""
    assert [r.key() for r in parse_output(rel("re_arrow"), "a causes b")] == [("a causes b", "", "")]


def test_qa_nli_summarization_parsers():
    qa = Task("q", "qa", "Answer.", (), "qa_letter")
    for text in ("B", " (B) ", "B.", "b", "Answer: B", "The answer is B) warfarin", "B) warfarin"):
        assert parse_output(qa, text) == "B", text
    for text in ("B or C", "warfarin", "", "Because"):
        assert parse_output(qa, text) is None, text
    qt = Task("qt", "qa", "Answer.", (), "qa_text")
    assert parse_output(qt, "  Intravenous. ") == "intravenous"
    assert parse_output(qt, "Answer: beta  blocker") == "beta blocker"
    assert parse_output(qt, "answering service") == "answering service"
    nli = Task("n", "nli", "Judge.", ("entailment", "neutral", "contradiction", "not_mentioned"), "nli_label")
    assert parse_output(nli, " Entailment.\n") == "entailment"
    assert parse_output(nli, "not mentioned") == "not_mentioned"
    assert parse_output(nli, "entails") is None
    bul = Task("s", "summarization", "Sum.", (), "bullets")
    assert parse_output(bul, "* 70-year-old man\n\n-  cough  for 3 days\n1. fever") == "70-year-old man; cough for 3 days; fever"
    assert parse_output(Task("f", "summarization", "Sum.", (), "free_text"), " a\n b ") == "a b"


def test_serialization_is_deterministic_and_rejects_delimiters_in_spans():
    t = ner("ner_typed")
    text = "aspirin 81 mg"
    ents = [Entity("81 mg", "dose", 8, 13), Entity("aspirin", "drug", 0, 7)]
    assert make_example(t, text, entities=ents).target == "drug: aspirin; dose: 81 mg"  # text order
    assert make_example(ner("ner_json"), text, entities=ents).target == '{"drug": ["aspirin"], "dose": ["81 mg"]}'
    assert make_example(ner("ner_inline"), text, entities=ents).target == "aspirin [DRUG], 81 mg [DOSE]"
    assert make_example(t, text).target == "none" and make_example(ner("ner_json"), text).target == "{}"
    with pytest.raises(ValueError, match="delimiter"):
        make_example(t, "a;b", entities=[Entity("a;b", "drug", 0, 3)])
    with pytest.raises(ValueError, match="delimiter"):
        make_example(rel("re_tuple"), "x", relations=[Relation("a|b", "causes", "c")])
    # the JSON formats escape anything
    ex = make_example(rel("re_json"), "x", relations=[Relation('a "b"; (c)|d', "causes", "e")])
    assert parse_output(rel("re_json"), ex.target) == gold_output(rel("re_json"), ex)


def test_make_example_and_task_validation():
    t = ner()
    with pytest.raises(ValueError, match="input\\[0:4\\] is 'aspi'"):
        make_example(t, "aspirin", entities=[Entity("asp", "drug", 0, 4)])
    with pytest.raises(ValueError, match="not in task"):
        make_example(t, "aspirin", entities=[Entity("aspirin", "med", 0, 7)])
    with pytest.raises(ValueError, match="not one of the options"):
        make_example(Task("q", "qa", "A.", (), "qa_letter"), "q?", label="c", choices=["a", "b"])
    with pytest.raises(ValueError, match="NLI label"):
        make_example(Task("n", "nli", "J.", ("yes", "no"), "nli_label"), "p", label="maybe")
    with pytest.raises(ValueError, match="summary"):
        make_example(Task("s", "summarization", "S.", (), "free_text"), "text", summary=" ")
    with pytest.raises(ValueError, match="is for ner tasks"):
        Task("x", "re", "R.", ("a",), "ner_json")
    with pytest.raises(ValueError, match="differ only in case"):
        Task("x", "ner", "N.", ("Drug", "drug"), "ner_typed")
    with pytest.raises(ValueError, match="type"):
        Task("x", "classification", "N.", ("a",), "ner_typed")
    with pytest.raises(ValueError, match="non-empty label schema"):
        Task("x", "ner", "N.", (), "ner_typed")


# ----------------------------------------------------------------------------------------------
# readers
# ----------------------------------------------------------------------------------------------
def test_read_conll_bio_and_bioes(tmp_path):
    p = tmp_path / "a.bio"
    p.write_text("-DOCSTART- O\n\nGave\tO\naspirin\tB-drug\n81\tB-dose\nmg\tI-dose\n.\tO\n\n\n"
                 "rash\tS-adverse_event\nafter\tO\nheparin\tB-drug\nsodium\tE-drug\n")
    exs = read_conll(p, ner())
    assert [ex.input for ex in exs] == ["Gave aspirin 81 mg .", "rash after heparin sodium"]
    assert [e.key() for e in exs[0].entities] == [("aspirin", "drug"), ("81 mg", "dose")]
    assert exs[0].entities[1].start == 13 and exs[0].target == "drug: aspirin; dose: 81 mg"
    assert [e.key() for e in exs[1].entities] == [("rash", "adverse_event"), ("heparin sodium", "drug")]
    assert exs[1].meta["line"] == 10


def test_read_conll_orphan_inside_tag_type_map_and_unknown_types(tmp_path):
    p = tmp_path / "b.bio"
    p.write_text("took O\naspirin I-Drug\nfor O\npain B-reason\n")
    with pytest.raises(DataFormatError, match=r"b\.bio:2: .*does not continue"):
        read_conll(p, ner(), strict=True)
    with pytest.raises(DataFormatError, match=r"b\.bio:2: entity type 'Drug'"):
        read_conll(p, ner())
    exs = read_conll(p, ner(), type_map={"Drug": "drug", "reason": None})
    assert [e.key() for e in exs[0].entities] == [("aspirin", "drug")]  # I- starts an entity (conlleval)
    exs = read_conll(p, ner(), type_map={"Drug": "drug"}, on_unknown="drop")
    assert [e.key() for e in exs[0].entities] == [("aspirin", "drug")]


@pytest.mark.parametrize("content,line,match", [
    ("aspirin B-drug\nlonely\n", 2, "expected at least 2 columns"),
    ("aspirin B-drug\n\nheparin X-drug\n", 3, "not O, B-TYPE"),
    ("aspirin B-\n", 1, "not O, B-TYPE"),
])
def test_read_conll_malformed_names_file_and_line(tmp_path, content, line, match):
    p = tmp_path / "bad.conll"
    p.write_text(content)
    with pytest.raises(DataFormatError, match=match) as err:
        read_conll(p, ner())
    assert str(err.value).startswith(f"{p}:{line}:") and err.value.line == line


BRAT_TXT = "Pt on warfarin 5 mg.\n\nDeveloped hematuria on warfarin; stopped.\nAlso heparin drip.\n"


def brat_ann(text):
    def span(s, nth=0):
        i = -1
        for _ in range(nth + 1):
            i = text.index(s, i + 1)
        return f"{i} {i + len(s)}"
    return "\n".join([
        f"T1\tDrug {span('warfarin')}\twarfarin",
        f"T2\tStrength {span('5 mg')}\t5 mg",
        f"T3\tADE {span('hematuria')}\thematuria",
        f"T4\tDrug {span('warfarin', 1)}\twarfarin",
        f"T5\tDrug {span('heparin')};{span('drip')}\theparin drip",
        "R1\tStrength-Drug Arg1:T2 Arg2:T1",
        "R2\tADE-Drug Arg1:T3 Arg2:T4",
        "E1\tDrug:T1 Status:T2",
        "A1\tNegation T3",
        "#1\tAnnotatorNotes T1\tcheck",
        "",
    ])


def write_brat(tmp_path, text=BRAT_TXT, ann=None, name="doc1", newline="\n"):
    (tmp_path / f"{name}.txt").write_bytes(text.replace("\n", newline).encode())
    (tmp_path / f"{name}.ann").write_text(ann if ann is not None else brat_ann(text.replace("\n", newline)))


BRAT_NER = Task("n2c2_ner", "ner", "Extract.", ("Drug", "Strength", "ADE"), "ner_json")
BRAT_RE = Task("n2c2_re", "re", "Relate.", ("Strength-Drug", "ADE-Drug"), "re_json")


def test_read_brat_ner_segments_and_ignored_lines(tmp_path):
    write_brat(tmp_path)
    with pytest.raises(DataFormatError, match=r"doc1\.ann:5: discontinuous span"):
        read_brat(tmp_path, BRAT_NER)
    report = Counter()
    with pytest.warns(IgnoredAnnotationsWarning, match=r"attribute \(A\) lines 1, ignored event \(E\) lines 1, ignored note \(#\) lines 1"):
        exs = read_brat(tmp_path, BRAT_NER, segment="paragraph", discontinuous="span", report=report)
    assert [ex.input for ex in exs] == ["Pt on warfarin 5 mg.", "Developed hematuria on warfarin; stopped.\nAlso heparin drip."]
    assert [e.key() for e in exs[0].entities] == [("warfarin", "Drug"), ("5 mg", "Strength")]
    assert [e.key() for e in exs[1].entities] == [("hematuria", "ADE"), ("warfarin", "Drug"), ("heparin drip", "Drug")]
    for ex in exs:
        for e in ex.entities:
            assert ex.input[e.start:e.end] == e.text
    assert exs[1].meta["line"] == 3 and exs[1].meta["offset"] == BRAT_TXT.index("Developed")
    assert report["ignored event (E) lines"] == 1 and report["ignored attribute (A) lines"] == 1
    # discontinuous entities skipped; "join" keeps their text without offsets
    with pytest.warns(IgnoredAnnotationsWarning):
        exs = read_brat(tmp_path, BRAT_NER, segment="line", discontinuous="skip")
    assert [ex.input for ex in exs] == ["Pt on warfarin 5 mg.", "Developed hematuria on warfarin; stopped.", "Also heparin drip."]
    assert exs[2].target == "{}"
    with pytest.warns(IgnoredAnnotationsWarning):
        exs = read_brat(tmp_path, BRAT_NER, segment="line", discontinuous="join", keep_empty=False)
    assert exs[-1].entities == (Entity("heparin drip", "Drug"),)


def test_read_brat_relations_events_and_crlf(tmp_path):
    write_brat(tmp_path, newline="\r\n")  # offsets count the \r characters
    with pytest.warns(IgnoredAnnotationsWarning):
        exs = read_brat(tmp_path, BRAT_RE, segment="paragraph", discontinuous="skip", keep_empty=False)
    assert [[r.key() for r in ex.relations] for ex in exs] == [[("5 mg", "Strength-Drug", "warfarin")],
                                                                 [("hematuria", "ADE-Drug", "warfarin")]]
    assert json.loads(exs[0].target) == [["5 mg", "Strength-Drug", "warfarin"]]
    # a document-level segment keeps both; events as relations (trigger, role, argument)
    ev = Task("ev", "re", "R.", ("Status",), "re_tuple")
    with pytest.warns(IgnoredAnnotationsWarning):
        exs = read_brat(tmp_path, ev, discontinuous="skip", events="relations", relation_map={"Strength-Drug": None},
                        on_unknown="drop")
    assert [r.key() for r in exs[0].relations] == [("warfarin", "Status", "5 mg")]


@pytest.mark.parametrize("ann,line,match", [
    ("T1\tDrug 6 14\twarfarin\nT2\tDrug 0 2\tXX\n", 2, "does not match"),
    ("T1\tDrug 6 14\twarfarin\nR1\tStrength-Drug Arg1:T9 Arg2:T1\n", 2, "T9 is not a T entity"),
    ("T1\tDrug 6 x\twarfarin\n", 1, "not 'START END'"),
    ("T1\tDrug 6 999\twarfarin\n", 1, "outside"),
    ("X1\tfoo\n", 1, "unknown annotation line"),
    ("T1\tDrug\n", 1, "needs"),
    ("T1\tDrug 6 14\twarfarin\nT1\tDrug 6 14\twarfarin\n", 2, "duplicate id"),
])
def test_read_brat_malformed_names_file_and_line(tmp_path, ann, line, match):
    write_brat(tmp_path, ann=ann)
    with pytest.raises(DataFormatError, match=match) as err:
        read_brat(tmp_path / "doc1.ann", BRAT_RE)
    assert str(err.value).startswith(f"{tmp_path / 'doc1.ann'}:{line}:")


def test_read_brat_missing_text_file(tmp_path):
    (tmp_path / "lonely.ann").write_text("")
    with pytest.raises(DataFormatError, match="no text file lonely.txt"):
        read_brat(tmp_path, BRAT_NER)


def write_jsonl(path, rows, raw_lines=()):
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_jsonl_exact_or_through_datasets_and_bad_lines(tmp_path, monkeypatch):
    p = tmp_path / "rows.jsonl"
    p.write_text('{"a": 1, "b": ["x"]}\n\n{"a": 2, "b": []}\n')
    import datasets

    calls = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or real(*a, **k))
    expect = [(1, {"a": 1, "b": ["x"]}), (3, {"a": 2, "b": []})]
    assert read_jsonl(p) == expect and not calls
    assert read_jsonl(p, engine="datasets", cache_dir=str(tmp_path / "hf")) == expect
    assert calls and calls[0][0] == "json"
    for engine in ("json", "datasets"):
        p.write_text('{"a": 1}\n\n{"a": 2,\n')
        with pytest.raises(DataFormatError, match=r"rows\.jsonl:3: invalid JSON"):
            read_jsonl(p, engine=engine, cache_dir=str(tmp_path / "hf"))
        p.write_text('{"a": 1}\n{"a": "x"}\n[1]\n')
        with pytest.raises(DataFormatError, match=r"rows\.jsonl:3: expected a JSON object"):
            read_jsonl(p, engine=engine, cache_dir=str(tmp_path / "hf"))


def test_read_jsonl_qa_option_layouts(tmp_path):
    qa = Task("mcq", "qa", "Answer with the letter.", (), "qa_letter")
    p = write_jsonl(tmp_path / "medqa.jsonl", [
        {"question": "Drug for AF?", "options": {"A": "apixaban", "B": "insulin", "C": "ibuprofen", "D": "omeprazole"}, "answer_idx": "A"},
        {"question": "Statin?", "options": {"A": "warfarin", "B": "atorvastatin", "C": "heparin", "D": "metformin"}, "answer_idx": "B"},
    ])
    exs = read_jsonl_qa(p, qa, fields={"answer": "answer_idx"})
    assert [ex.target for ex in exs] == ["A", "B"] and exs[1].label == "atorvastatin"
    assert exs[0].input == "Question: Drug for AF?\nOptions: A) apixaban B) insulin C) ibuprofen D) omeprazole"
    p = write_jsonl(tmp_path / "mcqa.jsonl", [{"q": "Beta blocker?", "opa": "metoprolol", "opb": "lisinopril", "cop": 1}])
    exs = read_jsonl_qa(p, qa, fields={"question": "q", "options": ["opa", "opb"], "answer": "cop"},
                        answer_format="index1")
    assert exs[0].label == "metoprolol" and exs[0].target == "A"
    p = write_jsonl(tmp_path / "head.jsonl", [{"qtext": "Loop diuretic?", "answers": [{"aid": 1, "atext": "furosemide"},
                                                                                      {"aid": 2, "atext": "amlodipine"}], "ra": 2}])
    exs = read_jsonl_qa(p, qa, fields={"question": "qtext", "options": "answers", "answer": "ra"},
                        option_text_key="atext", answer_format="index1")
    assert exs[0].label == "amlodipine"
    fixed = Task("pqa", "qa", "Answer yes, no or maybe.", ("yes", "no", "maybe"), "qa_text")
    p = write_jsonl(tmp_path / "pqa.jsonl", [{"question": "Does it work?", "context": ["Abstract text."], "final_decision": "Maybe"}])
    exs = read_jsonl_qa(p, fixed, fields={"options": None, "answer": "final_decision", "context": "context"})
    assert exs[0].target == "maybe" and exs[0].input == ("Question: Does it work?\nOptions: A) yes B) no C) maybe\n"
                                                          "Abstract text.")


def test_read_jsonl_qa_errors_name_the_line(tmp_path):
    qa = Task("mcq", "qa", "A.", (), "qa_letter")
    p = write_jsonl(tmp_path / "q.jsonl", [{"question": "q1", "options": ["a", "b"], "answer": "B"}],
                    raw_lines=["", json.dumps({"question": "q2", "options": ["a", "b"], "answer": "E"})])
    with pytest.raises(DataFormatError, match=r"q\.jsonl:3: answer 'E'"):
        read_jsonl_qa(p, qa)
    p = write_jsonl(tmp_path / "q2.jsonl", [{"question": "q1", "options": ["a", "b"], "answer": 0}, {"options": ["a", "b"], "answer": 1}])
    with pytest.raises(DataFormatError, match=r"q2\.jsonl:2: missing or empty field 'question'"):
        read_jsonl_qa(p, qa)
    with pytest.raises(ValueError, match="unknown field key"):
        read_jsonl_qa(p, qa, fields={"query": "q"})


def test_read_jsonl_nli_and_summarization(tmp_path):
    nli = Task("mednli", "nli", "Judge.", ("entailment", "neutral", "contradiction"), "nli_label")
    p = write_jsonl(tmp_path / "nli.jsonl", [
        {"sentence1": "No fever.", "sentence2": "Patient is febrile.", "gold_label": "contradiction"},
        {"sentence1": "Cough.", "sentence2": "Has cough.", "gold_label": 0},
        {"sentence1": "x", "sentence2": "y", "gold_label": "-"},
    ])
    f = {"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"}
    with pytest.raises(DataFormatError, match=r"nli\.jsonl:2: label 0"):
        read_jsonl_nli(p, nli, fields=f)
    exs = read_jsonl_nli(p, nli, fields=f, label_map={0: "entailment"}, on_unknown="skip")
    assert [ex.target for ex in exs] == ["contradiction", "entailment"]
    assert exs[0].input == "Hypothesis: Patient is febrile.\nPremise: No fever."
    summ = Task("cxr", "summarization", "Summarize.", (), "free_text")
    p = write_jsonl(tmp_path / "s.jsonl", [{"findings": "Clear lungs.  No effusion.", "impression": "No acute  process."}])
    exs = read_jsonl_summarization(p, summ, fields={"text": "findings", "summary": "impression"})
    assert exs[0].input == "Clear lungs.  No effusion." and exs[0].target == "No acute process."


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------
def test_packaged_registry_entries_build_tasks_and_cover_all_types():
    entries = read_registry()
    assert registry_path().name == "registry.yaml"
    roles = Counter(e.role for e in entries)
    assert roles["source"] >= 8 and roles["target"] >= 6
    assert {e.type for e in entries if e.role == "target"} == set(TASK_TYPES)
    for e in entries:
        Task(e.name, e.type, e.instruction, e.labels, e.output_format)  # labels and format are valid
    text = registry_path().read_text()
    assert "NONE OF THESE DATASETS SHIP" in text


def test_load_registry_lists_every_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_registry(None, tmp_path, names=["mednli", "n2c2_2018_med_ner"])
    msg = str(err.value)
    for part in ("mednli train", "mednli eval", "n2c2_2018_med_ner train", "n2c2_2018_track2/test"):
        assert part in msg
    with pytest.raises(KeyError, match="unknown registry tasks"):
        load_registry(None, tmp_path, names=["nope"])


def test_load_registry_reads_local_files(tmp_path):
    reg = tmp_path / "reg.yaml"
    reg.write_text("""
version: 1
tasks:
  - {name: tiny_nli, role: source, type: nli, reader: jsonl_nli, paths: {train: nli.jsonl}, eval_fraction: 0.5,
     labels: [entailment, contradiction], output_format: nli_label, instruction: Judge.,
     options: {fields: {premise: p, hypothesis: h, label: y}, engine: datasets, cache_dir: CACHE}}
  - {name: tiny_ner, role: target, type: ner, reader: conll, paths: {train: a.bio, eval: a.bio},
     labels: [drug], output_format: ner_inline, instruction: Tag.}
""")
    reg.write_text(reg.read_text().replace("CACHE", json.dumps(str(tmp_path / "hf"))))
    write_jsonl(tmp_path / "nli.jsonl", [{"p": f"p{i}", "h": "h", "y": "entailment"} for i in range(4)])
    (tmp_path / "a.bio").write_text("aspirin B-drug\n")
    out = load_registry(reg, tmp_path)
    (nli,), (ner_task,) = out["sources"], out["targets"]
    assert len(nli.train) == 2 and len(nli.eval) == 2 and not {e.input for e in nli.train} & {e.input for e in nli.eval}
    assert ner_task.train[0].target == "aspirin [DRUG]" and ner_task.meta["registry"] == "tiny_ner"
    reg.write_text(reg.read_text().replace("instruction: Tag.}", "instruction: Tag., options: {colour: red}}"))
    with pytest.raises(ValueError, match="options do not fit reader 'conll'"):
        load_registry(reg, tmp_path)


# ----------------------------------------------------------------------------------------------
# synthetic suite
# ----------------------------------------------------------------------------------------------
def test_suite_is_deterministic_by_seed():
    a, b, c = make_suite(3, 8, 4), make_suite(3, 8, 4), make_suite(4, 8, 4)
    assert a == b
    for ta, tc in zip(all_tasks(a), all_tasks(c)):
        assert [e.input for e in ta.train] != [e.input for e in tc.train], ta.name


def test_suite_size_and_coverage(suite):
    src, tgt = suite["sources"], suite["targets"]
    assert len(src) >= 12 and len(tgt) >= 4
    assert {t.type for t in src} == set(TASK_TYPES) and {t.type for t in tgt} == set(TASK_TYPES)
    assert len({t.name for t in src + tgt}) == len(src) + len(tgt)
    for t in src + tgt:
        assert len(t.train) == 24 and len(t.eval) == 12
        assert len({e.input for e in t.train}) == 24
        assert not {e.input for e in t.train} & {e.input for e in t.eval}, t.name
        assert t.meta["source"] == "synthetic"
    source_schemas = [(s.type, frozenset(s.labels)) for s in src]
    source_labels = {label for s in src for label in s.labels}
    for t in tgt:
        assert (t.type, frozenset(t.labels)) not in source_schemas, t.name
        assert set(t.labels) - source_labels, f"{t.name} has no label unseen in the sources"
    assert len({t.output_format for t in src}) >= 9  # sources span the formats
    # gold variety: negative examples exist for extraction tasks, every NLI label occurs
    for t in src + tgt:
        if t.type == "nli":
            assert {e.label for e in t.train} == set(t.labels), t.name
    assert any(e.target == "none" for t in src if t.type == "re" for e in t.train)


def test_suite_inputs_are_short():
    s = make_suite(0, 200, 0)
    for t in all_tasks(s):
        assert max(len(e.input.split()) for e in t.train) <= 40, t.name


def test_make_suite_rejects_impossible_sizes():
    with pytest.raises(ValueError):
        make_suite(0, -1, 0)


# ----------------------------------------------------------------------------------------------
# collators
# ----------------------------------------------------------------------------------------------
def word_tokenizer(suite, bos=False):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = set()
    for t in all_tasks(suite):
        for ex in t.train + t.eval:
            words.update(re.findall(r"\w+|[^\w\s]+", f"{ex.source} {ex.target}"))
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, "[BOS]": 3}
    vocab.update({w: i + 4 for i, w in enumerate(sorted(words))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]",
                                   bos_token="[BOS]")


def check_batch(tok, batch, examples, task_index, padding_side):
    B = len(examples)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.shape[0] == B
    assert ids.dtype == mask.dtype == labels.dtype == batch["task_ids"].dtype == torch.long
    assert batch["task_ids"].tolist() == [task_index[ex.task] for ex in examples]
    for b, ex in enumerate(examples):
        real = mask[b].bool()
        n = int(real.sum())
        pos = torch.arange(ids.shape[1])
        assert (pos[real] == (pos[:n] if padding_side == "right" else pos[-n:])).all()  # contiguous, padded on one side
        assert (labels[b][~real] == -100).all() and (ids[b][~real] == tok.pad_token_id).all()
        row_ids, row_labels = ids[b][real].tolist(), labels[b][real].tolist()
        target = tok(" " + ex.target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        k = len(row_ids) - len(target)
        assert row_labels == [-100] * k + target  # loss on target + EOS only
        assert row_ids[k:] == target  # labels align with input_ids (PromptedLM shifts internally)
        cue = tok(ANSWER_CUE, add_special_tokens=False)["input_ids"]
        assert row_ids[k - len(cue):k] == cue


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collator_shapes_and_label_masking(suite, padding_side):
    tok = word_tokenizer(suite)
    tasks = all_tasks(suite)
    index = {t.name: i for i, t in enumerate(tasks)}
    examples = [t.train[0] for t in tasks]
    batch = Collator(tok, index, max_length=256, padding_side=padding_side)(examples)
    check_batch(tok, batch, examples, index, padding_side)


def test_collator_bos_truncation_and_the_shared_input_format(suite):
    tok = word_tokenizer(suite, bos=True)
    tasks = all_tasks(suite)
    index = {t.name: i for i, t in enumerate(tasks)}
    examples = [t.train[1] for t in tasks]
    fmt = InputFormat(tok)
    limit = max(len(fmt.target(ex.target)) for ex in examples) + fmt.overhead + 3  # room for 3 input tokens
    collate = Collator(tok, index, max_length=limit)
    assert collate.format.prefix == [3]
    batch = collate(examples)
    assert batch["input_ids"].shape[1] <= limit and collate.truncated > 0
    for b, ex in enumerate(examples):  # the input is cut, the answer never
        assert [t for t in batch["labels"][b].tolist() if t != -100] == fmt.target(ex.target)
    with pytest.raises(ValueError, match="answers are never cut"):
        Collator(tok, index, max_length=fmt.overhead + 3)(examples)
    assert (batch["input_ids"][:, 0] == 3).all()
    for b, ex in enumerate(examples):
        labels = batch["labels"][b]
        k = int((labels == -100).logical_and(batch["attention_mask"][b].bool()).sum())
        cue = tok(ANSWER_CUE, add_special_tokens=False)["input_ids"]
        assert batch["input_ids"][b, k - len(cue):k].tolist() == cue  # the answer cue survives truncation
    full = Collator(tok, index, max_length=256)(examples)
    for b, ex in enumerate(examples):
        src = fmt.source(ex.instruction, ex.input, 256)[0]  # what evaluation and the engine feed
        real_full = full["input_ids"][b][full["attention_mask"][b].bool()].tolist()
        lab_full = full["labels"][b][full["attention_mask"][b].bool()].tolist()
        assert src == [t for t, lab in zip(real_full, lab_full) if lab == -100]  # prompt == training prefix
    with pytest.raises(KeyError, match="not in task_index"):
        Collator(tok, {"other": 0})(examples[:1])


def test_collator_batch_runs_through_prompted_lm(suite):
    from transformers import LlamaConfig, LlamaForCausalLM

    from mptkern.models import PromptedLM
    from mptkern.prompts import MultitaskPrompt

    tok = word_tokenizer(suite)
    tasks = suite["sources"][:4]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    lm = PromptedLM(LlamaForCausalLM(cfg).float(), MultitaskPrompt(len(tasks), 4, 32))
    batch = Collator(tok, {t.name: i for i, t in enumerate(tasks)})([t.train[0] for t in tasks] + [tasks[0].train[1]])
    out = lm(**batch)
    assert torch.isfinite(out.loss) and out.logits.shape[:2] == batch["input_ids"].shape


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2's tokenizer from the mptkern model cache (skip when the cache was never built)."""
    try:
        from mptkern.models.default import _MARKER, cache_path

        path = cache_path()
    except ImportError as exc:
        pytest.skip(str(exc))
    if not (path / _MARKER).is_file():
        pytest.skip("SmolLM2 cache not built (run mptkern demo once)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def test_collator_with_smollm2_tokenizer(suite, smollm2_tokenizer):
    tok = smollm2_tokenizer
    tasks = all_tasks(suite)
    index = {t.name: i for i, t in enumerate(tasks)}
    examples = [ex for t in tasks for ex in t.train[:2]]
    batch = Collator(tok, index, max_length=192)(examples)
    check_batch(tok, batch, examples, index, "right")
    for b, ex in enumerate(examples):  # the supervised tokens decode to the target and EOS
        lab = batch["labels"][b]
        assert tok.decode(lab[lab != -100]) == " " + ex.target + tok.eos_token
    for t in all_tasks(make_suite(0, 100, 0)):  # inputs stay short for CPU training
        assert max(len(tok(e.input, add_special_tokens=False)["input_ids"]) for e in t.train) <= 60, t.name


# ----------------------------------------------------------------------------------------------
# samplers
# ----------------------------------------------------------------------------------------------
SIZES = {"a": 10, "b": 3, "c": 7, "empty": 0, "d": 20}


def task_of(i):
    starts, names = [0, 10, 13, 20, 20], ["a", "b", "c", "empty", "d"]
    return next(n for s, n in zip(reversed(starts), reversed(names)) if i >= s)


def test_mixed_sampler_is_a_deterministic_permutation():
    s = MixedTaskSampler(SIZES, 8, seed=1)
    e0 = list(s)
    assert e0 == list(MixedTaskSampler(SIZES, 8, seed=1)) and len(e0) == len(s) == 5
    assert sorted(i for b in e0 for i in b) == list(range(40))
    assert any(len({task_of(i) for i in b}) > 1 for b in e0)
    s.set_epoch(1)
    assert list(s) != e0
    assert list(MixedTaskSampler(SIZES, 8, seed=2)) != e0
    assert len(MixedTaskSampler(SIZES, 8, drop_last=True)) == 5 and len(list(MixedTaskSampler(SIZES, 7, drop_last=True))) == 5


def test_task_subset_sampler_draws_between_two_and_k_tasks():
    s = TaskSubsetSampler(SIZES, 8, seed=0, num_batches=200)
    batches = list(s)
    assert batches == list(TaskSubsetSampler(SIZES, 8, seed=0, num_batches=200))
    assert batches != list(TaskSubsetSampler(SIZES, 8, seed=1, num_batches=200))
    counts = Counter()
    for b in batches:
        assert len(b) == 8
        tasks = Counter(task_of(i) for i in b)
        assert 2 <= len(tasks) <= 4 and "empty" not in tasks
        assert max(tasks.values()) - min(tasks.values()) <= 1  # batch split evenly among the chosen tasks
        counts[len(tasks)] += 1
    assert set(counts) == {2, 3, 4}
    # each task's examples are consumed in passes: every aligned block of size[t] draws is a permutation
    starts = {"a": 0, "b": 10, "c": 13, "d": 20}
    for t, start in starts.items():
        drawn = [i for b in batches for i in b if task_of(i) == t]
        for k in range(0, len(drawn) - SIZES[t] + 1, SIZES[t]):
            assert sorted(drawn[k:k + SIZES[t]]) == list(range(start, start + SIZES[t]))
    assert {task_of(i) for b in batches for i in b} == {"a", "b", "c", "d"}
    # proportional mixing draws big tasks more often than small ones; uniform evens it out
    per_task = Counter(t for b in batches for t in {task_of(i) for i in b})
    assert per_task["d"] > per_task["b"]
    s.set_epoch(1)
    assert list(s) != batches
    assert len(TaskSubsetSampler(SIZES, 8)) == 5


def test_task_subset_sampler_bounds_and_uniform_mixing():
    s = TaskSubsetSampler(SIZES, 3, seed=0, num_batches=50, min_tasks=3, mixing="uniform")
    for b in s:
        assert len({task_of(i) for i in b}) == 3  # max clipped to the batch size
    s = TaskSubsetSampler({"only": 5}, 4, seed=0)
    assert all(len(b) == 4 for b in s)
    with pytest.raises(ValueError, match="no examples"):
        TaskSubsetSampler({"a": 0}, 4)
    with pytest.raises(ValueError, match="mixing"):
        TaskSubsetSampler(SIZES, 4, mixing="temperature")


def test_samplers_drive_a_dataloader_with_the_collator(suite):
    from torch.utils.data import DataLoader

    tok = word_tokenizer(suite)
    tasks = suite["sources"]
    examples = flatten(tasks)
    assert len(examples) == sum(task_sizes(tasks).values())
    sampler = TaskSubsetSampler(task_sizes(tasks), 6, seed=0, num_batches=3)
    loader = DataLoader(examples, batch_sampler=sampler, collate_fn=Collator(tok, {t.name: i for i, t in enumerate(tasks)}))
    for batch, idx in zip(loader, sampler):
        assert batch["task_ids"].tolist() == [[t.name for t in tasks].index(examples[i].task) for i in idx]
        assert 2 <= len(set(batch["task_ids"].tolist())) <= len(tasks)


def test_warnings_do_not_leak_from_plain_readers(tmp_path):
    write_brat(tmp_path, ann="T1\tDrug 6 14\twarfarin\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(read_brat(tmp_path, BRAT_NER)) == 1
