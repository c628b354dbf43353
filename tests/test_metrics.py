"""mptkern.eval metrics on hand-computed cases (the arithmetic is in the comments)."""

import pytest

from mptkern.data import Entity, Relation, Task, make_example
from mptkern.eval import (
    accuracy, entity_prf, mean_rouge_l, micro_prf, relation_prf, rouge_l, score,
)


def E(text, etype):
    return Entity(text, etype)


def test_entity_micro_f1_strict_span_and_type():
    gold = [
        [E("aspirin", "drug"), E("81 mg", "dose"), E("rash", "adverse_event")],
        [E("heparin", "drug")],
        [],
        [E("warfarin", "drug"), E("warfarin", "drug")],
    ]
    pred = [
        [E("aspirin", "drug"), E("81 mg", "drug"), E("rash", "adverse_event")],  # tp 2, fp 1 (wrong type), fn 1
        [E("Heparin", "drug"), E("heparin", "drug")],  # tp 1, fp 1 (case differs)
        [E("fever", "adverse_event")],  # fp 1
        [E("warfarin", "drug")],  # tp 1, fn 1 (gold has it twice)
    ]
    r = entity_prf(pred, gold)
    # tp = 2+1+0+1 = 4, fp = 1+1+1+0 = 3, fn = 1+0+0+1 = 2
    assert (r["tp"], r["fp"], r["fn"]) == (4, 3, 2)
    assert r["precision"] == pytest.approx(4 / 7)  # 4 / (4 + 3)
    assert r["recall"] == pytest.approx(2 / 3)  # 4 / (4 + 2)
    assert r["f1"] == pytest.approx(8 / 13)  # 2*4 / (2*4 + 3 + 2) = 8/13 = harmonic mean of 4/7 and 2/3


def test_entity_matching_ignores_offsets_and_collapses_whitespace_only():
    gold = [[Entity("81 mg", "dose", 10, 15)]]
    assert entity_prf([[E(" 81   mg ", "dose")]], gold)["f1"] == 1.0
    assert entity_prf([[E("81mg", "dose")]], gold)["f1"] == 0.0  # tp 0, fp 1, fn 1 -> 0 / (0 + 1 + 1)


def test_multiset_semantics():
    # one gold, the same prediction three times: tp 1, fp 2, fn 0 -> P 1/3, R 1, F1 2/(2+2+0) = 1/2
    r = entity_prf([[E("x", "drug")] * 3], [[E("x", "drug")]])
    assert (r["tp"], r["fp"], r["fn"]) == (1, 2, 0)
    assert (r["precision"], r["recall"], r["f1"]) == pytest.approx((1 / 3, 1.0, 0.5))
    # gold twice, predicted once: tp 1, fn 1 -> P 1, R 1/2, F1 2/(2+0+1) = 2/3
    r = entity_prf([[E("x", "drug")]], [[E("x", "drug")] * 2])
    assert (r["precision"], r["recall"], r["f1"]) == pytest.approx((1.0, 0.5, 2 / 3))


def test_empty_cases():
    assert micro_prf([[]], [[]]) == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "tp": 0, "fp": 0, "fn": 0}
    r = micro_prf([["a"]], [[]])  # tp 0, fp 1, fn 0: precision 0/1, recall 0/0 -> 0, F1 0/(0+1+0)
    assert (r["precision"], r["recall"], r["f1"]) == (0.0, 0.0, 0.0)
    r = micro_prf([[]], [["a"]])  # tp 0, fp 0, fn 1: precision 0/0 -> 0, recall 0/1
    assert (r["precision"], r["recall"], r["f1"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        micro_prf([[]], [[], []])


def test_relation_micro_f1_needs_both_arguments_and_type():
    gold = [
        [Relation("metoprolol", "causes", "bradycardia"), Relation("lisinopril", "causes", "cough")],
        [Relation("a", "treats", "b")],
        [],
    ]
    pred = [
        [Relation("metoprolol", "causes", "bradycardia"), Relation("cough", "causes", "lisinopril")],  # tp 1, fp 1 (reversed), fn 1
        [Relation("a", "causes", "b")],  # fp 1, fn 1 (wrong type)
        [],
    ]
    r = relation_prf(pred, gold)
    # tp 1, fp 2, fn 2 -> P = 1/3, R = 1/3, F1 = 2*1 / (2 + 2 + 2) = 1/3
    assert (r["tp"], r["fp"], r["fn"]) == (1, 2, 2)
    assert (r["precision"], r["recall"], r["f1"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))


def test_accuracy():
    r = accuracy(["A", None, "C", "b"], ["A", "B", "C", "B"])
    # A correct, None wrong, C correct, "b" != "B" wrong: 2 / 4
    assert r == {"accuracy": 0.5, "correct": 2, "n": 4}
    assert accuracy([], [])["accuracy"] == 0.0
    with pytest.raises(ValueError):
        accuracy(["A"], [])


def test_rouge_l_hand_computed():
    # ref 6 tokens, pred 5 tokens, LCS "the cat on the mat" = 5: P = 5/5, R = 5/6, F = 2*1*(5/6)/(1+5/6) = 10/11
    r = rouge_l("the cat on the mat", "the cat sat on the mat")
    assert (r["precision"], r["recall"], r["f1"]) == pytest.approx((1.0, 5 / 6, 10 / 11))
    # reversed order: pred = mat the on sat cat the, ref = the cat sat on the mat.
    # A common subsequence must keep order in both: "the on the" (pred positions 1,2,5; ref 0,3,4) has 3 tokens;
    # after "the" the pred continues on,sat,cat,the whose ref positions are 3,2,1,4 (first "the" used up), longest
    # increasing run 2 (e.g. 3,4), so LCS = 1 + 2 = 3: P = R = 3/6, F = 1/2. Bag-of-words overlap would be 6.
    r = rouge_l("mat the on sat cat the", "the cat sat on the mat")
    assert (r["precision"], r["recall"], r["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert rouge_l("Colonoscopy: two polyps.", "colonoscopy two polyps")["f1"] == 1.0  # case and punctuation ignored
    assert rouge_l("", "a b")["f1"] == 0.0 and rouge_l("a b c d", "e f")["f1"] == 0.0
    # P = 2/4 (a, c of a b c d), R = 2/2: F = 2*(1/2)*1/(1/2+1) = 2/3
    assert rouge_l("a b c d", "a c")["f1"] == pytest.approx(2 / 3)
    assert rouge_l("Colonoscopy: 2 polyps, NO bleeding.", "colonoscopy 2 polyps no bleeding")["f1"] == 1.0
    m = mean_rouge_l(["the cat on the mat", "two polyps"], ["the cat sat on the mat", "two polyps"])
    assert m["f1"] == pytest.approx((10 / 11 + 1) / 2) and m["n"] == 2  # = 21/22


def test_score_dispatch_per_task_type():
    ner = Task("ner_t", "ner", "Extract.", ("drug", "dose"), "ner_typed")
    exs = [ner.example("aspirin 81 mg", entities=[Entity("aspirin", "drug", 0, 7), Entity("81 mg", "dose", 8, 13)]),
           ner.example("heparin", entities=[Entity("heparin", "drug", 0, 7)]),
           ner.example("no meds")]
    r = score(ner, ["drug: aspirin; dose: 81 mg", "Drug: heparin; drug: warfarin", " none"], exs)
    # tp 2 + 1, fp 0 + 1 (warfarin), fn 0: P = 3/4, R = 1, F1 = 6 / (6 + 1 + 0) = 6/7
    assert r["metric"] == "micro_f1" and (r["tp"], r["fp"], r["fn"]) == (3, 1, 0)
    assert r["score"] == pytest.approx(6 / 7) and r["precision"] == pytest.approx(3 / 4) and r["n"] == 3

    re_t = Task("re_t", "re", "Relate.", ("causes",), "re_arrow")
    ex = re_t.example("x", relations=[Relation("metoprolol", "causes", "bradycardia")])
    r = score(re_t, ["metoprolol causes bradycardia"], [ex])  # not in the format: fp 1, fn 1 -> F1 0
    assert (r["score"], r["tp"], r["fp"], r["fn"]) == (0.0, 0, 1, 1)

    qa = Task("qa_t", "qa", "Answer.", (), "qa_letter")
    exs = [make_example(qa, "q", label=lab, choices=["x", "y", "z"]) for lab in ("y", "x", "x")]  # gold B, A, A
    r = score(qa, ["(B)", "C", "I think A"], exs)  # B right, C wrong, no letter parsed: 1/3
    assert r["metric"] == "accuracy" and r["score"] == pytest.approx(1 / 3) and r["correct"] == 1 and r["unparsed"] == 1

    nli = Task("nli_t", "nli", "Judge.", ("entailment", "neutral", "contradiction"), "nli_label")
    exs = [nli.example("p", label="entailment"), nli.example("p", label="contradiction")]
    assert score(nli, ["Entailment.", "neutral"], exs)["score"] == 0.5

    summ = Task("sum_t", "summarization", "Summarize.", (), "bullets")
    ex = summ.example("note", summary="70-year-old man; cough for 3 days; fever")
    r = score(summ, ["- 70-year-old man\n- cough for 3 days"], [ex])
    # pred tokens 70 year old man cough for 3 days (8), ref the same + fever (9): LCS 8,
    # P = 1, R = 8/9, F = 2*(8/9)/(1 + 8/9) = 16/17
    assert r["metric"] == "rouge_l" and r["score"] == pytest.approx(16 / 17) and r["recall"] == pytest.approx(8 / 9)

    with pytest.raises(ValueError, match="predictions for"):
        score(nli, ["entailment"], exs)
    with pytest.raises(ValueError, match="scored as task"):
        score(summ, ["x", "y"], exs)


@pytest.mark.parametrize("output_format", ["ner_typed", "ner_json", "ner_inline"])
def test_strict_micro_f1_on_a_real_ner_test_set(real_data, output_format):
    """NCBI-disease test (940 sentences, 960 mentions, SOURCES.md): the gold targets, generated back,
    score 1.0 with every mention a true positive; an empty output scores 0.0."""
    from mptkern.data import read_conll

    task = Task("ncbi", "ner", "List the diseases.", ("Disease",), output_format)
    examples = read_conll(real_data / "NCBI-disease-IOB" / "test.tsv", task, delimiter="\t")
    assert len(examples) == 940 and sum(len(ex.entities) for ex in examples) == 960
    gold = score(task, [ex.target for ex in examples], examples)
    assert gold["score"] == 1.0 and gold["tp"] == 960 and gold["fp"] == gold["fn"] == 0
    empty = score(task, [""] * len(examples), examples)
    assert empty["score"] == 0.0 and empty["tp"] == 0 and empty["fn"] == 960
