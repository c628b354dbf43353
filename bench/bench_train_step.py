"""One MPT distillation step (teacher forward without grad, student forward + backward) vs the same
step written with PEFT.

Contenders, same frozen SmolLM2-135M-Instruct, same batch (B sequences, K tasks, LM loss and
distillation on every real token):
  * ``mptkern``: ``PromptedLM`` (shared-prefix packing) for a ``TaskPrompts`` teacher and a
    ``MultitaskPrompt`` student, ``fused_distill_loss`` (CE + T^2 KL + hidden MSE, no logits tensor);
  * ``peft``: PEFT's MultitaskPromptTuning student, a prompt-tuning teacher (per-task prompts
    concatenated in front of the embeddings, as PEFT prompt tuning does), full logits, torch KL,
    CE and MSE on the last hidden states.
Each contender runs in a fresh process; throughput counts real input tokens per second.

    python bench/bench_train_step.py --device cpu
    python bench/bench_train_step.py --device cuda --dtype bfloat16 --model-size 1b   # random-weight Llama-3.2-1B shape
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import harness
from bench_shared_prefix import make_batch

CONTENDERS = ("mptkern", "peft")
T, W_KL, W_CE, W_MSE = 2.0, 1.0, 1.0, 1.0
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # the CSV's dtype names


def _peft_step(model, args, ids, mask, labels, task_ids):
    from peft import MultitaskPromptTuningConfig, get_peft_model

    d, device, dtype = model.config.hidden_size, ids.device, model.dtype
    teacher = (torch.randn(args.K, args.l, d) * 0.02).to(device, dtype)  # frozen teacher prompts
    embed = model.get_input_embeddings()
    cfg = MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.l, num_tasks=args.K, num_ranks=1,
                                      prompt_tuning_init="RANDOM", token_dim=d)
    student = get_peft_model(model, cfg)
    # positions of [prompt | input]; the state at p predicts token p + 1, so keep rows whose next token counts
    target = torch.cat([torch.full((args.B, args.l), -100, device=device), labels], 1)[:, 1:]
    valid = target != -100

    def step():
        with torch.no_grad():  # the bare base model with the teacher's prompts concatenated
            t_in = torch.cat([teacher[task_ids], embed(ids)], 1)
            t_mask = torch.cat([torch.ones(args.B, args.l, dtype=mask.dtype, device=device), mask], 1)
            t_out = model(inputs_embeds=t_in, attention_mask=t_mask, output_hidden_states=True)
        s_out = student(input_ids=ids, attention_mask=mask, task_ids=task_ids, output_hidden_states=True)
        z_s, z_t = s_out.logits[:, :-1][valid], t_out.logits[:, :-1][valid]
        h_s, h_t = s_out.hidden_states[-1][:, :-1][valid], t_out.hidden_states[-1][:, :-1][valid]
        kl = F.kl_div(F.log_softmax(z_s.float() / T, -1), F.log_softmax(z_t.float() / T, -1), log_target=True,
                      reduction="batchmean") * T**2
        loss = W_KL * kl + W_CE * F.cross_entropy(z_s.float(), target[valid]) + W_MSE * F.mse_loss(h_s, h_t)
        loss.backward()
        return loss

    return step, [p for p in student.parameters() if p.requires_grad]


def _mptkern_step(model, args, ids, mask, labels, task_ids):
    from mptkern.models import PromptedLM
    from mptkern.ops import fused_distill_loss
    from mptkern.prompts import MultitaskPrompt, TaskPrompts

    d, device, dtype = model.config.hidden_size, ids.device, model.dtype
    teacher = TaskPrompts(args.K, args.l, d).to(device, dtype).requires_grad_(False)
    student = MultitaskPrompt(args.K, args.l, d).to(device, dtype)
    t_lm, s_lm = PromptedLM(model, teacher), PromptedLM(model, student)
    valid = labels != -100

    def step():
        with torch.no_grad():
            t_out = t_lm(ids, mask, task_ids, return_logits=False)
        s_out = s_lm(ids, mask, task_ids, return_logits=False)
        loss = fused_distill_loss(s_out.predictor_hidden[valid], t_out.predictor_hidden[valid], model.lm_head.weight,
                                  labels[valid], temperature=T, kl_weight=W_KL, ce_weight=W_CE, hidden_weight=W_MSE)
        loss.backward()
        return loss

    return step, list(student.parameters())


def measure(args) -> dict:
    device = torch.device(args.device)
    model, _, _ = harness.load_model(args.model_size, device=device, dtype=getattr(torch, args.dtype))
    ids, mask, labels, task_ids = (t.to(device) for t in make_batch(args, model.config.vocab_size))
    build = _peft_step if args.only == "peft" else _mptkern_step
    step, params = build(model, args, ids, mask, labels, task_ids)
    box = []
    peak = harness.peak_memory(lambda: box.append(float(step())), device)
    ms = harness.time_fn(step, device=device, warmup=0, rep=1.0)
    return dict(ms=ms, peak_mb=None if peak is None else peak / 2**20, loss=box[0],
                trainable=sum(p.numel() for p in params), tokens=int(mask.sum()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--B", type=int, default=16)
    p.add_argument("--K", type=int, default=8)
    p.add_argument("--l", type=int, default=100)
    p.add_argument("--min-len", type=int, default=32)
    p.add_argument("--max-len", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", help="model and prompt dtype (torch name), e.g. bfloat16 on CUDA")
    p.add_argument("--model-size", choices=sorted(harness.MODEL_SIZES), default=None,
                   help="a random-weight Llama of this size (harness.MODEL_SIZES) instead of the embedded SmolLM2-135M")
    p.add_argument("--out", default=str(harness.ROOT / "bench" / "results" / "train_step.csv"))
    p.add_argument("--only", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.only:
        import json

        print(json.dumps(measure(args)))
        return 0
    results = harness.run_isolated(__file__, argv if argv is not None else sys.argv[1:], CONTENDERS)
    base = results["peft"]
    rows = [dict(op="distill_step", contender=name, mode="fwd+bwd", B=args.B, K=args.K, l=args.l, min_len=args.min_len,
                 max_len=args.max_len, dtype=SHORT.get(args.dtype, args.dtype), ms=round(r["ms"], 1), tokens_per_s=round(r["tokens"] / r["ms"] * 1e3, 1),
                 peak_mb=None if r["peak_mb"] is None else round(r["peak_mb"], 1), speedup_vs_peft=round(base["ms"] / r["ms"], 3),
                 peak_vs_peft=None if r["peak_mb"] is None else round(r["peak_mb"] / base["peak_mb"], 3),
                 trainable=r["trainable"]) for name, r in results.items()]
    harness.append_rows(args.out, rows, args.device)
    label = "SmolLM2-135M" if args.model_size is None else f"random Llama-{args.model_size}"
    print(f"distillation step, {label}, B={args.B} K={args.K} l={args.l}, lengths {args.min_len}-{args.max_len}, "
          f"{args.dtype} on {harness.device_name(args.device)}")
    for r in rows:
        print(f"{r['contender']:<8} {r['ms']:>10.1f} ms {r['tokens_per_s']:>8.1f} tok/s  peak {r['peak_mb']} MB  "
              f"x{r['speedup_vs_peft']} speed, x{r['peak_vs_peft']} memory vs peft")
    if not args.device.startswith("cuda"):
        print("CPU run: only the ratios measured side by side here count.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
