"""read_nli4ct on the NLI4CT release (counts from SOURCES.md) and on malformed files."""

import inspect
import json
import warnings
from collections import Counter

import pytest

from mptkern.data import Task
from mptkern.data.nli4ct import read_nli4ct
from mptkern.data.records import DataFormatError, DroppedRecordsWarning

NLI4CT = Task("nli4ct", "nli", "Does the trial entail the statement?", ("Entailment", "Contradiction"), "nli_label")
# file -> (records, by label, by type)
PUBLISHED = {
    "train": (1700, {"Entailment": 850, "Contradiction": 850}, {"Single": 1035, "Comparison": 665}),
    "dev": (200, {"Entailment": 100, "Contradiction": 100}, {"Single": 140, "Comparison": 60}),
    "Gold_test": (500, {"Entailment": 250, "Contradiction": 250}, {"Single": 229, "Comparison": 271}),
}


def release(real_data):
    return real_data / "NLI4CT" / "Complete_dataset"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_nli4ct_counts(real_data, name):
    n, labels, types = PUBLISHED[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exs = read_nli4ct(release(real_data) / f"{name}.json", NLI4CT)
    assert len(exs) == n and len({ex.meta["id"] for ex in exs}) == n
    assert Counter(ex.label for ex in exs) == labels and Counter(ex.target for ex in exs) == labels
    assert Counter(ex.meta["type"] for ex in exs) == types
    assert all(("Secondary trial: " in ex.input) == (ex.meta["type"] == "Comparison") for ex in exs)
    assert set(ex.meta["section"] for ex in exs) == {"Eligibility", "Intervention", "Results", "Adverse Events"}


def test_nli4ct_premise_is_the_trial_section(real_data):
    exs = {ex.meta["id"]: ex for ex in read_nli4ct(release(real_data) / "dev.json", NLI4CT)}
    single = exs["1adc970c-d433-44d0-aa09-d3834986f7a2"]
    assert single.meta == {"file": str(release(real_data) / "dev.json"), "id": "1adc970c-d433-44d0-aa09-d3834986f7a2",
                           "type": "Single", "section": "Results", "primary": "NCT00066573", "secondary": None}
    assert single.input.startswith("Hypothesis: there is a 13.2% difference between the results from the two the "
                                   "primary trial cohorts\nPremise: Primary trial: Outcome Measurement: Event-free "
                                   "Survival Event free survival, the primary endpoint of this study, is defined as the "
                                   "time from randomization")
    assert single.label == "Contradiction"
    pair = exs["6b9162d0-0816-46d4-81af-c60028dcc63b"]
    premise = pair.input.split("\nPremise: ")[1]
    assert premise.startswith("Primary trial: Inclusion criteria: Inclusion Criteria: Female patients age 18")
    assert " Other malignancy within the past 5 years Secondary trial: Premenopausal women 55 years of age" in premise
    assert premise.endswith("Required initial laboratory values - Calcium < 10.5 mg/dL")


def test_nli4ct_unlabelled_test_file_says_to_use_gold(real_data):
    with pytest.raises(DataFormatError, match=r"test\.json: no record has a Label.*read Gold_test\.json"):
        read_nli4ct(release(real_data) / "test.json", NLI4CT)
    with pytest.raises(DataFormatError, match="Gold_test.json"):
        read_nli4ct(release(real_data) / "test.json", NLI4CT, on_error="drop")


def write_release(tmp_path, records):
    (tmp_path / "CT json").mkdir()
    (tmp_path / "CT json" / "NCT1.json").write_text(json.dumps({
        "Clinical Trial ID": "NCT1", "Intervention": ["INTERVENTION 1:", "  Drug: aspirin"],
        "Eligibility": ["Inclusion Criteria:", "  Adults"], "Results": ["Outcome: none"], "Adverse Events": []}))
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records, indent=4))
    return path


GOOD = {"Type": "Single", "Section_id": "Intervention", "Primary_id": "NCT1", "Statement": "Aspirin is given.",
        "Label": "entailment"}


@pytest.mark.parametrize("bad,match", [
    ({**GOOD, "Primary_id": "NCT404"}, r"trial file .*NCT404\.json not found"),
    ({**GOOD, "Section_id": "Outcomes"}, r"Section_id 'Outcomes' is not one of"),
    ({**GOOD, "Type": "Comparison"}, "missing or empty Secondary_id"),
    ({k: v for k, v in GOOD.items() if k != "Statement"}, "missing or empty Statement"),
    ({**GOOD, "Label": "Neutral"}, "Label 'Neutral' is not one of"),
    ({**GOOD, "Section_id": "Adverse Events"}, "trial NCT1 has no 'Adverse Events' section"),
])
def test_nli4ct_malformed_records(tmp_path, bad, match):
    path = write_release(tmp_path, {"u-good": GOOD, "u-bad": bad})
    with pytest.raises(DataFormatError, match=match) as err:
        read_nli4ct(path, NLI4CT)
    assert str(err.value).startswith(f"{path}: record u-bad: ")
    with pytest.warns(DroppedRecordsWarning, match=r"dropped 1 malformed record\(s\) of 2; first: .*record u-bad") as rec:
        exs = read_nli4ct(path, NLI4CT, on_error="drop")
    assert len(rec) == 1
    assert [ex.meta["id"] for ex in exs] == ["u-good"] and exs[0].label == "Entailment"
    assert exs[0].input == "Hypothesis: Aspirin is given.\nPremise: Primary trial: INTERVENTION 1: Drug: aspirin"


def test_nli4ct_drop_warns_once_and_trials_dir(tmp_path):
    path = write_release(tmp_path, {"a": {**GOOD, "Primary_id": "NCT404"}, "b": {**GOOD, "Section_id": "X"}, "c": GOOD})
    with pytest.warns(DroppedRecordsWarning, match=r"dropped 2 malformed record\(s\) of 3; first: .*record a: trial file") as rec:
        assert len(read_nli4ct(path, NLI4CT, on_error="drop")) == 1
    assert len(rec) == 1
    (tmp_path / "CT json").rename(tmp_path / "trials")
    path.write_text(json.dumps({"c": GOOD}))
    with pytest.raises(DataFormatError, match=r"record c: trial file .*CT json/NCT1\.json not found"):
        read_nli4ct(path, NLI4CT)
    assert len(read_nli4ct(path, NLI4CT, trials_dir=tmp_path / "trials")) == 1
    # the registry binds reader(path, task, **options)
    inspect.signature(read_nli4ct).bind(path, NLI4CT, trials_dir="x", on_error="drop")
    with pytest.raises(ValueError, match="on_error"):
        read_nli4ct(path, NLI4CT, on_error="skip")
