"""A deterministic synthetic clinical-style task suite: 14 source tasks and 5 held-out target tasks.

**The data is synthetic.** Short clinical-style notes are composed from the vocabularies and templates
written in this file (drugs with their classes, routes, doses, adverse events and indications;
frequencies; conditions, symptoms, tests and treatments; social determinants of health; procedures;
radiology findings). No sentence comes from a real record. The suite is the embedded default data of
the demo and the tests; it is small enough for CPU training (every input is well under 60 SmolLM2
tokens) and varied enough that transfer from source to target tasks is a real question: targets use
label schemas no source uses, in output formats the sources use for other schemas.

========================  =============  ==========================================================  =============
task                      type           label schema                                                format
========================  =============  ==========================================================  =============
sources
``med_ner``               ner            drug, dose, route, frequency                                ner_typed
``ade_ner``               ner            drug, adverse_event                                         ner_inline
``concept_ner``           ner            problem, test, treatment                                    ner_json
``sdoh_ner``              ner            housing, employment, tobacco, alcohol                       ner_typed
``med_attr_re``           re             dose_of, route_of, frequency_of                             re_json
``ade_re``                re             causes                                                      re_tuple
``reason_re``             re             treats                                                      re_arrow
``drug_class_qa``         qa             drug classes (4 options)                                    qa_letter
``route_qa``              qa             oral, intravenous, subcutaneous, intramuscular, sublingual  qa_text
``frequency_qa``          qa             expanded dosing frequencies (4 options)                     qa_text
``negation_nli``          nli            entailment, neutral, contradiction                          nli_label
``med_status_nli``        nli            yes, no                                                     nli_label
``procedure_summary``     summarization  procedure, finding, complication                            free_text
``hpi_summary``           summarization  patient, history, complaint                                 bullets
targets
``substance_ner``         ner            tobacco, alcohol, drug_use, drug                            ner_json
``substance_attr_re``     re             amount, frequency, duration                                 re_tuple
``ade_cause_qa``          qa             drug names (4 options)                                      qa_letter
``finding_nli``           nli            supported, refuted, not_mentioned                           nli_label
``discharge_summary``     summarization  diagnosis, treatment, disposition, follow_up                free_text
========================  =============  ==========================================================  =============

:func:`make_suite` is deterministic by seed: each task draws its train and eval examples from its own
``random.Random`` seeded by ``(seed, task, split)``; inputs are distinct within a task and eval inputs
never appear in train. Every task can produce at least 2,000 train plus 500 eval distinct inputs.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

from mptkern.data.schema import (
    Entity, Example, Relation, Task, format_nli_input, format_qa_input,
)

__all__ = ["make_suite", "make_task", "SOURCE_TASKS", "TARGET_TASKS", "DRUGS", "DRUG_CLASSES"]

# ----------------------------------------------------------------------------------------------
# vocabularies
# ----------------------------------------------------------------------------------------------
# drug -> (class, routes, doses)
DRUGS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "metoprolol": ("beta blocker", ("PO", "IV"), ("12.5 mg", "25 mg", "50 mg", "5 mg")),
    "atenolol": ("beta blocker", ("PO",), ("25 mg", "50 mg", "100 mg")),
    "carvedilol": ("beta blocker", ("PO",), ("3.125 mg", "6.25 mg", "12.5 mg", "25 mg")),
    "lisinopril": ("ACE inhibitor", ("PO",), ("5 mg", "10 mg", "20 mg", "40 mg")),
    "enalapril": ("ACE inhibitor", ("PO",), ("2.5 mg", "5 mg", "10 mg")),
    "ramipril": ("ACE inhibitor", ("PO",), ("2.5 mg", "5 mg", "10 mg")),
    "losartan": ("angiotensin receptor blocker", ("PO",), ("25 mg", "50 mg", "100 mg")),
    "valsartan": ("angiotensin receptor blocker", ("PO",), ("80 mg", "160 mg")),
    "amlodipine": ("calcium channel blocker", ("PO",), ("2.5 mg", "5 mg", "10 mg")),
    "diltiazem": ("calcium channel blocker", ("PO", "IV"), ("30 mg", "120 mg", "10 mg")),
    "atorvastatin": ("statin", ("PO",), ("10 mg", "20 mg", "40 mg", "80 mg")),
    "simvastatin": ("statin", ("PO",), ("20 mg", "40 mg")),
    "rosuvastatin": ("statin", ("PO",), ("5 mg", "10 mg", "20 mg")),
    "warfarin": ("anticoagulant", ("PO",), ("2 mg", "5 mg", "7.5 mg")),
    "apixaban": ("anticoagulant", ("PO",), ("2.5 mg", "5 mg")),
    "heparin": ("anticoagulant", ("IV", "SC"), ("5000 units", "1000 units")),
    "enoxaparin": ("anticoagulant", ("SC",), ("40 mg", "60 mg", "80 mg")),
    "furosemide": ("loop diuretic", ("PO", "IV"), ("20 mg", "40 mg", "80 mg")),
    "bumetanide": ("loop diuretic", ("PO", "IV"), ("0.5 mg", "1 mg", "2 mg")),
    "hydrochlorothiazide": ("thiazide diuretic", ("PO",), ("12.5 mg", "25 mg")),
    "metformin": ("biguanide", ("PO",), ("500 mg", "850 mg", "1000 mg")),
    "insulin glargine": ("insulin", ("SC",), ("10 units", "20 units", "30 units")),
    "insulin lispro": ("insulin", ("SC",), ("4 units", "6 units", "8 units")),
    "amoxicillin": ("penicillin", ("PO",), ("500 mg", "875 mg")),
    "ceftriaxone": ("cephalosporin", ("IV", "IM"), ("1 g", "2 g")),
    "cefazolin": ("cephalosporin", ("IV",), ("1 g", "2 g")),
    "vancomycin": ("glycopeptide antibiotic", ("IV",), ("1 g", "1.25 g", "1.5 g")),
    "ciprofloxacin": ("fluoroquinolone", ("PO", "IV"), ("250 mg", "500 mg", "400 mg")),
    "levofloxacin": ("fluoroquinolone", ("PO", "IV"), ("500 mg", "750 mg")),
    "oxycodone": ("opioid", ("PO",), ("5 mg", "10 mg")),
    "morphine": ("opioid", ("PO", "IV"), ("2 mg", "4 mg", "15 mg")),
    "hydromorphone": ("opioid", ("PO", "IV"), ("0.5 mg", "1 mg", "2 mg")),
    "ibuprofen": ("NSAID", ("PO",), ("400 mg", "600 mg", "800 mg")),
    "naproxen": ("NSAID", ("PO",), ("250 mg", "500 mg")),
    "ketorolac": ("NSAID", ("IV", "IM"), ("15 mg", "30 mg")),
    "sertraline": ("SSRI", ("PO",), ("25 mg", "50 mg", "100 mg")),
    "fluoxetine": ("SSRI", ("PO",), ("10 mg", "20 mg", "40 mg")),
    "citalopram": ("SSRI", ("PO",), ("10 mg", "20 mg")),
    "omeprazole": ("proton pump inhibitor", ("PO",), ("20 mg", "40 mg")),
    "pantoprazole": ("proton pump inhibitor", ("PO", "IV"), ("40 mg",)),
    "prednisone": ("corticosteroid", ("PO",), ("10 mg", "20 mg", "40 mg", "60 mg")),
    "methylprednisolone": ("corticosteroid", ("IV",), ("40 mg", "125 mg")),
    "ondansetron": ("antiemetic", ("PO", "IV"), ("4 mg", "8 mg")),
    "haloperidol": ("antipsychotic", ("PO", "IM"), ("0.5 mg", "2 mg", "5 mg")),
    "lorazepam": ("benzodiazepine", ("PO", "IV", "SL"), ("0.5 mg", "1 mg", "2 mg")),
    "nitroglycerin": ("nitrate", ("SL",), ("0.4 mg",)),
    "levothyroxine": ("thyroid hormone", ("PO",), ("25 mcg", "50 mcg", "88 mcg", "112 mcg")),
}

# class -> (adverse events, indications)
DRUG_CLASSES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "beta blocker": (("bradycardia", "hypotension", "fatigue"), ("hypertension", "atrial fibrillation", "heart failure")),
    "ACE inhibitor": (("cough", "angioedema", "hyperkalemia"), ("hypertension", "heart failure", "diabetic nephropathy")),
    "angiotensin receptor blocker": (("hyperkalemia", "dizziness"), ("hypertension", "heart failure")),
    "calcium channel blocker": (("leg swelling", "constipation"), ("hypertension", "atrial fibrillation")),
    "statin": (("myalgia", "elevated liver enzymes"), ("hyperlipidemia", "coronary artery disease")),
    "anticoagulant": (("bleeding", "hematuria"), ("atrial fibrillation", "deep vein thrombosis", "pulmonary embolism")),
    "loop diuretic": (("hypokalemia", "acute kidney injury"), ("heart failure", "cirrhosis with ascites")),
    "thiazide diuretic": (("hyponatremia", "hypokalemia"), ("hypertension",)),
    "biguanide": (("diarrhea", "lactic acidosis"), ("type 2 diabetes",)),
    "insulin": (("hypoglycemia",), ("type 2 diabetes", "type 1 diabetes")),
    "penicillin": (("rash", "diarrhea"), ("pneumonia", "otitis media", "strep pharyngitis")),
    "cephalosporin": (("rash", "diarrhea"), ("pneumonia", "cellulitis", "urinary tract infection")),
    "glycopeptide antibiotic": (("red man syndrome", "acute kidney injury"), ("MRSA bacteremia", "cellulitis")),
    "fluoroquinolone": (("tendinitis", "QT prolongation"), ("urinary tract infection", "pneumonia")),
    "opioid": (("constipation", "respiratory depression", "sedation"), ("postoperative pain", "cancer pain")),
    "NSAID": (("GI bleeding", "acute kidney injury"), ("osteoarthritis", "back pain", "gout")),
    "SSRI": (("hyponatremia", "insomnia"), ("depression", "anxiety")),
    "proton pump inhibitor": (("headache", "hypomagnesemia"), ("GERD", "peptic ulcer disease")),
    "corticosteroid": (("hyperglycemia", "insomnia"), ("COPD exacerbation", "asthma exacerbation")),
    "antiemetic": (("QT prolongation", "headache"), ("nausea",)),
    "antipsychotic": (("QT prolongation", "dystonia"), ("delirium", "agitation")),
    "benzodiazepine": (("sedation", "respiratory depression"), ("anxiety", "alcohol withdrawal")),
    "nitrate": (("headache", "hypotension"), ("angina",)),
    "thyroid hormone": (("palpitations", "tachycardia"), ("hypothyroidism",)),
}

ROUTE_FORMS = {"PO": ("PO", "by mouth", "orally"), "IV": ("IV", "intravenously"), "SC": ("SC", "subcutaneously"),
               "IM": ("IM", "intramuscularly"), "SL": ("SL", "sublingually")}
ROUTE_NAMES = {"PO": "oral", "IV": "intravenous", "SC": "subcutaneous", "IM": "intramuscular", "SL": "sublingual"}
# written form -> meaning
FREQUENCIES = {
    "daily": "once daily", "QD": "once daily", "BID": "twice daily", "twice daily": "twice daily",
    "TID": "three times daily", "QID": "four times daily", "q6h": "every 6 hours", "q8h": "every 8 hours",
    "q12h": "every 12 hours", "QHS": "at bedtime", "at bedtime": "at bedtime", "PRN": "as needed",
    "as needed": "as needed", "weekly": "once weekly",
}
FREQ_ABBREVIATIONS = ("QD", "BID", "TID", "QID", "q6h", "q8h", "q12h", "QHS", "PRN")

CONDITIONS = ("hypertension", "type 2 diabetes", "atrial fibrillation", "heart failure", "COPD", "asthma",
              "chronic kidney disease", "coronary artery disease", "hyperlipidemia", "pneumonia", "cellulitis",
              "urinary tract infection", "depression", "GERD", "osteoarthritis", "hypothyroidism", "gout",
              "cirrhosis", "obstructive sleep apnea", "anemia", "dementia", "prior stroke")
SYMPTOMS = ("chest pain", "fever", "cough", "nausea", "vomiting", "headache", "shortness of breath",
            "abdominal pain", "dizziness", "palpitations", "leg swelling", "diarrhea", "chills", "back pain",
            "fatigue", "dysuria", "wheezing", "confusion", "weight loss", "night sweats")
TESTS = ("chest x-ray", "CT of the head", "CT abdomen", "echocardiogram", "EKG", "troponin", "CBC",
         "basic metabolic panel", "urinalysis", "blood cultures", "MRI of the spine", "HbA1c", "lipid panel",
         "lactate", "abdominal ultrasound", "D-dimer")
TREATMENTS = ("physical therapy", "hemodialysis", "IV fluids", "supplemental oxygen", "blood transfusion",
              "CPAP", "wound care", "nebulizer treatments")
DURATIONS = ("2 days", "3 days", "5 days", "1 week", "2 weeks", "3 weeks", "1 month", "3 months")

SDOH = {
    "housing": ("lives alone", "lives with her husband", "lives with his daughter", "homeless", "stays at a shelter",
                "lives in assisted living", "lives in a nursing home", "recently evicted"),
    "employment": ("works as a nurse", "works as a truck driver", "retired teacher", "unemployed", "on disability",
                   "works in construction", "full-time student", "retired"),
    "tobacco": ("smokes 1 pack per day", "former smoker", "quit smoking 10 years ago", "never smoker",
                "denies tobacco", "smokes half a pack daily", "chews tobacco"),
    "alcohol": ("drinks 2 beers daily", "occasional wine", "denies alcohol", "history of heavy drinking",
                "sober for 3 years", "drinks a pint of vodka daily"),
    "drug_use": ("uses marijuana daily", "history of IV heroin use", "denies illicit drugs", "snorts cocaine on weekends",
                 "in remission from opioid use disorder", "uses methamphetamine", "prior IV drug use"),
}
SOCIAL_DISTRACTORS = ("married", "has two children", "enjoys fishing", "walks with a cane", "has a dog", "speaks Spanish")
# medications for substance use (target NER): drug -> doses
SUBSTANCE_DRUGS = {"methadone": ("60 mg", "80 mg"), "buprenorphine": ("8 mg", "16 mg"), "naltrexone": ("50 mg",),
                   "varenicline": ("0.5 mg", "1 mg"), "nicotine patch": ("14 mg", "21 mg"), "disulfiram": ("250 mg",),
                   "acamprosate": ("666 mg",)}
# substance -> (verb, amounts)
SUBSTANCES = {
    "cigarettes": ("Smokes", ("1 pack", "half a pack", "2 packs", "10 cigarettes")),
    "cigars": ("Smokes", ("1 cigar", "2 cigars")),
    "beer": ("Drinks", ("2 cans", "3 beers", "6 beers", "a pint")),
    "wine": ("Drinks", ("2 glasses", "a bottle", "1 glass")),
    "vodka": ("Drinks", ("a pint", "4 shots", "a fifth")),
    "whiskey": ("Drinks", ("3 shots", "2 drinks")),
    "marijuana": ("Uses", ("1 joint", "2 joints")),
    "cocaine": ("Uses", ("1 gram", "half a gram")),
}
HABIT_FREQUENCIES = ("daily", "nightly", "on weekends", "twice a week", "most days", "every morning")
HABIT_DURATIONS = ("6 months", "2 years", "5 years", "10 years", "20 years", "30 years")

# procedure -> (indications, findings)
PROCEDURES = {
    "colonoscopy": (("screening", "rectal bleeding", "anemia"),
                    ("two small polyps removed", "diverticulosis", "normal mucosa", "internal hemorrhoids")),
    "upper endoscopy": (("epigastric pain", "melena", "dysphagia"),
                        ("mild gastritis", "a duodenal ulcer", "esophagitis", "a normal esophagus")),
    "cardiac catheterization": (("chest pain", "an abnormal stress test"),
                                ("LAD stenosis treated with a stent", "nonobstructive coronary disease",
                                 "normal coronary arteries")),
    "echocardiogram": (("dyspnea", "a new murmur", "syncope"),
                       ("ejection fraction of 35%", "normal ejection fraction", "moderate mitral regurgitation",
                        "a small pericardial effusion")),
    "lumbar puncture": (("headache and fever", "altered mental status"),
                        ("clear fluid with a normal cell count", "elevated protein", "elevated opening pressure")),
    "bronchoscopy": (("hemoptysis", "a lung mass"),
                     ("mucus plugging", "an endobronchial lesion that was biopsied", "no endobronchial lesion")),
    "paracentesis": (("ascites", "abdominal distension"), ("3 liters of clear fluid removed", "cloudy fluid sent for culture")),
    "thoracentesis": (("a pleural effusion", "dyspnea"),
                      ("1.2 liters of straw-colored fluid removed", "bloody fluid sent for cytology")),
}
COMPLICATIONS = ("minor bleeding", "transient hypotension", "a small hematoma", "a vasovagal episode")

# radiology finding -> (present statements, absent statements)
RADIOLOGY = {
    "pleural effusion": (("Small left pleural effusion.", "Moderate right pleural effusion."), ("No pleural effusion.",)),
    "pneumothorax": (("Small apical pneumothorax.", "Tiny left pneumothorax."), ("No pneumothorax.",)),
    "consolidation": (("Right lower lobe consolidation.", "Patchy left basilar consolidation."), ("No focal consolidation.",)),
    "cardiomegaly": (("Mild cardiomegaly.", "Stable cardiomegaly."), ("Heart size is normal.",)),
    "pulmonary edema": (("Mild pulmonary edema.", "Interstitial pulmonary edema."), ("No pulmonary edema.",)),
    "atelectasis": (("Bibasilar atelectasis.", "Left basilar atelectasis."), ("No atelectasis.",)),
    "rib fracture": (("Acute left rib fracture.", "Healing right rib fracture."), ("No acute fracture.",)),
    "lung nodule": (("6 mm right upper lobe nodule.", "Small left lung nodule."), ("No suspicious lung nodule.",)),
}
CLINICS = ("primary care", "cardiology", "pulmonology", "infectious disease", "nephrology", "endocrinology")
DISPOSITIONS = {"home": "home", "home with services": "home with home health", "skilled nursing facility":
                "to a skilled nursing facility", "rehab": "to acute rehab"}


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _drug(rng, drugs=None):
    name = rng.choice(sorted(drugs or DRUGS))
    return name, DRUGS[name]


def _treating(condition: str) -> list[str]:
    """Drugs whose class lists ``condition`` as an indication."""
    return sorted(d for d, (c, _, _) in DRUGS.items() if condition in DRUG_CLASSES[c][1])


def _causing(ae: str) -> list[str]:
    return sorted(d for d, (c, _, _) in DRUGS.items() if ae in DRUG_CLASSES[c][0])


class _Note:
    """A text built piece by piece that records the character offsets of the spans it marks."""

    def __init__(self):
        self.text = ""
        self.entities: list[Entity] = []

    def add(self, s: str) -> _Note:
        self.text += s
        return self

    def ent(self, s: str, etype: str | None) -> _Note:
        """Append ``s`` and record it as an entity of ``etype`` (None: plain text)."""
        start = len(self.text)
        self.text += s
        if etype is not None:
            self.entities.append(Entity(s, etype, start, len(self.text)))
        return self


# ----------------------------------------------------------------------------------------------
# generators: (rng, task) -> Example
# ----------------------------------------------------------------------------------------------
def _med_mention(rng, note: _Note, drug: str, *, typed: bool, p_dose=0.85, p_route=0.6, p_freq=0.8):
    """Append ``drug [dose] [route] [frequency]``; returns the attribute spans added as (text, kind)."""
    cls, routes, doses = DRUGS[drug]
    attrs = []
    note.ent(drug, "drug" if typed else None)
    for kind, p, choices in (("dose", p_dose, doses), ("route", p_route, tuple(f for r in routes for f in ROUTE_FORMS[r])),
                             ("frequency", p_freq, tuple(FREQUENCIES))):
        if rng.random() < p:
            note.add(" ")
            text = rng.choice(choices)
            note.ent(text, kind if typed else None)
            attrs.append((text, kind))
    return attrs


def _med_list(rng, note: _Note, typed: bool, n_max: int = 3):
    drugs = rng.sample(sorted(DRUGS), rng.randint(1, n_max))
    note.add(rng.choice(("Home meds: ", "Medications: ", "Discharge meds: ", "Started ", "Continue ", "Current meds include ")))
    sep = rng.choice((", ", "; "))
    out = []
    for i, d in enumerate(drugs):
        if i:
            note.add(sep)
        out.append((d, _med_mention(rng, note, d, typed=typed)))
    note.add(".")
    return out


def _gen_med_ner(rng, task):
    note = _Note()
    _med_list(rng, note, typed=True)
    return task.example(note.text, entities=note.entities)


def _gen_med_attr_re(rng, task):
    note = _Note()
    rels = []
    for drug, attrs in _med_list(rng, note, typed=False, n_max=2):
        rels += [Relation(text, f"{kind}_of", drug) for text, kind in attrs]
    return task.example(note.text, relations=rels)


def _gen_ade_ner(rng, task):
    note = _Note()
    drug, (cls, _, _) = _drug(rng)
    ae = rng.choice(DRUG_CLASSES[cls][0])
    form = rng.randrange(6)
    if form == 0:
        note.add("Developed ").ent(ae, "adverse_event").add(" after starting ").ent(drug, "drug").add(".")
    elif form == 1:
        note.ent(_cap(drug), "drug").add(" was stopped because of ").ent(ae, "adverse_event").add(".")
    elif form == 2:
        other = rng.choice([d for d in sorted(DRUGS) if DRUGS[d][0] != cls])
        note.ent(_cap(ae), "adverse_event").add(" attributed to ").ent(drug, "drug")
        note.add("; switched to ").ent(other, "drug").add(".")
    elif form == 3:  # a negated adverse event is not an adverse event mention
        note.add("Tolerating ").ent(drug, "drug").add(f" without {ae}.")
    elif form == 4:
        note.add("No adverse reactions to ").ent(drug, "drug").add(".")
    else:  # a symptom of the disease, not of the drug
        cond = rng.choice(DRUG_CLASSES[cls][1])
        note.add(f"{_cap(rng.choice(SYMPTOMS))} from {cond}; continued ").ent(drug, "drug").add(".")
    return task.example(note.text, entities=note.entities)


def _gen_ade_re(rng, task):
    d1, (c1, _, _) = _drug(rng)
    ae1 = rng.choice(DRUG_CLASSES[c1][0])
    form = rng.randrange(6)
    if form == 0:
        d2 = rng.choice([d for d in sorted(DRUGS) if ae1 not in DRUG_CLASSES[DRUGS[d][0]][0]])
        a, b = (d1, d2) if rng.random() < 0.5 else (d2, d1)
        text, rels = f"Patient on {a} and {b}; {ae1} attributed to {d1}.", [Relation(d1, "causes", ae1)]
    elif form == 1:
        text, rels = f"{_cap(ae1)} developed after {d1} was started; {d1} was held.", [Relation(d1, "causes", ae1)]
    elif form == 2:
        text, rels = f"{_cap(d1)} discontinued due to {ae1}.", [Relation(d1, "causes", ae1)]
    elif form == 3:
        d2 = rng.choice([d for d in sorted(DRUGS) if DRUGS[d][0] != c1])
        ae2 = rng.choice([a for a in DRUG_CLASSES[DRUGS[d2][0]][0] if a != ae1] or DRUG_CLASSES[DRUGS[d2][0]][0])
        text = f"Prior {ae1} on {d1} and {ae2} on {d2}."
        rels = [Relation(d1, "causes", ae1), Relation(d2, "causes", ae2)]
    elif form == 4:
        text, rels = f"{_cap(rng.choice(SYMPTOMS))} likely due to {rng.choice(CONDITIONS)}, not {d1}.", []
    else:
        text, rels = f"Tolerating {d1} well without {ae1}.", []
    return task.example(text, relations=rels)


def _gen_reason_re(rng, task):
    d1, (c1, _, doses) = _drug(rng)
    cond1 = rng.choice(DRUG_CLASSES[c1][1])
    form = rng.randrange(5)
    if form == 0:
        text, rels = f"Started {d1} for {cond1}.", [Relation(d1, "treats", cond1)]
    elif form == 1:
        text, rels = f"{_cap(cond1)}: continue {d1} {rng.choice(doses)}.", [Relation(d1, "treats", cond1)]
    elif form == 2:
        d2 = rng.choice([d for d in sorted(DRUGS) if DRUGS[d][0] != c1])
        cond2 = rng.choice([c for c in DRUG_CLASSES[DRUGS[d2][0]][1] if c != cond1] or DRUG_CLASSES[DRUGS[d2][0]][1])
        text = f"{_cap(d1)} {rng.choice(doses)} {rng.choice(('daily', 'BID'))} for {cond1} and {d2} for {cond2}."
        rels = [Relation(d1, "treats", cond1), Relation(d2, "treats", cond2)]
    elif form == 3:
        text, rels = f"Takes {d1} as needed for {cond1}.", [Relation(d1, "treats", cond1)]
    else:
        other = rng.choice([c for c in CONDITIONS if c != cond1])
        text, rels = f"{_cap(d1)} was held; {other} is stable.", []
    return task.example(text, relations=rels)


def _gen_concept_ner(rng, task):
    note = _Note()
    problem = lambda: rng.choice(CONDITIONS + SYMPTOMS)  # noqa: E731
    treatment = lambda: rng.choice(sorted(DRUGS) + list(TREATMENTS))  # noqa: E731
    form = rng.randrange(6)
    if form == 0:
        note.ent(_cap(rng.choice(TESTS)), "test").add(" showed ").ent(problem(), "problem").add(".")
    elif form == 1:
        note.add("Patient with ").ent(problem(), "problem").add(" was started on ").ent(treatment(), "treatment")
        note.add(".")
    elif form == 2:
        t1, t2 = rng.sample(sorted(DRUGS) + list(TREATMENTS), 2)
        note.ent(_cap(problem()), "problem").add(" treated with ").ent(t1, "treatment")
        note.add(" and ").ent(t2, "treatment").add(".")
    elif form == 3:
        note.add("Ordered ").ent(rng.choice(TESTS), "test").add(" to evaluate ").ent(rng.choice(SYMPTOMS), "problem")
        note.add(".")
    elif form == 4:
        note.add("History of ").ent(problem(), "problem").add("; ").ent(rng.choice(TESTS), "test")
        note.add(" was unremarkable.")
    else:
        note.add("Received ").ent(treatment(), "treatment").add(" for ").ent(problem(), "problem")
        note.add("; repeat ").ent(rng.choice(TESTS), "test").add(" pending.")
    return task.example(note.text, entities=note.entities)


def _social(rng, note: _Note, categories: tuple[str, ...], k_range=(2, 4)):
    note.add(rng.choice(("SH: ", "Social history: ", "Social: ")))
    cats = rng.sample(categories, min(rng.randint(*k_range), len(categories)))
    items = [(rng.choice(SDOH[c]), c) for c in cats]
    if rng.random() < 0.3:
        items.insert(rng.randrange(len(items) + 1), (rng.choice(SOCIAL_DISTRACTORS), None))
    sep = rng.choice((", ", "; ", ". "))
    for i, (phrase, cat) in enumerate(items):
        if i:
            note.add(sep)
        note.ent(_cap(phrase) if i and sep == ". " else phrase, cat)
    note.add(".")


def _gen_sdoh_ner(rng, task):
    note = _Note()
    _social(rng, note, ("housing", "employment", "tobacco", "alcohol"))
    return task.example(note.text, entities=note.entities)


def _gen_drug_class_qa(rng, task):
    drug, (cls, _, doses) = _drug(rng)
    others = rng.sample([c for c in sorted(DRUG_CLASSES) if c != cls], 3)
    choices = others + [cls]
    rng.shuffle(choices)
    context = f"{rng.choice(('Home medications include', 'Started', 'Continue'))} {drug} {rng.choice(doses)} " \
              f"{rng.choice(('daily', 'BID', 'TID', 'as needed'))}."
    question = f"What is the drug class of {drug}?"
    return task.example(format_qa_input(question, choices, context), label=cls, choices=choices)


def _gen_route_qa(rng, task):
    drug, (_, routes, doses) = _drug(rng)
    route = rng.choice(routes)
    others = rng.sample([ROUTE_NAMES[r] for r in sorted(ROUTE_NAMES) if r != route], 3)
    choices = others + [ROUTE_NAMES[route]]
    rng.shuffle(choices)
    context = f"Order: {drug} {rng.choice(doses)} {route} {rng.choice(FREQ_ABBREVIATIONS)}."
    return task.example(format_qa_input(f"By which route is {drug} given?", choices, context),
                        label=ROUTE_NAMES[route], choices=choices)


def _gen_frequency_qa(rng, task):
    drug, (_, routes, doses) = _drug(rng)
    abbrev = rng.choice(FREQ_ABBREVIATIONS)
    meaning = FREQUENCIES[abbrev]
    meanings = sorted({FREQUENCIES[a] for a in FREQ_ABBREVIATIONS} - {meaning})
    choices = rng.sample(meanings, 3) + [meaning]
    rng.shuffle(choices)
    context = f"Sig: {drug} {rng.choice(doses)} {rng.choice(routes)} {abbrev}."
    return task.example(format_qa_input(f"How often is {drug} given?", choices, context), label=meaning, choices=choices)


_PRESENT = ("Patient reports {}.", "Complains of {} for 2 days.", "Endorses {}.", "Presents with {}.", "{} since this morning.")
_ABSENT = ("Denies {}.", "No {}.", "Negative for {}.", "Patient denies any {}.", "Without {}.")


def _gen_negation_nli(rng, task):
    a, b, c = rng.sample(SYMPTOMS, 3)
    form = rng.randrange(3)
    if form == 0:  # one finding, present or absent
        present = rng.random() < 0.5
        premise = _cap(rng.choice(_PRESENT if present else _ABSENT).format(a))
        facts = {a: present}
    elif form == 1:
        premise, facts = f"Reports {a} but denies {b}.", {a: True, b: False}
    else:
        premise, facts = f"No {b}; endorses {a}.", {a: True, b: False}
    target = rng.choice(list(facts) + [c])
    label = "neutral" if target not in facts else ("entailment" if facts[target] else "contradiction")
    hypothesis = rng.choice(("The patient has {}.", "The patient is experiencing {}.", "Positive for {}.")).format(target)
    return task.example(format_nli_input(premise, _cap(hypothesis)), label=label)


def _gen_med_status_nli(rng, task):
    drug, (cls, _, doses) = _drug(rng)
    # a switch stays within the class; drugs alone in their class are compared with any other drug
    other = rng.choice([d for d in sorted(DRUGS) if DRUGS[d][0] == cls and d != drug] or [d for d in sorted(DRUGS) if d != drug])
    form = rng.randrange(7)
    if form == 0:
        premise, taking = f"Continue {drug} {rng.choice(doses)} daily.", {drug}
    elif form == 1:
        premise, taking = f"Started {drug} for {rng.choice(DRUG_CLASSES[cls][1])}.", {drug}
    elif form == 2:
        premise, taking = f"{_cap(drug)} increased to {rng.choice(doses)}.", {drug}
    elif form == 3:
        premise, taking = f"{_cap(drug)} discontinued due to {rng.choice(DRUG_CLASSES[cls][0])}.", set()
    elif form == 4:
        premise, taking = f"Held {drug} given {rng.choice(('low blood pressure', 'procedure tomorrow', 'poor oral intake'))}.", set()
    elif form == 5:
        premise, taking = f"Stopped {drug} on admission.", set()
    else:
        premise, taking = f"{_cap(drug)} was switched to {other}.", {other}
    asked = rng.choice((drug, drug, other))
    hypothesis = f"The patient is currently taking {asked}."
    return task.example(format_nli_input(premise, hypothesis), label="yes" if asked in taking else "no")


def _gen_procedure_summary(rng, task):
    proc = rng.choice(sorted(PROCEDURES))
    indications, findings = PROCEDURES[proc]
    ind, finding = rng.choice(indications), rng.choice(findings)
    comp = rng.choice(COMPLICATIONS) if rng.random() < 0.3 else None
    closing = rng.choice(("Patient tolerated the procedure well.", "Monitored in recovery.", "Specimens sent to pathology.",
                          "Sedation with propofol.", "Estimated blood loss minimal.", ""))
    if rng.random() < 0.5:
        text = f"{_cap(proc)} performed for {ind}. Findings: {finding}. Complications: {comp or 'none'}. {closing}"
    else:
        text = (f"Underwent {proc} today for {ind}; {finding} was seen. "
                + (f"Course complicated by {comp}. " if comp else "No complications. ") + closing)
    summary = f"{_cap(proc)} for {ind}: {finding}; " + (f"complicated by {comp}." if comp else "no complications.")
    return task.example(text.strip(), summary=summary)


def _gen_hpi_summary(rng, task):
    age, male = rng.randint(25, 92), rng.random() < 0.5
    c1, c2 = rng.sample(CONDITIONS, 2)
    symptom, duration = rng.choice(SYMPTOMS), rng.choice(DURATIONS)
    form = rng.randrange(3)
    if form == 0:
        text = f"{age}-year-old {'man' if male else 'woman'} with {c1} and {c2} presents with {duration} of {symptom}."
    elif form == 1:
        text = f"{age} y/o {'M' if male else 'F'} with PMH of {c1}, {c2} here for {symptom} x {duration}."
    else:
        text = (f"Patient is a {age}-year-old {'male' if male else 'female'} with history of {c1} and {c2} "
                f"who reports {symptom} for {duration}.")
    text += rng.choice(("", " Vitals are stable.", " No recent travel.", " Took ibuprofen without relief."))
    summary = f"{age}-year-old {'man' if male else 'woman'}; history of {c1} and {c2}; {symptom} for {duration}"
    return task.example(text, summary=summary)


# -- targets -------------------------------------------------------------------------------------
def _gen_substance_ner(rng, task):
    note = _Note()
    _social(rng, note, ("tobacco", "alcohol", "drug_use"), k_range=(1, 3))
    if rng.random() < 0.6:
        drug = rng.choice(sorted(SUBSTANCE_DRUGS))
        form = rng.randrange(3)
        if form == 0:
            note.add(" Maintained on ").ent(drug, "drug").add(f" {rng.choice(SUBSTANCE_DRUGS[drug])} daily.")
        elif form == 1:
            note.add(" Started ").ent(drug, "drug").add(" today.")
        else:
            note.add(" Declined ").ent(drug, "drug").add(".")
    return task.example(note.text, entities=note.entities)


def _gen_substance_attr_re(rng, task):
    parts, rels = [], []
    subs = rng.sample(sorted(SUBSTANCES), rng.randint(1, 2))
    for s in subs:
        verb, amounts = SUBSTANCES[s]
        keep = [k for k in ("amount", "frequency", "duration") if rng.random() < 0.7] or [rng.choice(("amount", "frequency", "duration"))]
        text = f"{verb} {s}"
        if "amount" in keep:
            a = rng.choice(amounts)
            text += f", {a}"
            rels.append(Relation(s, "amount", a))
        if "frequency" in keep:
            f = rng.choice(HABIT_FREQUENCIES)
            text += f" {f}"
            rels.append(Relation(s, "frequency", f))
        if "duration" in keep:
            d = rng.choice(HABIT_DURATIONS)
            text += f" for {d}"
            rels.append(Relation(s, "duration", d))
        parts.append(text + ".")
    if rng.random() < 0.3:
        parts.insert(rng.randrange(len(parts) + 1), f"Denies {rng.choice(('cocaine', 'heroin', 'vaping', 'alcohol'))}.")
    return task.example(rng.choice(("SH: ", "Social history: ", "")) + " ".join(parts), relations=rels)


def _gen_ade_cause_qa(rng, task):
    ae = rng.choice(sorted({a for aes, _ in DRUG_CLASSES.values() for a in aes}))
    culprit = rng.choice(_causing(ae))
    innocent = [d for d in sorted(DRUGS) if d not in _causing(ae)]
    bystander, *distractors = rng.sample(innocent, 3)
    pair = [culprit, bystander]
    rng.shuffle(pair)
    context = f"{rng.choice(('Takes', 'On', 'Recently started'))} {pair[0]} and {pair[1]}; now with {ae}."
    choices = [culprit, bystander] + distractors
    rng.shuffle(choices)
    return task.example(format_qa_input("Which drug most likely caused it?", choices, context),
                        label=culprit, choices=choices)


def _gen_finding_nli(rng, task):
    f1, f2, f3 = rng.sample(sorted(RADIOLOGY), 3)
    p1, p2 = rng.random() < 0.5, rng.random() < 0.5
    s1 = rng.choice(RADIOLOGY[f1][0 if p1 else 1])
    s2 = rng.choice(RADIOLOGY[f2][0 if p2 else 1])
    premise = f"{rng.choice(('Findings:', 'Impression:', 'Chest radiograph:'))} {s1} {s2}"
    asked = rng.choice((f1, f2, f3))
    facts = {f1: p1, f2: p2}
    label = "not_mentioned" if asked not in facts else ("supported" if facts[asked] else "refuted")
    hypothesis = rng.choice(("There is {}.", "Imaging shows {}.", "The study demonstrates {}.")).format(asked)
    return task.example(format_nli_input(premise, hypothesis), label=label)


def _gen_discharge_summary(rng, task):
    cond = rng.choice(sorted({c for _, inds in DRUG_CLASSES.values() for c in inds}))
    drugs = rng.sample(_treating(cond), min(len(_treating(cond)), rng.randint(1, 2)))
    route = ROUTE_NAMES[DRUGS[drugs[0]][1][0]]
    dispo = rng.choice(sorted(DISPOSITIONS))
    clinic, weeks = rng.choice(CLINICS), rng.randint(1, 4)
    treated = " and ".join(drugs)
    text = (f"Admitted with {cond}. Treated with {route} {treated}. "
            f"{rng.choice(('Symptoms improved.', 'Course was uncomplicated.', 'Required one night in the ICU.'))} "
            f"Discharged {DISPOSITIONS[dispo]}; follow up with {clinic} in {weeks} week{'s' if weeks > 1 else ''}.")
    summary = (f"Diagnosis: {cond} | Treatment: {', '.join(drugs)} | Disposition: {dispo} | "
               f"Follow-up: {clinic} in {weeks} week{'s' if weeks > 1 else ''}")
    return task.example(text, summary=summary)


# ----------------------------------------------------------------------------------------------
# task table
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Spec:
    name: str
    type: str
    labels: tuple[str, ...]
    output_format: str
    instruction: str
    generate: Callable[[random.Random, Task], Example]


_ROUTES = tuple(ROUTE_NAMES[r] for r in ("PO", "IV", "SC", "IM", "SL"))

SOURCE_TASKS: tuple[_Spec, ...] = (
    _Spec("med_ner", "ner", ("drug", "dose", "route", "frequency"), "ner_typed",
          "Extract drug, dose, route and frequency mentions as 'type: span' items separated by '; '.", _gen_med_ner),
    _Spec("ade_ner", "ner", ("drug", "adverse_event"), "ner_inline",
          "Tag drugs and adverse drug events as 'span [TYPE]', or answer none.", _gen_ade_ner),
    _Spec("concept_ner", "ner", ("problem", "test", "treatment"), "ner_json",
          "Extract problems, tests and treatments as a JSON object of lists.", _gen_concept_ner),
    _Spec("sdoh_ner", "ner", ("housing", "employment", "tobacco", "alcohol"), "ner_typed",
          "Extract social history mentions (housing, employment, tobacco, alcohol) as 'type: span' items.", _gen_sdoh_ner),
    _Spec("med_attr_re", "re", ("dose_of", "route_of", "frequency_of"), "re_json",
          "List dose_of, route_of and frequency_of relations as JSON [attribute, relation, drug] triples.", _gen_med_attr_re),
    _Spec("ade_re", "re", ("causes",), "re_tuple",
          "List which drug causes which adverse event as '(drug | causes | event)', or none.", _gen_ade_re),
    _Spec("reason_re", "re", ("treats",), "re_arrow",
          "List which drug treats which condition as 'drug --treats--> condition', or none.", _gen_reason_re),
    _Spec("drug_class_qa", "qa", tuple(sorted(DRUG_CLASSES)), "qa_letter",
          "Answer with the letter of the correct option.", _gen_drug_class_qa),
    _Spec("route_qa", "qa", _ROUTES, "qa_text", "Answer with the text of the correct option.", _gen_route_qa),
    _Spec("frequency_qa", "qa", tuple(sorted({FREQUENCIES[a] for a in FREQ_ABBREVIATIONS})), "qa_text",
          "Answer with the text of the correct option.", _gen_frequency_qa),
    _Spec("negation_nli", "nli", ("entailment", "neutral", "contradiction"), "nli_label",
          "Does the premise entail or contradict the hypothesis? Answer entailment, contradiction or neutral.",
          _gen_negation_nli),
    _Spec("med_status_nli", "nli", ("yes", "no"), "nli_label",
          "Is the hypothesis true given the premise? Answer yes or no.", _gen_med_status_nli),
    _Spec("procedure_summary", "summarization", ("procedure", "finding", "complication"), "free_text",
          "Summarize the procedure note in one sentence.", _gen_procedure_summary),
    _Spec("hpi_summary", "summarization", ("patient", "history", "complaint"), "bullets",
          "Summarize the history as bullet points.", _gen_hpi_summary),
)

TARGET_TASKS: tuple[_Spec, ...] = (
    _Spec("substance_ner", "ner", ("tobacco", "alcohol", "drug_use", "drug"), "ner_json",
          "Extract tobacco, alcohol, drug_use and drug mentions as a JSON object of lists.", _gen_substance_ner),
    _Spec("substance_attr_re", "re", ("amount", "frequency", "duration"), "re_tuple",
          "List the amount, frequency and duration of each substance as '(substance | relation | value)'.",
          _gen_substance_attr_re),
    _Spec("ade_cause_qa", "qa", tuple(sorted(DRUGS)), "qa_letter",
          "Answer with the letter of the correct option.", _gen_ade_cause_qa),
    _Spec("finding_nli", "nli", ("supported", "refuted", "not_mentioned"), "nli_label",
          "Is the hypothesis supported, refuted or not mentioned by the report?", _gen_finding_nli),
    _Spec("discharge_summary", "summarization", ("diagnosis", "treatment", "disposition", "follow_up"), "free_text",
          "Summarize the admission as 'Diagnosis: ... | Treatment: ... | Disposition: ... | Follow-up: ...'.",
          _gen_discharge_summary),
)


def _draw(spec: _Spec, task: Task, rng: random.Random, n: int, exclude: set[str]) -> list[Example]:
    out, seen, attempts = [], set(exclude), 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"synthetic task {spec.name!r} produced only {len(out)} distinct inputs of {n} asked")
        ex = spec.generate(rng, task)
        if ex.input in seen:
            continue
        seen.add(ex.input)
        ex.meta.update(source="synthetic")
        out.append(ex)
    return out


def make_task(spec: _Spec, seed: int, n_train: int, n_eval: int, role: str) -> Task:
    """One synthetic task with ``n_train`` train and ``n_eval`` eval examples (eval inputs never in train)."""
    task = Task(spec.name, spec.type, spec.instruction, spec.labels, spec.output_format,
                meta={"source": "synthetic", "role": role, "seed": seed})
    task.train = _draw(spec, task, random.Random(f"mptkern-synthetic/{seed}/{spec.name}/train"), n_train, set())
    task.eval = _draw(spec, task, random.Random(f"mptkern-synthetic/{seed}/{spec.name}/eval"), n_eval,
                      {ex.input for ex in task.train})
    return task


def make_suite(seed: int = 0, n_train: int = 64, n_eval: int = 32) -> dict[str, list[Task]]:
    """The synthetic suite: ``{"sources": [14 Task], "targets": [5 Task]}`` in the order of the table in
    the module docstring, each with ``n_train`` train and ``n_eval`` eval examples.

    Same ``seed`` -> identical tasks and examples (string-seeded ``random.Random``, independent of
    ``PYTHONHASHSEED``); a different seed -> different examples. Raises ValueError when a task cannot
    produce that many distinct inputs.
    """
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train and n_eval must be >= 0, got {n_train}, {n_eval}")
    return {
        "sources": [make_task(s, seed, n_train, n_eval, "source") for s in SOURCE_TASKS],
        "targets": [make_task(s, seed, n_train, n_eval, "target") for s in TARGET_TASKS],
    }
