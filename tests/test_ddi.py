"""DDI 2013 (Test split, brat standoff) through read_brat, against the counts SOURCES.md publishes,
and the reader's sentence segmentation."""

import warnings
from collections import Counter

import pytest

from mptkern.data import DataFormatError, IgnoredAnnotationsWarning, Task, read_brat

DDI_RE = Task("ddi", "re", "Find the drug-drug interactions.", ("MECHANISM", "EFFECT", "ADVISE", "INT"), "re_json")
DDI_NER = Task("ddi_ner", "ner", "Find the drugs.", ("DRUG", "GROUP", "BRAND", "DRUG_N"), "ner_json")

# subfolder -> (docs, entities by type, relations by type, docs without relations, empty .ann files)
PUBLISHED = {
    "DrugBank": (212, {"DRUG": 1698, "GROUP": 691, "BRAND": 400, "DRUG_N": 27},
                 {"EFFECT": 298, "MECHANISM": 278, "ADVISE": 214, "INT": 94}, 54, 4),
    "MedLine": (91, {"DRUG": 517, "DRUG_N": 234, "GROUP": 131, "BRAND": 28},
                {"EFFECT": 62, "MECHANISM": 24, "ADVISE": 7, "INT": 2}, 58, 20),
}
DISCONTINUOUS = {  # doc -> texts of its discontinuous entities (fragments joined by one space)
    "Methyclothiazide": ["ganglionic adrenergic blocking drugs"],
    "Methylergonovine": ["HIV protease inhibitors"],
    "Tetracycline": ["Choline salicylate"],
    "21728157": ["antituberculosis drugs"],
    "21795430": ["heme iron", "nonheme iron", "nonheme iron", "nonheme iron", "nonheme iron"],
    "21844260": ["inactivated AI vaccines", "inactivated ND vaccines"],
}


def ddi(real_data, sub):
    return real_data / "DDICorpus-2013-BRAT" / "DDICorpusBrat" / "Test" / sub


def read(path, task, **kw):
    """read_brat with no warning allowed (DDI has no ignored lines, and nothing may be dropped)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return read_brat(path, task, discontinuous="join", **kw)


def doc_text(ex):
    with open(ex.meta["file"], encoding="utf-8", newline="") as f:
        return f.read()


@pytest.mark.parametrize("sub", sorted(PUBLISHED))
def test_ddi_documents_match_published_counts(real_data, sub):
    docs, ents, rels, no_rel, empty = PUBLISHED[sub]
    re_exs = read(ddi(real_data, sub), DDI_RE)
    assert len(re_exs) == docs and len({ex.meta["doc"] for ex in re_exs}) == docs
    assert Counter(r.type for ex in re_exs for r in ex.relations) == rels
    assert sum(not ex.relations for ex in re_exs) == no_rel
    ner_exs = read(ddi(real_data, sub), DDI_NER)
    assert len(ner_exs) == docs
    assert Counter(e.type for ex in ner_exs for e in ex.entities) == ents
    assert sum(not ex.entities for ex in ner_exs) == empty
    # keep_empty=False drops exactly the examples without gold
    assert len(read(ddi(real_data, sub), DDI_RE, keep_empty=False)) == docs - no_rel
    assert len(read(ddi(real_data, sub), DDI_NER, keep_empty=False)) == docs - empty
    for ex in ner_exs:  # document offsets hold against the file read as it ships
        text = doc_text(ex)
        for e in ex.entities:
            if e.start is not None:
                assert text[ex.meta["offset"] + e.start:ex.meta["offset"] + e.end] == e.text


def test_ddi_quirks(real_data):
    ner = {ex.meta["doc"]: ex for sub in PUBLISHED for ex in read(ddi(real_data, sub), DDI_NER)}
    # discontinuous spans: "join" keeps the fragments' text, without offsets
    joined = {doc: sorted(e.text for e in ex.entities if e.start is None) for doc, ex in ner.items()}
    assert {doc: t for doc, t in joined.items() if t} == DISCONTINUOUS
    with pytest.raises(DataFormatError, match=r"Methyclothiazide\.ann:14: discontinuous span '723 733;748 773'"):
        read_brat(ddi(real_data, "DrugBank"), DDI_NER)
    skip = Counter()
    read_brat(ddi(real_data, "MedLine"), DDI_RE, discontinuous="skip", report=skip)
    assert skip["dropped discontinuous entities"] == 8 and skip["dropped relations on dropped entities"] == 3
    # file names with spaces
    assert sum(" " in doc for doc in ner) == 12
    soda = ner["Sodium bicarbonate"]
    assert [e.key() for e in soda.entities][:3] == [("norepinephrine", "DRUG"), ("dobutamine", "DRUG"),
                                                    ("sodium bicarbonate", "DRUG")]
    assert len(soda.entities) == 5
    # the CRLF document: the \r is kept, so the text is the file's 1,213 characters; its .ann is empty
    crlf = ner["21874017"]
    assert len(crlf.input) == 1213 and crlf.input[98:100] == "\r\n" and crlf.entities == () and crlf.target == "{}"
    sents = [ex for ex in read(ddi(real_data, "MedLine"), DDI_NER, segment="sentence") if ex.meta["doc"] == "21874017"]
    assert sents[0].input.endswith("Rev-erb  .") and sents[1].meta["offset"] == 100 and sents[1].meta["line"] == 2
    assert sents[1].input.startswith("Oligophrenin-1 regulates")


@pytest.mark.parametrize("sub", sorted(PUBLISHED))
def test_ddi_sentences_keep_every_relation_and_entity(real_data, sub):
    docs, ents, rels, _, _ = PUBLISHED[sub]
    report = Counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error", IgnoredAnnotationsWarning)  # no drop, so no warning
        re_exs = read_brat(ddi(real_data, sub), DDI_RE, segment="sentence", discontinuous="join", report=report)
        ner_exs = read_brat(ddi(real_data, sub), DDI_NER, segment="sentence", discontinuous="join", report=report)
    assert len(re_exs) == len(ner_exs) == {"DrugBank": 1056, "MedLine": 786}[sub]
    assert Counter(r.type for ex in re_exs for r in ex.relations) == rels  # kept 884 / 95 + dropped 0 = 979
    assert report["dropped relations crossing segments"] == 0 and report["dropped entities crossing segments"] == 0
    assert Counter(e.type for ex in ner_exs for e in ex.entities) == ents  # no split cut an entity
    for ex in re_exs:  # both arguments of each relation lie in its sentence
        args = Counter(e.text for e in ex.entities)
        assert all(args[r.head] and args[r.tail] for r in ex.relations)
        assert all(e.start is None or ex.input[e.start:e.end] == e.text for e in ex.entities)
    by_doc = {}
    for ex in ner_exs:
        text = doc_text(ex)
        assert text[ex.meta["offset"]:ex.meta["offset"] + len(ex.input)] == ex.input
        by_doc.setdefault(ex.meta["file"], []).append(ex.input)
    assert len(by_doc) == docs
    for file, pieces in by_doc.items():  # sentences cover each document's text, in order
        with open(file, encoding="utf-8", newline="") as f:
            assert "".join(f.read().split()) == "".join("".join(pieces).split())


SENT_TXT = "Aspirin inhibits warfarin. It raises levels vs. 3 others.\nSt. John's wort. Brand X. Y Corp lowers it.\n\nNew para."


def test_sentence_rule_and_crossing_relations_warn_once(tmp_path):
    def at(s, nth=0):
        i = -1
        for _ in range(nth + 1):
            i = SENT_TXT.index(s, i + 1)
        return f"{i} {i + len(s)}"
    (tmp_path / "d.txt").write_text(SENT_TXT)
    (tmp_path / "d.ann").write_text("\n".join([
        f"T1\tDRUG {at('Aspirin')}\tAspirin", f"T2\tDRUG {at('warfarin')}\twarfarin",
        f"T3\tBRAND {at('Brand X. Y')}\tBrand X. Y",  # an entity over a sentence end: no cut there
        f"T4\tDRUG {at('It')}\tIt", f"T5\tDRUG {at('New')}\tNew",
        "R1\tMECHANISM Arg1:T1 Arg2:T2", "R2\tEFFECT Arg1:T1 Arg2:T4", "R3\tINT Arg1:T2 Arg2:T5", ""]))
    ner = read_brat(tmp_path, DDI_NER, segment="sentence")
    assert [ex.input for ex in ner] == ["Aspirin inhibits warfarin.", "It raises levels vs. 3 others.",
                                        "St. John's wort.", "Brand X. Y Corp lowers it.", "New para."]
    assert [[e.text for e in ex.entities] for ex in ner] == [["Aspirin", "warfarin"], ["It"], [], ["Brand X. Y"], ["New"]]
    report = Counter()
    with pytest.warns(IgnoredAnnotationsWarning, match=r"segment='sentence'.*dropped relations crossing segments 2") as rec:
        exs = read_brat(tmp_path, DDI_RE, segment="sentence", keep_empty=False, report=report)
    assert len([w for w in rec if issubclass(w.category, IgnoredAnnotationsWarning)]) == 1
    assert [[r.key() for r in ex.relations] for ex in exs] == [[("Aspirin", "MECHANISM", "warfarin")]]
    assert report["dropped relations crossing segments"] == 2
    # paragraph segments: only the relation into the second paragraph is dropped, with the same warning
    with pytest.warns(IgnoredAnnotationsWarning, match=r"segment='paragraph'.*crossing segments 1"):
        exs = read_brat(tmp_path, DDI_RE, segment="paragraph")
    assert sum(len(ex.relations) for ex in exs) == 2
    # max_chars cuts a long sentence at line boundaries, as in the other modes; an entity so cut is dropped once
    (tmp_path / "d.txt").write_text("Aspirin and\nwarfarin\ninteract. Next.")
    (tmp_path / "d.ann").write_text("T1\tDRUG 0 7\tAspirin\nT2\tDRUG 8 20\tand warfarin\n")
    report = Counter()
    with pytest.warns(IgnoredAnnotationsWarning, match="dropped entities crossing segments 1"):
        exs = read_brat(tmp_path, DDI_NER, segment="sentence", max_chars=10, report=report)
    assert [ex.input for ex in exs] == ["Aspirin and", "warfarin", "interact.", "Next."]
    assert report["dropped entities crossing segments"] == 1
