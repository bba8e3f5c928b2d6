"""Time to a given loss on Tiny Shakespeare characters: transformers' GPT-2 and lmkit with
nanoGPT's recipe against lmkit's best recipe, in one run.

    LMKIT_DATA=../shared/data python benchmarks/time_to_loss.py [--steps 2000] [--threads 1] \
        [--layout-steps 100]

The model is nanoGPT's CPU "baby GPT" (4 layers, 4 heads, width 128, context 64, no biases, ~0.8M
parameters). Recipes:

(a) transformers' ``GPT2LMHeadModel`` (sdpa attention, ``gelu_pytorch_tanh``: lmkit's function)
    with the nanoGPT recipe: AdamW lr 1e-3, warmup 100, cosine to 1e-4, 2000 steps, batch 12,
    beta2 0.99, weight decay 0.1, clipping 1.0 - the reference;
(b) lmkit's GPT with the same recipe;
(c) lmkit's best recipe (`lmkit.lab.time_to_loss.best_recipe`: chapter 7's ablation).

All start from the same initial weights (``torch.manual_seed(seed); GPT(...)``, copied into the
transformers model), train on the same batches in the same order, with the same optimizer code
(`lmkit.optim.configure_optimizer`, or Muon + AdamW for (c)) and the same loop
(`lmkit.lab.time_to_loss.train_curves`), interleaved so that machine noise hits them alike. The
validation loss is measured on one fixed set of validation batches every ``--eval-every`` steps;
evaluation time is excluded from the wall times printed. The target is (a)'s final validation
loss; a recipe's time to it is interpolated linearly between the evaluations around the crossing.

Then (c) trains the way chapter 6 trains, through `lmkit.train.Trainer`: its first ``--layout-steps``
steps in one process, under dp2 and under tp2 (`lmkit.lab.time_to_loss.recipe_under_layouts`), and
the table gives each layout's largest relative loss difference from the single process beside its
wall time (``--layout-steps 0`` skips it).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

import torch

from lmkit.config import ParallelConfig
from lmkit.lab.time_to_loss import (
    best_recipe,
    fixed_batches,
    nanogpt_recipe,
    recipe_under_layouts,
    shakespeare_tokens,
    time_table,
    train_curves,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000, help="steps of the nanoGPT recipe")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--val-batches", type=int, default=50, help="fixed validation batches of 12 x 64")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, the same for every recipe")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--layout-steps", type=int, default=100,
                    help="steps of (c) under dp2 and tp2 against one process (0: skip)")
    args = ap.parse_args()
    if args.layout_steps < 0:
        print("time_to_loss: --layout-steps must be >= 0", file=sys.stderr)
        return 2
    for name in ("steps", "eval_every", "val_batches", "threads"):
        if getattr(args, name) <= 0:
            print(f"time_to_loss: --{name.replace('_', '-')} must be a positive integer", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)

    train_tokens, val_tokens, vocab = shakespeare_tokens()
    val = fixed_batches(val_tokens, args.val_batches, 12, 64, seed=args.seed + 1)
    lmkit_base = nanogpt_recipe(vocab, args.steps)
    recipes = [nanogpt_recipe(vocab, args.steps, hf=True), lmkit_base, best_recipe(lmkit_base)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), vocab {vocab}, "
          f"load average at start {os.getloadavg()[0]:.2f}; validation: {args.val_batches} fixed batches of "
          f"12 x 64, every {args.eval_every} steps (evaluation excluded from the times)", flush=True)
    curves = train_curves(recipes, train_tokens, val, args.eval_every, seed=args.seed)
    target = curves[0].final_loss
    print(f"\ntarget: (a)'s final validation loss {target:.5f}; load average at end {os.getloadavg()[0]:.2f}")
    print(f"{'recipe':<40}{'steps':>6}{'train s':>9}{'x (a)':>7}{'final loss':>12}{'s to target':>13}"
          f"{'step at target':>16}{'x (a)':>7}")
    rows = time_table(curves, target)
    for label, row in zip("abc", rows, strict=True):
        reached = math.isfinite(row["s_to_target"])
        to_target = (f"{row['s_to_target']:>13.1f}{row['step_to_target']:>16.0f}{row['x_reference']:>7.2f}"
                     if reached else f"{'not reached':>13} (ends {row['final_loss'] - target:+.5f} above)")
        print(f"({label}) {row['recipe']:<36}{row['steps']:>6}{row['train_s']:>9.1f}"
              f"{row['train_s'] / rows[0]['train_s']:>7.2f}{row['final_loss']:>12.5f}{to_target}")
    ratio = rows[2]["x_reference"]
    print(f"\n(c)/(a) wall time to the reference's final loss: {ratio:.2f}x (goal <= 0.6x: "
          f"{'met' if ratio <= 0.6 else 'not met'})")
    if args.layout_steps:
        layouts = [ParallelConfig(dp=2), ParallelConfig(tp=2)]
        print(f"\n(c) through lmkit.train.Trainer, {args.layout_steps} steps (Muon's Newton-Schulz in fp32), "
              f"load average {os.getloadavg()[0]:.2f}")
        print(f"{'layout':<10}{'final loss':>12}{'max rel diff':>14}{'wall s':>8}{'x 1 process':>13}")
        with tempfile.TemporaryDirectory() as out:
            table = recipe_under_layouts(recipes[2], layouts, args.layout_steps, out)
        for row in table:
            print(f"{row['layout']:<10}{row['final_loss']:>12.5f}{row['max_rel_diff']:>14.2e}{row['seconds']:>8.1f}"
                  f"{row['seconds'] / table[0]['seconds']:>13.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
