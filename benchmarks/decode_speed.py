"""Decoding: lmkit fp32 and int8 against Hugging Face ``generate``, batch decoding, int8's quality.

One run measures, side by side:

Speed (6 layers, 6 heads, width 384, vocab 65, block 1024: nanoGPT's shakespeare_char shape with a
longer context; random weights shared by both libraries through `lmkit.hf.to_transformers`; one
256-token prompt, 256 new tokens, greedy, ``torch.inference_mode()``):

- ``HF generate, cache``: ``GPT2LMHeadModel.generate(use_cache=True, do_sample=False)``, sdpa;
- ``lmkit fp32``: `lmkit.generate.generate(model, prompt, 256, greedy=True)` (KV cache preallocated
  and written in place, no mask at one query, no dropout calls in eval mode);
- ``lmkit int8``: the same model after `lmkit.lab.efficiency.quantize_int8` (what ``lmkit generate
  --int8`` does: PyTorch's dynamic int8 linear layers in the blocks);
- ``lmkit fp32 / int8, batch B``: B prompts of different lengths (256, 240, ...) decoded together,
  left-padded, 256 new tokens each; tokens/s counts every row;
- ``lmkit, no cache`` / ``HF generate, no cache``: only with ``--no-cache-rows`` (slow).

Rows are timed ``--repeats`` times round-robin (so machine noise hits all alike) after one untimed
warmup; the best time of each is reported. lmkit fp32 and HF must produce the same greedy tokens
(the script checks it). It also counts the operators each decoder dispatches per new token
(`efficiency.count_ops`): at these sizes a step's fixed cost is mostly its operator calls.

Quality of int8 (a trained model: ``--checkpoint DIR``, or else a 4-layer, width-128 GPT trained
here on Tiny Shakespeare characters for ``--train-steps``): validation loss and perplexity on
fixed windows (`efficiency.eval_loss`), the teacher-forced agreement of greedy tokens
(`efficiency.greedy_agreement`), and the free-running agreement of a 128-token greedy
continuation. Run::

    LMKIT_DATA=../shared/data .venv/bin/python benchmarks/decode_speed.py [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable

import torch

from lmkit.checkpoint.format import find_latest
from lmkit.checkpoint.single import load_checkpoint
from lmkit.config import ModelConfig, TrainConfig
from lmkit.generate import generate
from lmkit.hf import to_transformers
from lmkit.lab import efficiency
from lmkit.model import GPT, build_model
from lmkit.run import prepare_run
from lmkit.train import Trainer

SPEED_SHAPE = ModelConfig(vocab_size=65, block_size=1024, n_layer=6, n_head=6, d_model=384, dropout=0.0)


def trained_model(args: argparse.Namespace) -> tuple[torch.nn.Module, object, str]:
    """The model int8's quality is measured on, its validation tokens, and what it is."""
    if args.checkpoint:
        path = find_latest(args.checkpoint) or args.checkpoint
        info = load_checkpoint(path, verify=False)
        model = build_model(info.config("model", ModelConfig))
        load_checkpoint(path, model=model)
        corpus = info.config("train", TrainConfig).corpus
        run = prepare_run(model.config, TrainConfig(corpus=corpus, out_dir=tempfile.mkdtemp()),
                          tokenizer=info.load_tokenizer())
        return model.eval(), run.val_tokens, f"checkpoint {path}"
    cfg = ModelConfig(n_layer=4, n_head=4, d_model=128, block_size=256, dropout=0.0)
    with tempfile.TemporaryDirectory() as out:
        train = TrainConfig(corpus="tinyshakespeare", batch_size=8, max_steps=args.train_steps, lr=2e-3,
                            min_lr=2e-4, warmup_steps=30, eval_interval=0, log_interval=args.train_steps,
                            seed=args.seed, out_dir=out)
        run = prepare_run(cfg, train)
        t0 = time.perf_counter()
        Trainer(run.model, train, run.train_tokens, None, run.model_config, run.tokenizer).fit()
        seconds = time.perf_counter() - t0
    what = (f"4L/4H/128d GPT trained here for {args.train_steps} steps of 8 x 256 Tiny Shakespeare "
            f"characters ({seconds:.0f} s)")
    return run.model.eval(), run.val_tokens, what


def quality_rows(args: argparse.Namespace) -> None:
    model, val, what = trained_model(args)
    int8 = efficiency.quantize_int8(copy.deepcopy(model))
    T = min(model.config.block_size, 256)
    loss = {name: efficiency.eval_loss(m, val, T, args.eval_windows) for name, m in (("fp32", model),
                                                                                     ("int8", int8))}
    agree = efficiency.greedy_agreement(model, int8, val, T, args.eval_windows)
    prompt = [int(t) for t in val[: min(128, model.config.block_size // 2)]]
    new = min(128, model.config.block_size - len(prompt))
    a, b = (generate(m, [prompt], new, greedy=True)[0] for m in (model, int8))
    same = sum(x == y for x, y in zip(a, b, strict=True))
    prefix = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    n_tokens = min(args.eval_windows, (len(val) - 1) // T) * T
    print(f"\nint8 quality on the {what}:")
    print(f"  validation loss fp32 {loss['fp32']:.4f}, int8 {loss['int8']:.4f} nats/token "
          f"(perplexity {math.exp(loss['fp32']):.3f} -> {math.exp(loss['int8']):.3f}, "
          f"{100 * (math.exp(loss['int8'] - loss['fp32']) - 1):+.2f} %) over {n_tokens:,} tokens")
    print(f"  greedy next token equal to fp32's (teacher-forced): {100 * agree:.2f} % of {n_tokens:,} "
          "positions")
    print(f"  free-running greedy continuation of {new} tokens: {same}/{new} positions equal, identical for "
          f"the first {prefix}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    ap.add_argument("--new", type=int, default=256, help="new tokens")
    ap.add_argument("--batch", type=int, default=8, help="prompts of the batch-decoding rows")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per row (best is reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--no-cache-rows", action="store_true", help="also time lmkit and HF without a cache")
    ap.add_argument("--checkpoint", default=None, help="measure int8's quality on this lmkit checkpoint")
    ap.add_argument("--train-steps", type=int, default=300, help="steps of the quality model without one")
    ap.add_argument("--eval-windows", type=int, default=32, help="validation windows of 256 tokens")
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not efficiency.dynamic_quantization_available():
        raise SystemExit("this torch has no dynamic int8 quantization (torch.ao.quantization); nothing to "
                         "compare")
    warnings.filterwarnings("ignore", message=".*(deprecated|exceed block_size).*")
    load_before = os.getloadavg()

    torch.manual_seed(args.seed)
    ours = GPT(SPEED_SHAPE).eval()
    theirs = to_transformers(ours)
    int8 = efficiency.quantize_int8(copy.deepcopy(ours))
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, SPEED_SHAPE.vocab_size, (1, args.prompt), generator=gen)
    batch = [prompt[0, : args.prompt - 16 * i].tolist() for i in range(args.batch)]

    def hf_run(cache: bool) -> list[int]:
        with torch.inference_mode():
            out = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new,
                                  min_new_tokens=args.new, do_sample=False, use_cache=cache, pad_token_id=0)
        return out[0, args.prompt :].tolist()

    rows: dict[str, tuple[int, Callable[[], object]]] = {  # name -> (new tokens per call, call)
        "HF generate, cache": (args.new, lambda: hf_run(True)),
        "lmkit fp32": (args.new, lambda: generate(ours, prompt, args.new, greedy=True)[0]),
        "lmkit int8": (args.new, lambda: generate(int8, prompt, args.new, greedy=True)[0]),
        f"lmkit fp32, batch {args.batch}": (args.batch * args.new,
                                            lambda: generate(ours, batch, args.new, greedy=True)),
        f"lmkit int8, batch {args.batch}": (args.batch * args.new,
                                            lambda: generate(int8, batch, args.new, greedy=True)),
    }
    if args.no_cache_rows:
        rows["lmkit, no cache"] = (args.new, lambda: generate(ours, prompt, args.new, greedy=True,
                                                             use_cache=False)[0])
        rows["HF generate, no cache"] = (args.new, lambda: hf_run(False))

    outs = {name: run() for name, (_, run) in rows.items()}  # warmup, and the tokens to compare
    ref = outs["lmkit fp32"]
    assert outs["HF generate, cache"] == ref, "HF's greedy tokens differ from lmkit's on the same weights"
    if args.no_cache_rows:
        assert outs["lmkit, no cache"] == ref and outs["HF generate, no cache"] == ref
    best = {name: float("inf") for name in rows}
    for _ in range(args.repeats):
        for name, (_, run) in rows.items():
            t0 = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t0)
    load_after = os.getloadavg()

    tps = {name: rows[name][0] / best[name] for name in rows}
    hf = tps["HF generate, cache"]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {load_before[0]:.2f} "
          f"before / {load_after[0]:.2f} after; model 6L/6H/384d vocab 65 (random weights), prompt "
          f"{args.prompt} + {args.new} new tokens, greedy, best of {args.repeats}")
    print(f"{'decoder':<26}{'new tokens/s':>14}{'seconds':>9}{'/ HF generate':>15}{'/ lmkit fp32':>14}")
    for name in rows:
        print(f"{name:<26}{tps[name]:>14,.1f}{best[name]:>9.2f}{tps[name] / hf:>14.2f}x"
              f"{tps[name] / tps['lmkit fp32']:>13.2f}x")
    # the fixed cost of a step: operators dispatched per new token (a 32-token generation, prefill included)
    short = min(32, args.new)
    ops = {name: sum(efficiency.count_ops(call).values()) / short for name, call in (
        ("HF generate, cache", lambda: theirs.generate(prompt, attention_mask=torch.ones_like(prompt),
                                                       max_new_tokens=short, min_new_tokens=short,
                                                       do_sample=False, pad_token_id=0)),
        ("lmkit fp32", lambda: generate(ours, prompt, short, greedy=True)),
        ("lmkit int8", lambda: generate(int8, prompt, short, greedy=True)))}
    mid = args.prompt + args.new // 2
    step = efficiency.decode_step_ops(int8, mid)
    print("operator calls per new token (ATen and quantized kernels, counted under a TorchDispatchMode): "
          + ", ".join(f"{name} {n:.0f}" for name, n in ops.items())
          + f"; one int8 cached step at context {mid}: {sum(step.values())}, of which "
          f"{step['quantized.linear_dynamic']} int8 linears, {step['scaled_dot_product_attention']} SDPAs")
    int8_same = sum(a == b for a, b in zip(outs["lmkit int8"], ref, strict=True))
    print(f"lmkit fp32 and HF generate produced identical greedy tokens; int8 matched fp32 on {int8_same}/"
          f"{args.new} tokens (random weights: near-ties; see the trained model below)")
    print(f"goal lmkit int8 >= 3x HF generate at batch 1: {tps['lmkit int8'] / hf:.2f}x "
          f"({'met' if tps['lmkit int8'] >= 3 * hf else 'NOT met'})")
    quality_rows(args)


if __name__ == "__main__":
    main()
