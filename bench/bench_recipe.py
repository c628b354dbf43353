"""The MPT recipe end to end, the old way and the new way, side by side in one run.

    python bench/bench_recipe.py [--preset demo|quick] [--n-eval N] [--seeds S] [--device cpu]
                                 [--out bench/results/recipe.csv]

Both ways run the same configuration (``mptkern demo``'s preset by default) on the same loaded
backbone, one after the other, each stage timed and its peak memory taken (``harness.peak_memory``):

  * ``old``: the recipe as it was before the grid, kept here only as this baseline: the teachers
    recomputed at every distillation step (``teacher_cache: off``), every target run trained on its
    own, every LoRA run on a ``copy.deepcopy`` of the backbone, every run evaluated by Hugging Face
    ``generate`` on the prompt concatenated before the input embeddings, in left-padded batches of
    ``eval_batch_size``.
  * ``new``: ``MPTTrainer`` as it is: the teacher cache, the prompt grid in one batched stream, LoRA
    runs on one shared PEFT model, every run evaluated by ``MultiTaskEngine``.

Greedy decoding and the same seeds on both sides: the scores should agree run for run; the script
reports how many do (float32 rounding in a different batch composition can flip a greedy token).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import tempfile
import time

import torch

import harness


def hf_texts(model, tokenizer, prompt, task, *, max_new_tokens: int, batch_size: int, max_length: int) -> list[str]:
    """The old evaluation: greedy HF ``generate`` on ``task.eval`` in left-padded batches;
    ``prompt`` ``(module, index)`` is concatenated before the input embeddings, or None (the model
    as it is). Returns the decoded continuations without special tokens."""
    from mptkern.data import InputFormat
    from mptkern.models import concat_prompt
    from mptkern.models.attention import attention_implementation
    from mptkern.models.registry import entry_for

    fmt, dev = InputFormat(tokenizer), model.get_input_embeddings().weight.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = []
    for i in range(0, len(task.eval), batch_size):
        rows = [fmt.source(ex.instruction, ex.input, max_length)[0] for ex in task.eval[i : i + batch_size]]
        n = max(map(len, rows))
        ids = torch.tensor([[pad] * (n - len(r)) + r for r in rows], device=dev)
        mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows], device=dev)
        embeds = model.get_input_embeddings()(ids)
        if prompt is not None:
            module, index = prompt
            embeds, mask = concat_prompt(module(torch.full((len(rows),), index, device=dev)), embeds, mask)
        with attention_implementation(model, entry_for(model.config).reference_attention), torch.no_grad():
            out = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        texts += tokenizer.batch_decode(out, skip_special_tokens=True)
    return texts


def old_way_trainer():
    """``MPTTrainer`` with the target stage of before: runs one by one, deepcopied LoRA, HF generate."""
    from mptkern.data import InputFormat
    from mptkern.eval import score
    from mptkern.train import MPTTrainer
    from mptkern.train.evaluation import generation_budget
    from mptkern.train.grid import PROMPT_METHODS

    class OldWay(MPTTrainer):
        def adapt_targets(self, student):
            from peft import get_peft_model

            cfg, results, fmt = self.config.target, [], InputFormat(self.tokenizer)
            for run in self.target_runs():
                kw = dict(max_new_tokens=generation_budget(fmt, run.task, self.config.max_new_tokens),
                          batch_size=self.config.eval_batch_size, max_length=self.config.max_length)
                if run.method in PROMPT_METHODS:
                    prompt = self.target_prompt(run, student)
                    if run.k:
                        self.train_prompt_grid([run], [prompt], name=run.name)
                    params = sum(p.numel() for p in prompt.parameters())
                    texts = hf_texts(self.model, self.tokenizer, (prompt, 0), run.task, **kw)
                else:
                    self._seed(run.name)
                    lora = get_peft_model(copy.deepcopy(self.model), self._lora_config())
                    params = sum(p.numel() for p in lora.parameters() if p.requires_grad)
                    if run.k:
                        collate = self._collator([run.task])

                        def step_loss(step, micro, run=run, lora=lora, collate=collate):
                            b = self._batch(collate, run.batch(step, micro, cfg.batch_size))
                            out = lora(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
                            return out.loss, int(b["attention_mask"].sum())

                        self._train(run.name, lora, cfg, step_loss)
                    texts = hf_texts(lora.eval(), self.tokenizer, None, run.task, **kw)
                results.append(self._row(run, params, score(run.task, texts, run.task.eval)))
            return results

    return OldWay


def run_way(way, cfg, model, tok, device) -> tuple[list[dict], list[dict]]:
    """Run the three stages of ``way``; returns (stage rows, results)."""
    from mptkern.train import MPTTrainer

    if way == "old":
        cfg = dataclasses.replace(cfg, distill_loss=dataclasses.replace(cfg.distill_loss, teacher_cache="off"))
    trainer = (old_way_trainer() if way == "old" else MPTTrainer)(cfg, model=model, tokenizer=tok)
    rows, state = [], {}
    stages = [("teachers", lambda: state.update(teachers=trainer.train_teachers())),
              ("distill", lambda: state.update(student=trainer.distill(state["teachers"]))),
              ("targets", lambda: state.update(results=trainer.adapt_targets(state["student"])))]
    for stage, fn in stages:
        t0 = time.perf_counter()
        peak = harness.peak_memory(fn, device)
        rows.append(dict(way=way, stage=stage, seconds=round(time.perf_counter() - t0, 2),
                         peak_mb=None if peak is None else round(peak / 2**20, 1)))
    return rows, state["results"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=["demo", "quick"], default="demo", help="demo: mptkern demo's CPU preset; quick: seconds")
    p.add_argument("--device", default="cpu")
    p.add_argument("--n-eval", type=int, default=None, help="eval examples per target (default: the preset's)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per k > 0 (default: the preset's)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=None,
                   help="the backbone's dtype (default: the preset's; float32 for scores equal run for run, "
                        "since bf16 rounds differently in the two ways' batch shapes)")
    p.add_argument("--out", default=str(harness.ROOT / "bench" / "results" / "recipe.csv"))
    args = p.parse_args(argv)
    from mptkern.demo import demo_config, quick_config
    from mptkern.models import load_default
    from mptkern.train.trainer import backbone_dtype

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = (demo_config(f"{tmp}/x", device=args.device) if args.preset == "demo"
               else dataclasses.replace(quick_config(f"{tmp}/x"), device=args.device))
        if args.n_eval is not None:
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, n_eval=args.n_eval))
        if args.dtype is not None:
            cfg = dataclasses.replace(cfg, dtype=args.dtype)
        if args.seeds is not None:
            cfg = dataclasses.replace(cfg, target_init=dataclasses.replace(cfg.target_init,
                                                                            seeds=list(range(args.seeds))))
        dtype = backbone_dtype(cfg.dtype, device)  # bf16 where the preset says
        model, tok = load_default(device=device, dtype=dtype)
        rows, results = [], {}
        for way in ("old", "new"):
            way_rows, results[way] = run_way(way, dataclasses.replace(cfg, output_dir=f"{tmp}/{way}"), model, tok, device)
            rows += way_rows
    old, new = results["old"], results["new"]
    key = lambda r: (r["task"], r["method"], r["k"], r["seed"])  # noqa: E731
    new_by = {key(r): r["score"] for r in new}
    same = sum(abs(r["score"] - new_by[key(r)]) < 1e-9 for r in old)
    diff = max(abs(r["score"] - new_by[key(r)]) for r in old)
    for way in ("old", "new"):
        rows.append(dict(way=way, stage="all", seconds=round(sum(r["seconds"] for r in rows if r["way"] == way), 2),
                     peak_mb=max((r["peak_mb"] or 0) for r in rows if r["way"] == way)))
    rows.sort(key=lambda r: (r["way"] != "old", r["stage"] == "all"))  # stable: each way's stages, then its total
    secs = {(r["way"], r["stage"]): r["seconds"] for r in rows}
    out_rows = []
    for r in rows:
        speed = round(secs["old", r["stage"]] / secs["new", r["stage"]], 2) if r["way"] == "new" else 1.0
        out_rows.append(dict(preset=args.preset, seeds=len(cfg.target_init.seeds),
                             dtype=str(dtype).removeprefix("torch."), **r, speedup_vs_old=speed, runs=len(old),
                             eval_per_target=cfg.data.n_eval,
                             mean_score=round(statistics.mean(x["score"] for x in results[r["way"]]), 4),
                             same_scores=f"{same}/{len(old)}", max_score_diff=round(diff, 4)))
    path = harness.append_rows(args.out, out_rows, device)
    print(f"{'way':<5} {'stage':<9} {'s':>8} {'peak MB':>9} {'vs old':>7}")
    for r in out_rows:
        print(f"{r['way']:<5} {r['stage']:<9} {r['seconds']:>8.1f} {r['peak_mb'] or 0:>9.0f} {r['speedup_vs_old']:>6.2f}x")
    print(f"scores equal run for run: {same}/{len(old)} (largest difference {diff:.4f}); rows appended to {path}")
    for r in old:  # the runs whose scores differ, to look into
        if abs(r["score"] - new_by[key(r)]) >= 1e-9:
            print(f"  differs: {r['task']} {r['method']} k={r['k']} seed={r['seed']}: old {r['score']:.4f}, new {new_by[key(r)]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
