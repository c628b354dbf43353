"""Research-code entry point: the MPT recipe on the synthetic clinical suite, configured in Python.

    python python/train_synthetic.py --output-dir runs/synthetic --prompt-len 16 --shots 0 5 10
"""

import argparse

from mptkern.train import DataConfig, MPTTrainer, StageConfig, TargetConfig, TrainConfig


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", default="runs/synthetic")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--steps", type=int, default=100, help="steps of the teacher and distillation stages")
    p.add_argument("--shots", type=int, nargs="+", default=[0, 5, 10])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    config = TrainConfig(
        output_dir=args.output_dir, prompt_len=args.prompt_len, data=DataConfig(n_train=128, n_eval=32),
        teachers=StageConfig(steps=args.steps, batch_size=16), distill=StageConfig(steps=args.steps, batch_size=16),
        target=StageConfig(steps=30, batch_size=4), target_init=TargetConfig(shots=args.shots, seeds=args.seeds),
    )
    trainer = MPTTrainer(config)
    teachers = trainer.train_teachers()          # stage 1: one prompt per source task
    student = trainer.distill(teachers)          # stage 2: the shared decomposed prompt
    student.save(f"{args.output_dir}/student.safetensors")
    results = trainer.adapt_targets(student)     # stage 3: k-shot targets and baselines
    print(MPTTrainer.format_results(results))


if __name__ == "__main__":
    main()
