"""Training and serving share one input format: a prompt the trainer trained and exported, served
over HTTP to a client sending the raw input text, answers what the trainer's own evaluation generated."""

import dataclasses
import json
import urllib.request

import pytest

from mptkern.data import InputFormat
from mptkern.prompts import read_peft_instructions
from mptkern.serve import MultiTaskEngine, Server
from mptkern.train import DataConfig, MPTTrainer, StageConfig, TargetConfig, TrainConfig
from mptkern.train.evaluation import generation_budget
from tests.tiny_models import small_smollm


def _post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def test_a_trained_prompt_served_over_http_answers_as_the_trainers_evaluation(tmp_path):
    model, tok = small_smollm(tmp_path / "cache")
    stage = StageConfig(steps=3, batch_size=4, warmup_steps=1, checkpoint_every=3)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), prompt_len=4, max_new_tokens=12,
                      data=DataConfig(n_train=8, n_eval=4), teachers=stage, distill=stage, target=stage,
                      target_init=TargetConfig(shots=[4], seeds=[0]), baselines=["prompt_tuning"])
    trainer = MPTTrainer(cfg, model=model, tokenizer=tok)
    trainer.suite["targets"] = trainer.targets = trainer.targets[:1]
    trainer.run()
    task = trainer.targets[0]
    with open(tmp_path / "run" / "generations.jsonl") as f:
        generated = {row["run"]: row["texts"] for row in map(json.loads, f)}
    runs = sorted(generated)
    assert len(runs) == 2  # the MPT run and the prompt-tuning run
    assert read_peft_instructions(tmp_path / "run" / "student_adapter") == {t.name: t.instruction for t in trainer.sources}
    budget = generation_budget(InputFormat(tok), task, cfg.max_new_tokens)
    for run in runs:
        adapter = tmp_path / "run" / "adapters" / run
        assert read_peft_instructions(adapter) == {task.name: task.instruction}
        engine = MultiTaskEngine(model, tok, {task.name: adapter}, max_seq_len=512)  # as `mptkern serve --task` builds it
        with Server(engine, port=0) as server:
            for ex, expected in zip(task.eval, generated[run]):
                answer = _post(server.url + "/v1/completions", {"model": task.name, "prompt": ex.input,
                                                                "max_tokens": budget, "temperature": 0})
                assert answer["choices"][0]["text"] == expected, (run, ex.input)
