"""Training throughput: lmkit's GPT vs Hugging Face's GPT2LMHeadModel, same weights, same batches.

Config: nanoGPT's CPU "shakespeare_char" settings (n_layer 4, n_head 4, d_model 128, block 64,
batch 12, vocab 65, dropout 0), fp32. One step = forward + cross-entropy + backward + AdamW
(the same optimizer, fused on CPU, for every model).

Two HF rows:
- ``HF sdpa, gelu_pytorch_tanh``: HF at its fastest settings that compute exactly lmkit's
  function (``attn_implementation="sdpa"``, the tanh GELU as one ATen kernel). The fair row.
- ``HF sdpa, gelu_new``: GPT-2's own activation setting, which HF implements as several
  elementwise ops. What a user who builds a GPT-2 from HF's defaults gets.
HF's loss is computed with the same ``F.cross_entropy`` call on the same targets as lmkit's, and
the first-step losses are printed to show the models compute the same thing.

The models are timed in alternating chunks (lmkit chunk, HF chunk, ..., repeat) so that machine
noise hits all of them alike; warmup steps are excluded. Run::

    .venv/bin/python benchmarks/train_speed.py [--iters 100] [--warmup 10] [--threads N]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lmkit.config import ModelConfig
from lmkit.hf import gpt2_state_dict_to_hf
from lmkit.model import GPT


def hf_twin(model: GPT, activation: str) -> torch.nn.Module:
    """A GPT2LMHeadModel with `model`'s shape and weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hc = GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.d_model, n_layer=c.n_layer,
        n_head=c.n_head, activation_function=activation, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=0, attn_implementation="sdpa",
    )
    hf = GPT2LMHeadModel(hc)
    assert hf.config._attn_implementation == "sdpa"
    hf.load_state_dict(gpt2_state_dict_to_hf(model.state_dict()))
    return hf


def make_step(model: torch.nn.Module, hf: bool) -> Callable[[torch.Tensor, torch.Tensor], float]:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        if hf:
            logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        else:
            _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=100, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps per model")
    ap.add_argument("--chunk", type=int, default=10, help="steps per alternating chunk")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = ModelConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, d_model=128, dropout=0.0)
    torch.manual_seed(args.seed)
    ours = GPT(cfg)
    models = {
        "lmkit GPT": (ours, False),
        "HF sdpa, gelu_pytorch_tanh": (hf_twin(ours, "gelu_pytorch_tanh"), True),
        "HF sdpa, gelu_new": (hf_twin(ours, "gelu_new"), True),
    }
    steps = {name: make_step(m, hf) for name, (m, hf) in models.items()}
    g = torch.Generator().manual_seed(args.seed)
    n = args.warmup + args.iters
    data = torch.randint(0, cfg.vocab_size, (n, args.batch, cfg.block_size + 1), generator=g)
    batches = [(d[:, :-1].contiguous(), d[:, 1:].contiguous()) for d in data]

    first = {k: s(*batches[0]) for k, s in steps.items()}  # same weights, same batch: same loss
    for i in range(1, args.warmup):
        for s in steps.values():
            s(*batches[i])
    elapsed = {k: 0.0 for k in steps}
    for lo in range(args.warmup, n, args.chunk):
        chunk = batches[lo : min(n, lo + args.chunk)]
        for name, s in steps.items():
            t0 = time.perf_counter()
            for x, y in chunk:
                s(x, y)
            elapsed[name] += time.perf_counter() - t0

    tokens = args.iters * args.batch * cfg.block_size
    tps = {k: tokens / v for k, v in elapsed.items()}
    base = tps["lmkit GPT"]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.iters} steps "
          f"(+{args.warmup} warmup) per model, batch {args.batch} x {cfg.block_size} tokens, fp32, "
          "fused AdamW")
    print(f"{'model':<30}{'tokens/s':>10}{'ms/step':>9}{'lmkit/this':>12}{'step-1 loss':>13}")
    for name in steps:
        print(f"{name:<30}{tps[name]:>10,.0f}{1000 * elapsed[name] / args.iters:>9.2f}"
              f"{base / tps[name]:>11.2f}x{first[name]:>13.6f}")


if __name__ == "__main__":
    main()
