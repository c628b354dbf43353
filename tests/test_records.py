"""The record layer (mptkern.data.records) and the record readers (read_qa / read_nli /
read_summarization): layouts, locators, errors, dropping, and the real public datasets as they ship
(counts from the real-data folder's SOURCES.md)."""

import collections
import json
import sys
import warnings

import pytest

from mptkern._optional import MissingDependency
from mptkern.data import readers
from mptkern.data.readers import READERS, read_nli, read_qa, read_summarization
from mptkern.data.records import DataFormatError, DroppedRecordsWarning, read_records
from mptkern.data.schema import Task, format_nli_input

PQA = Task("pubmedqa", "qa", "Answer yes, no or maybe.", ("yes", "no", "maybe"), "qa_text")
NLI = Task("covidfact", "nli", "Is the claim supported?", ("supported", "refuted"), "nli_label")
RTE = Task("covidfact-rte", "nli", "Does the premise entail the claim?", ("entailment", "not_entailment"), "nli_label")
SUMM = Task("summ", "summarization", "Summarize.", (), "free_text")

PQA_FIELDS = {"question": "QUESTION", "context": "CONTEXTS", "options": None, "answer": "final_decision", "id": "_key"}


# ----------------------------------------------------------------------------------------------
# layouts and locators
# ----------------------------------------------------------------------------------------------
def test_error_message_names_file_and_line_or_record():
    assert str(DataFormatError("a.jsonl", 3, "bad")) == "a.jsonl:3: bad"
    assert str(DataFormatError("q.json", "record 21645374", "bad")) == "q.json: record 21645374: bad"
    assert str(DataFormatError("s.xlsx", "row 5", "bad")) == "s.xlsx: row 5: bad"
    assert str(DataFormatError("d", None, "empty")) == "d: empty"
    err = DataFormatError("q.json", "item 17", "bad")
    assert (err.path, err.line, err.reason) == ("q.json", "item 17", "bad") and isinstance(err, ValueError)
    assert readers.DataFormatError is DataFormatError  # still exported where it was


def test_read_records_json_jsonl_csv_tsv(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"x": 1}\n\n{"x": 2}\n')
    assert read_records(tmp_path / "a.jsonl") == [(1, {"x": 1}), (3, {"x": 2})]
    (tmp_path / "b.json").write_text('[{"x": 1},\n {"x": 2}]')
    assert read_records(tmp_path / "b.json") == [("item 0", {"x": 1}), ("item 1", {"x": 2})]
    (tmp_path / "c.json").write_text('{"11": {"q": "a"}, "7": {"q": "b"}}')
    assert read_records(tmp_path / "c.json") == [("record 11", {"q": "a", "_key": "11"}),
                                                 ("record 7", {"q": "b", "_key": "7"})]
    # CSV: quoted newlines (CRLF kept inside the field), blank line skipped, locator = the row's first line
    (tmp_path / "d.csv").write_bytes(b'id,text\r\n0,"one\r\ntwo"\r\n\r\n1,"say ""hi"""\r\n')
    assert read_records(tmp_path / "d.csv") == [
        (2, {"id": "0", "text": "one\r\ntwo", 0: "0", 1: "one\r\ntwo"}),
        (5, {"id": "1", "text": 'say "hi"', 0: "1", 1: 'say "hi"'}),
    ]
    # TSV: no quoting, so quotes are text; the same file read as CSV would swallow the tab
    (tmp_path / "e.tsv").write_text('index\tsentence1\tlabel\n0\t"Quoted start\tentailment\n')
    assert read_records(tmp_path / "e.tsv") == [
        (2, {"index": "0", "sentence1": '"Quoted start', "label": "entailment", 0: "0", 1: '"Quoted start', 2: "entailment"})]
    (tmp_path / "f.txt").write_text('{"x": 1}\n')
    with pytest.raises(ValueError, match=r"f\.txt: cannot tell the layout .*'jsonl', 'json', 'csv', 'tsv', 'xlsx'"):
        read_records(tmp_path / "f.txt")
    assert read_records(tmp_path / "f.txt", layout="jsonl") == [(1, {"x": 1})]
    with pytest.raises(ValueError, match="reads JSON lines only"):
        read_records(tmp_path / "b.json", engine="datasets")
    with pytest.raises(FileNotFoundError):
        read_records(tmp_path / "missing.json")


@pytest.mark.parametrize("name, content, match", [
    ("a.jsonl", '{"x": 1}\n{"x": 2,\n', r"a\.jsonl:2: invalid JSON"),
    ("b.jsonl", '{"x": 1}\n[1, 2]\n', r"b\.jsonl:2: expected a JSON object, got list"),
    ("c.json", '[{"x": 1}, "two"]', r"c\.json: item 1: expected a JSON object, got str"),
    ("d.json", '{"1": {"x": 1}, "2": "yes"}', r"d\.json: record 2: expected a JSON object keyed by id, got str"),
    ("e.json", '{"1": {"x": 1},\n "2": }', r"e\.json:2: invalid JSON"),
    ("f.json", '"text"', r"f\.json: expected a JSON array of objects or an object of objects, got str"),
    ("g.csv", 'a,b\n1,"x\ny"\n2,z,extra\n', r"g\.csv:4: row has 3 cells, the header has 2 \(a, b\)"),
    ("h.tsv", 'a\tb\n1\n', r"h\.tsv:2: row has 1 cells, the header has 2"),
    ("i.csv", '', r"i\.csv: empty file: no header row"),
])
def test_malformed_files_name_the_file_and_record(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataFormatError, match=match):
        read_records(tmp_path / name)


def test_missing_field_names_the_record(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps([{"findings": "Clear.", "impression": "Normal."}, {"findings": "Clear."}]))
    with pytest.raises(DataFormatError, match=r"s\.json: item 1: missing or empty field 'impression'"):
        read_summarization(tmp_path / "s.json", SUMM, fields={"text": "findings", "summary": "impression"})
    (tmp_path / "t.tsv").write_text("i\tp\th\n0\tA cough.\t\n")
    with pytest.raises(DataFormatError, match=r"t\.tsv:2: missing or empty field 2 \(fields present: \['h', 'i', 'p'\], "
                                              r"or column positions 0-2\)"):
        read_nli(tmp_path / "t.tsv", RTE, fields={"premise": 1, "hypothesis": 2, "label": 0})
    (tmp_path / "q.json").write_text(json.dumps({"5": {"QUESTION": "Q?", "CONTEXTS": ["c"], "final_decision": "perhaps"}}))
    with pytest.raises(DataFormatError, match=r"q\.json: record 5: answer 'perhaps'"):
        read_qa(tmp_path / "q.json", PQA, fields=PQA_FIELDS)
    (tmp_path / "l.jsonl").write_text(json.dumps({"premise": {"a": 1}, "hypothesis": "h", "label": "refuted"}) + "\n")
    with pytest.raises(DataFormatError, match=r"l\.jsonl:1: field 'premise' must be text or a list of strings, got dict"):
        read_nli(tmp_path / "l.jsonl", NLI)


def test_on_error_drop_keeps_good_records_and_warns_once(tmp_path):
    p = tmp_path / "n.jsonl"
    good = {"premise": ["Evidence one.", "Evidence two."], "hypothesis": "A claim.", "label": "SUPPORTED"}
    p.write_text("\n".join([json.dumps(good), '{"premise": "x",', json.dumps({"premise": "x", "label": "REFUTED"}),
                            json.dumps({**good, "label": "REFUTED"})]) + "\n")
    with pytest.raises(DataFormatError, match=r"n\.jsonl:2: invalid JSON"):
        read_nli(p, NLI)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exs = read_nli(p, NLI, on_error="drop")
    assert [(ex.meta["line"], ex.target) for ex in exs] == [(1, "supported"), (4, "refuted")]
    assert exs[0].input == "Hypothesis: A claim.\nPremise: Evidence one. Evidence two."
    assert len(caught) == 1 and caught[0].category is DroppedRecordsWarning
    msg = str(caught[0].message)
    assert msg.startswith(f"read_nli({p}): dropped 2 malformed record(s) of 4; first: {p}:2: invalid JSON"), msg
    c = tmp_path / "c.csv"
    c.write_text("text,summary\nA long note.,Short.\nbad,row,here\n,Empty text.\nAnother note.,Also short.\n")
    with pytest.warns(DroppedRecordsWarning, match=r"dropped 2 malformed record\(s\) of 4; first: .*c\.csv:3: row has 3 cells"):
        exs = read_summarization(c, SUMM, on_error="drop")
    assert [ex.meta["line"] for ex in exs] == [2, 5]
    with pytest.raises(ValueError, match="on_error must be one of"):
        read_summarization(c, SUMM, on_error="skip")


def test_readers_keys_and_old_names():
    assert READERS["qa"] is READERS["jsonl_qa"] is read_qa is readers.read_jsonl_qa
    assert READERS["nli"] is READERS["jsonl_nli"] is read_nli is readers.read_jsonl_nli
    assert READERS["summarization"] is READERS["jsonl_summarization"] is read_summarization is readers.read_jsonl_summarization
    assert {"conll", "brat", "qa", "nli", "summarization", "jsonl_qa", "jsonl_nli", "jsonl_summarization"} <= set(READERS)


# ----------------------------------------------------------------------------------------------
# xlsx
# ----------------------------------------------------------------------------------------------
def test_xlsx_rows_header_trailing_cells_and_errors(tmp_path):
    openpyxl = pytest.importorskip("openpyxl")
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = "QS"
    for row in (["File", "CHQ", "Summary"], ["1.txt", "who makes it\ni wonder", "Who makes it?", None, ""],
                [], ["2.txt", "dose?", "What dose?"]):
        ws.append(row)
    other = wb.create_sheet("extra")
    other.append(["a", "b"])
    other.append([1, 2, 3])
    wb.save(tmp_path / "q.xlsx")
    recs = read_records(tmp_path / "q.xlsx")
    assert [loc for loc, _ in recs] == ["row 2", "row 4"]
    assert recs[0][1] == {"File": "1.txt", "CHQ": "who makes it\ni wonder", "Summary": "Who makes it?",
                          0: "1.txt", 1: "who makes it\ni wonder", 2: "Who makes it?"}
    exs = read_summarization(tmp_path / "q.xlsx", SUMM, fields={"text": "CHQ", "summary": "Summary", "id": "File"})
    assert exs[0].input == "who makes it\ni wonder" and exs[0].meta == {"file": str(tmp_path / "q.xlsx"), "record": "row 2", "id": "1.txt"}
    with pytest.raises(DataFormatError, match=r"q\.xlsx: row 2: row has a value in column 3, the header has 2"):
        read_records(tmp_path / "q.xlsx", sheet="extra")
    with pytest.raises(DataFormatError, match=r"no sheet 'nope'; sheets: \['QS', 'extra'\]"):
        read_records(tmp_path / "q.xlsx", sheet="nope")


def test_xlsx_without_openpyxl_is_one_line_with_pip(tmp_path, monkeypatch):
    (tmp_path / "q.xlsx").write_bytes(b"PK")  # never opened: the import fails first
    monkeypatch.setitem(sys.modules, "openpyxl", None)  # as if not installed
    with pytest.raises(MissingDependency, match=r"^reading q\.xlsx \(an \.xlsx workbook\) needs openpyxl, which is not "
                                                r"installed: pip install 'openpyxl"):
        read_summarization(tmp_path / "q.xlsx", SUMM)


# ----------------------------------------------------------------------------------------------
# the real public datasets, read as they ship (counts: SOURCES.md)
# ----------------------------------------------------------------------------------------------
def test_pubmedqa_object_keyed_by_pmid(real_data):
    path = real_data / "pubmedqa" / "data" / "ori_pqal.json"
    exs = read_qa(path, PQA, fields=PQA_FIELDS)
    assert len(exs) == 1000
    assert collections.Counter(ex.label for ex in exs) == {"yes": 552, "no": 338, "maybe": 110}
    first = exs[0]
    assert first.meta == {"file": str(path), "record": "record 21645374", "id": "21645374"}
    assert first.target == "yes" and first.choices == ("yes", "no", "maybe")
    # the question and options, then the CONTEXTS (two abstract sections) joined by one space, whitespace collapsed
    assert first.input.startswith("Question: Do mitochondria play a role in remodelling lace plant leaves during "
                                  "programmed cell death?\nOptions: A) yes B) no C) maybe\nProgrammed cell "
                                  "death (PCD) is the regulated death of cells within an organism. ")
    assert first.input.count("\n") == 2


def test_covidfact_jsonl_claims(real_data):
    path = real_data / "COVID-Fact" / "COVIDFACT_dataset.jsonl"
    exs = read_nli(path, NLI, fields={"premise": "evidence", "hypothesis": "claim"})
    assert len(exs) == 4086
    assert collections.Counter(ex.label for ex in exs) == {"refuted": 2790, "supported": 1296}
    row = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert row["claim"] == "Measuring sars-cov-2 neutralizing antibody activity using pseudotyped and chimeric viruses"
    assert exs[0].label == "supported" and exs[0].meta == {"file": str(path), "line": 1}
    assert exs[0].input == format_nli_input(" ".join(row["evidence"]), row["claim"])
    assert exs[0].input.split("\n")[1].startswith("Premise: While each surrogate virus exhibited subtle differences")


@pytest.mark.parametrize("split, n, entailment, not_entailment", [
    ("train", 3263, 1036, 2227), ("dev", 419, 130, 289), ("test1", 401, 130, 271)])
def test_covidfact_rte_tsv_by_column_position(real_data, split, n, entailment, not_entailment):
    path = real_data / "COVID-Fact" / "RTE-covidfact" / f"{split}.tsv"
    exs = read_nli(path, RTE, fields={"premise": 1, "hypothesis": 2, "label": 3, "id": 0})
    assert len(exs) == n
    assert collections.Counter(ex.label for ex in exs) == {"entailment": entailment, "not_entailment": not_entailment}
    assert exs[0].meta == {"file": str(path), "line": 2, "id": "0"}
    assert exs[-1].meta["line"] == n + 1  # one physical line a row: no quoting, no embedded newlines
    if split == "dev":  # its 4th header cell is "entailment": by name the label column is not there
        assert exs[0].input.split("\n")[1].startswith("Premise: For those with severe COVID-19, rapid clinical deterioration")
        assert exs[0].label == "entailment"
        with pytest.raises(DataFormatError, match=r"dev\.tsv:2: missing or empty field 'label' \(fields present: "
                                                  r"\['Sentence2', 'entailment', 'index', 'sentence1'\]"):
            read_nli(path, RTE, fields={"premise": "sentence1", "hypothesis": "Sentence2"})
    else:
        assert len(read_nli(path, RTE, fields={"premise": "sentence1", "hypothesis": "Sentence2"})) == n


def test_mediqa_rrs_json_array(real_data):
    path = real_data / "MEDIQA2021-RRS-indiana" / "Task3" / "indiana_dev.json"
    exs = read_summarization(path, SUMM, fields={"text": "findings", "summary": "impression", "id": "study_id"})
    assert len(exs) == 2000 and len({ex.meta["record"] for ex in exs}) == 2000
    assert exs[0].meta == {"file": str(path), "record": "item 0", "id": "1851"}
    assert exs[0].input == ("Heart size is normal. No focal airspace consolidations. No pneumothorax or effusion. "
                            "No acute osseous findings.")
    assert exs[0].summary == exs[0].target == "No acute cardiopulmonary findings. ."


MTS = [  # file, rows, top section headers (SOURCES.md)
    ("MTS-Dialog-TrainingSet.csv", 1201, {"FAM/SOCHX": 351, "GENHX": 282, "PASTMEDICALHX": 118}),
    ("MTS-Dialog-ValidationSet.csv", 100, {"FAM/SOCHX": 22, "GENHX": 20, "ROS": 11}),
    ("MTS-Dialog-TestSet-1-MEDIQA-Chat-2023.csv", 200, {"GENHX": 53, "FAM/SOCHX": 45}),
    ("MTS-Dialog-TestSet-2-MEDIQA-Sum-2023.csv", 200, {"FAM/SOCHX": 47, "GENHX": 37}),
]


@pytest.mark.parametrize("name, n, top", MTS)
def test_mts_dialog_csv_with_newlines_in_fields(real_data, name, n, top):
    path = real_data / "MTS-Dialog" / "Main-Dataset" / name
    recs = read_records(path)
    assert len(recs) == n
    headers = collections.Counter(r["section_header"] for _, r in recs)
    assert dict(headers.most_common(len(top))) == top
    exs = read_summarization(path, SUMM, fields={"text": "dialogue", "summary": "section_text", "id": "ID"})
    assert len(exs) == n and [ex.meta["id"] for ex in exs] == [str(i) for i in range(n)]
    assert exs[1].meta["line"] > 3  # rows span several physical lines; the locator is where a row starts
    assert all("\r" not in ex.input and "\r" not in ex.summary for ex in exs)
    assert sum("\n" in ex.input for ex in exs) >= n - 2  # dialogue turns keep their own lines
    if name == "MTS-Dialog-TrainingSet.csv":
        assert sum("\r\n" in r["dialogue"] for _, r in recs) == 1199  # CRLF inside fields, as shipped
        row0 = recs[0][1]
        assert (recs[0][0], row0["ID"], row0["section_header"]) == (2, "0", "GENHX")
        assert exs[0].input.startswith("Doctor: What brings you back into the clinic today, miss? \n"
                                       "Patient: I came in for a refill of my blood pressure medicine. \n")
        assert exs[0].input == row0["dialogue"].replace("\r\n", "\n")
        assert exs[0].summary.startswith("The patient is a 76-year-old white female who presents to the clinic "
                                         "today originally for hypertension and a med check.  She has")
        assert exs[0].target.startswith("The patient is a 76-year-old white female who presents to the clinic "
                                        "today originally for hypertension and a med check. She has")


def test_meqsum_xlsx(real_data):
    pytest.importorskip("openpyxl")
    path = real_data / "MeQSum" / "MeQSum_ACL2019_BenAbacha_Demner-Fushman.xlsx"
    recs = read_records(path)
    assert len(recs) == 1000 and [loc for loc, _ in recs[:2]] == ["row 2", "row 3"] and recs[-1][0] == "row 1001"
    assert {tuple(k for k in r if isinstance(k, str)) for _, r in recs} == {("File", "CHQ", "Summary")}
    exs = read_summarization(path, SUMM, fields={"text": "CHQ", "summary": "Summary", "id": "File"})
    assert len(exs) == 1000
    ex = exs[1]
    assert ex.meta == {"file": str(path), "record": "row 3", "id": "14348.txt"}
    assert ex.input.startswith("who makes bromocriptine\ni am wondering what company makes the drug bromocriptine, ")
    assert ex.target == "Who manufactures bromocriptine?"
