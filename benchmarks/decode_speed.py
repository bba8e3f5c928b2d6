"""Decoding throughput: lmkit with and without its KV cache vs Hugging Face ``generate``.

Model: 6 layers, 6 heads, width 384, vocab 65, block 1024 (nanoGPT's shakespeare_char shape with
a longer context), random weights shared by both libraries (mapped with
`lmkit.model.gpt2_state_dict_to_hf`). Task: one 256-token prompt, 256 new tokens, greedy, fp32,
``torch.inference_mode()``. Rows:

- lmkit, KV cache: `lmkit.generate.generate(..., greedy=True)` (preallocated cache, one position
  per step);
- lmkit, no cache: the same call with ``use_cache=False`` (recomputes the whole context each step);
- HF generate, cache: ``model.generate(use_cache=True, do_sample=False)`` with ``sdpa`` attention;
- HF generate, no cache (``--hf-no-cache``; slow, off by default).

The greedy token sequences of all rows must be identical; the script checks it. Each row is
timed ``--repeats`` times in round-robin order (so machine noise hits all rows alike) after one
untimed warmup run; the best time of each is reported (the least-disturbed run). Run::

    .venv/bin/python benchmarks/decode_speed.py [--prompt 256] [--new 256] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from lmkit.config import ModelConfig
from lmkit.generate import generate
from lmkit.model import GPT, gpt2_state_dict_to_hf


def hf_twin(model: GPT) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hc = GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.d_model, n_layer=c.n_layer,
        n_head=c.n_head, activation_function="gelu_pytorch_tanh", resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        attn_implementation="sdpa",
    )
    hf = GPT2LMHeadModel(hc).eval()
    hf.load_state_dict(gpt2_state_dict_to_hf(model.state_dict()))
    return hf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    ap.add_argument("--new", type=int, default=256, help="new tokens")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row (best is reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--hf-no-cache", action="store_true", help="also time HF generate with use_cache=False")
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = ModelConfig(vocab_size=65, block_size=1024, n_layer=6, n_head=6, d_model=384, dropout=0.0)
    torch.manual_seed(args.seed)
    ours = GPT(cfg).eval()
    theirs = hf_twin(ours)
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=gen)

    def hf_run(cache: bool) -> list[int]:
        with torch.inference_mode():
            out = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new,
                                  min_new_tokens=args.new, do_sample=False, use_cache=cache)
        return out[0, args.prompt :].tolist()

    rows: dict[str, Callable[[], list[int]]] = {
        "lmkit, KV cache": lambda: generate(ours, prompt, args.new, greedy=True)[0],
        "lmkit, no cache": lambda: generate(ours, prompt, args.new, greedy=True, use_cache=False)[0],
        "HF generate, cache": lambda: hf_run(True),
    }
    if args.hf_no_cache:
        rows["HF generate, no cache"] = lambda: hf_run(False)

    # warmup; also proves every row produces the same greedy tokens
    outs = {name: run() for name, run in rows.items()}
    ref = outs["lmkit, KV cache"]
    for name, out in outs.items():
        same = sum(a == b for a, b in zip(out, ref, strict=True))
        assert same == len(ref), f"{name}: only {same}/{len(ref)} tokens equal lmkit's cached decode"
    best = {name: float("inf") for name in rows}
    for _ in range(args.repeats):
        for name, run in rows.items():
            t0 = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t0)

    tps = {k: args.new / v for k, v in best.items()}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, model 6L/6H/384d vocab 65, "
          f"prompt {args.prompt} + {args.new} new tokens, greedy, fp32, batch 1, best of {args.repeats}")
    print(f"{'decoder':<24}{'new tokens/s':>14}{'seconds':>9}{'lmkit cache / this':>20}")
    for name in rows:
        print(f"{name:<24}{tps[name]:>14,.1f}{best[name]:>9.2f}{tps['lmkit, KV cache'] / tps[name]:>19.2f}x")
    print("all rows produced identical greedy tokens")


if __name__ == "__main__":
    main()
