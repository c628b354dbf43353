"""The public registry: its entries and licences, loading the real datasets with limits, fitting them
to max_length (inputs cut, answers never), and `mptkern train --data-root/--limit`."""

import importlib.util
import json
import warnings
from pathlib import Path

import pytest

from mptkern.data import Collator, InputFormat
from mptkern.data.lengths import length_report
from mptkern.data.registry import LicenseWarning, load_registry, read_registry, registry_path

ROOT = Path(__file__).resolve().parents[1]
HAS_OPENPYXL = importlib.util.find_spec("openpyxl") is not None
FLAGS = {"ddi_re": "non-commercial", "covid_fact_nli": "unlicensed", "nli4ct": "unlicensed", "mediqa_rrs": "unlicensed"}


def test_public_registry_entries_roles_and_licences():
    entries = {e.name: e for e in read_registry("public")}
    assert sorted(entries) == sorted(["ncbi_disease_ner", "bc5cdr_chem_ner", "ddi_re", "pubmedqa", "covid_fact_nli",
                                      "nli4ct", "mediqa_rrs", "mts_dialog", "meqsum"])
    assert {e.type for e in entries.values() if e.role == "source"} == {"ner", "re", "qa", "nli", "summarization"}
    assert {e.type for e in entries.values() if e.role == "target"} == {"ner", "nli", "summarization"}
    assert {n: e.license_flag for n, e in entries.items() if e.license_flag} == FLAGS
    assert all(e.license and e.origin for e in entries.values())
    assert entries["ddi_re"].license.startswith("CC BY-NC 4.0")
    with pytest.raises(ValueError, match="no shipped registry 'nope'"):
        registry_path("nope")
    with pytest.raises(FileNotFoundError, match="nope: no such registry file"):
        read_registry("nope")  # not a shipped name: a path


def _names():
    return [e.name for e in read_registry("public") if HAS_OPENPYXL or e.name != "meqsum"]


def test_public_registry_loads_every_dataset_with_limits(real_data):
    names = _names()
    with pytest.warns(LicenseWarning) as caught:
        suite = load_registry("public", real_data, names=names, limit=40, eval_limit=8, seed=1)
    flagged = {str(w.message).split("'")[1] for w in caught if issubclass(w.category, LicenseWarning)}
    assert flagged == set(FLAGS)
    tasks = {t.name: t for t in suite["sources"] + suite["targets"]}
    assert sorted(tasks) == sorted(names)
    for t in tasks.values():
        assert len(t.train) == 40 and len(t.eval) == 8, t.name
        assert t.meta["license_flag"] == FLAGS.get(t.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LicenseWarning)
        again = load_registry("public", real_data, names=["pubmedqa"], limit=40, eval_limit=8, seed=1)["sources"][0]
        full = load_registry("public", real_data, names=["pubmedqa"], seed=1)["sources"][0]
    assert [ex.input for ex in again.train] == [ex.input for ex in tasks["pubmedqa"].train]  # seeded: reproducible
    assert len(full.train) == 800 and len(full.eval) == 200  # eval_fraction 0.2 of the 1,000
    assert [ex.input for ex in again.train] != [ex.input for ex in full.train[:40]]  # a sample, not the file's head
    with pytest.raises(ValueError, match="limit must be a positive int"):
        load_registry("public", real_data, names=["pubmedqa"], limit=0)


@pytest.fixture(scope="module")
def small_backbone(tmp_path_factory):
    from tests.tiny_models import small_smollm

    return small_smollm(tmp_path_factory.mktemp("cache"))


def test_trainer_reports_lengths_and_cuts_inputs_never_answers(real_data, small_backbone, tmp_path):
    from mptkern.train import DataConfig, MPTTrainer, TrainConfig

    names = ["pubmedqa", "nli4ct", "mts_dialog", "ncbi_disease_ner"]
    cfg = TrainConfig(output_dir=str(tmp_path), max_length=160,
                      data=DataConfig(registry="public", data_root=str(real_data), tasks=names, limit=60, eval_limit=20))
    model, tok = small_backbone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LicenseWarning)
        trainer = MPTTrainer(cfg, model=model, tokenizer=tok)
    report, fmt = trainer.data_report, InputFormat(tok)
    tasks = {t.name: t for t in trainer.sources + trainer.targets}
    for name, task in tasks.items():
        collate = Collator(tok, {name: 0}, max_length=160)
        for ex in task.train:  # every kept example trains with its whole answer
            ids, labels = collate.encode(ex)
            assert len(ids) <= 160 and [t for t in labels if t != -100] == fmt.target(ex.target)
        assert report[name]["train"]["cut"] == collate.truncated  # the report counts what the collator cuts
        assert report[name]["train"]["n"] == len(task.train) and report[name]["eval"]["n"] == len(task.eval)
        assert report[name]["train"]["n"] + report[name]["train"]["dropped"] == 60
        fresh = length_report(task, fmt, 160)
        assert report[name]["eval"] == fresh["eval"]
        assert {k: v for k, v in report[name]["train"].items() if k != "dropped"} == fresh["train"]
    assert report["pubmedqa"]["train"]["cut"] > 30  # abstracts are longer than 160 tokens
    assert report["ncbi_disease_ner"]["train"]["cut"] < 5  # sentences are not
    saved = json.loads((tmp_path / "data.json").read_text())
    assert saved == {"max_length": 160, "tasks": report}


def test_cli_train_takes_data_root_limit_and_output_dir(monkeypatch, tmp_path, capsys):
    from mptkern import cli, demo

    seen = {}

    def fake_run(config, announce=None):
        seen["config"] = config
        announce("lengths")
        return "report"

    monkeypatch.setattr(demo, "run", fake_run)
    assert cli.main(["train", "--config", str(ROOT / "examples" / "public.yaml"), "--data-root", str(tmp_path),
                     "--limit", "3", "--eval-limit", "2", "--output-dir", str(tmp_path / "out")]) == 0
    cfg = seen["config"]
    assert cfg.data.registry == "public" and cfg.data.data_root == str(tmp_path)
    assert (cfg.data.limit, cfg.data.eval_limit, cfg.output_dir) == (3, 2, str(tmp_path / "out"))
    assert cfg.max_length == 256 and len(cfg.data.tasks) == 8  # the rest comes from the file
    assert capsys.readouterr().out == "lengths\nreport\n"
