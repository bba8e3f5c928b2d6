"""GPU training throughput of GPT-2-small-sized models: tokens/s, MFU and peak memory.

Models (``--model``, default both): GPT-2 124M's shape (12 layers, 12 heads, width 768, context
1024, vocabulary 50,304 = 50,257 padded to a multiple of 128), and the Llama-style network of
the same width and depth (`lmkit.config.model_preset("llama")`: rotary positions, RMSNorm,
SwiGLU of width 2,048, 4 key/value heads for the 12 query heads, an untied head), dropout 0, on
random tokens (throughput does not depend on the text). The real `lmkit.train.Trainer` runs it
with bf16 autocast (TF32 for the remaining fp32 matmuls), fused AdamW, ``torch.compile`` on one
GPU unless ``--no-compile``; after ``--warmup`` untimed steps, ``--steps`` steps are timed
between two ``torch.cuda.synchronize()``.
MFU = tokens/s x ``GPT.flops_per_token()`` / (GPUs x dense bf16 peak of the device, looked up by
name in `lmkit.costs.PEAK_FLOPS`; an unknown device prints MFU "unknown").

With several GPUs the script also launches itself under torchrun (NCCL) over all N GPUs for dp N,
tensor parallel (the largest of 8/4/2 dividing the heads, key/value heads included, dp over the
rest), tensor + sequence parallel, pipeline parallel (1F1B, the largest of 8/4/2 dividing the 12
layers, dp over the rest) and context parallel (2 ranks, dp over the rest); the Llama-style model
also with Muon under dp N ZeRO-1 and under the tensor-parallel layout (Newton-Schulz on gathered
whole matrices, `lmkit.optim.Muon`). All with the same global batch; every row side by side (the
lmkit engine; torch.compile is single-process only). On a machine without CUDA it prints one
line saying so and exits with status 0 (nothing to measure is not an error). Run::

    .venv/bin/python benchmarks/gpu.py [--model gpt2|llama|both] [--steps 300] [--batch-size 16] \
        [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from lmkit.config import ModelConfig, ParallelConfig, TrainConfig, model_preset
from lmkit.model import GPT
from lmkit.train import Trainer

GPT2_SMALL = ModelConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, d_model=768, dropout=0.0)
LLAMA_SMALL = model_preset("llama", vocab_size=50304, block_size=1024, n_layer=12, n_head=12,
                           n_kv_head=4, d_model=768, dropout=0.0)
MODELS = {"gpt2": GPT2_SMALL, "llama": LLAMA_SMALL}
RESULT = "RESULT "  # prefix of the line a torchrun child reports on


def layouts(n_gpus: int, batch: int, c: ModelConfig = GPT2_SMALL) -> dict[str, tuple[ParallelConfig, str]]:
    """The multi-GPU runs over all `n_gpus` GPUs, ``name -> (layout, optimizer)``: pure dp, the largest
    tp (and pp) of 8, 4, 2 that the shape allows with dp over the rest, tp with sequence parallelism,
    cp2 with dp over the rest (those the global batch divides); a Llama-style model also with Muon."""
    out: dict[str, tuple[ParallelConfig, str]] = {}
    if n_gpus < 2:
        return out
    muon = c.mlp == "swiglu"  # the Llama-style model: today's recipe trains it with Muon too
    if batch % n_gpus == 0:
        out[f"dp{n_gpus}"] = (ParallelConfig(dp=n_gpus), "adamw")
        if muon:
            out[f"dp{n_gpus} zero1 muon"] = (ParallelConfig(dp=n_gpus, zero=1), "muon")
    tp = next((t for t in (8, 4, 2) if n_gpus % t == 0 and c.n_head % t == 0 and c.kv_heads % t == 0
               and c.vocab_size % t == 0 and c.ffn_width % t == 0), 0)
    if tp and batch % (n_gpus // tp) == 0:
        name = f"tp{tp}" + (f" dp{n_gpus // tp}" if tp < n_gpus else "")
        out[name] = (ParallelConfig(dp=n_gpus // tp, tp=tp), "adamw")
        out[name + " sp"] = (ParallelConfig(dp=n_gpus // tp, tp=tp, sequence_parallel=True), "adamw")
        if muon:
            out[name + " muon"] = (ParallelConfig(dp=n_gpus // tp, tp=tp), "muon")
    pp = next((p for p in (8, 4, 2) if n_gpus % p == 0 and c.n_layer % p == 0), 0)
    if pp and batch % (n_gpus // pp * 2 * pp) == 0:
        name = f"pp{pp}" + (f" dp{n_gpus // pp}" if pp < n_gpus else "") + f" 1f1b m{2 * pp}"
        out[name] = (ParallelConfig(dp=n_gpus // pp, pp=pp, microbatches=2 * pp, schedule="1f1b"), "adamw")
    if n_gpus % 2 == 0 and batch % (n_gpus // 2) == 0:
        name = "cp2" + (f" dp{n_gpus // 2}" if n_gpus > 2 else "")
        out[name] = (ParallelConfig(dp=n_gpus // 2, cp=2), "adamw")
    return out


def measure(args: argparse.Namespace, parallel: ParallelConfig | None, model_name: str = "gpt2",
            optimizer: str = "adamw") -> dict[str, object]:
    """Train `--warmup` + `--steps` steps of model `model_name` under `parallel` (None: one GPU);
    this rank's figures."""
    config = MODELS[model_name]
    topology = None
    if parallel is not None:
        from lmkit.parallel.mesh import init_topology

        topology = init_topology(parallel, "cuda")
    torch.manual_seed(args.seed)
    with torch.device("meta"):  # shapes only: the trainer draws this rank's weights on its GPU
        model = GPT(config)
    tokens = np.random.default_rng(args.seed).integers(0, config.vocab_size, 4_000_000).astype(np.uint16)
    cfg = TrainConfig(batch_size=args.batch_size, max_steps=args.warmup + args.steps, lr=6e-4, min_lr=6e-5,
                      warmup_steps=10, eval_interval=0, log_interval=10**9, dtype="bfloat16", device="cuda",
                      compile=args.compile and parallel is None, out_dir=args.out_dir, seed=args.seed,
                      optimizer=optimizer)
    trainer = Trainer(model, cfg, tokens, model_config=config, parallel=parallel, topology=topology)
    for _ in range(args.warmup):
        trainer.train_step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = trainer.train_step()["loss"]
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens_per_s = args.steps * args.batch_size * config.block_size / seconds
    peak = torch.cuda.max_memory_allocated()
    if topology is not None:  # the largest rank's memory
        import torch.distributed as dist

        t = torch.tensor([peak], dtype=torch.int64, device=trainer.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        peak = int(t.item())
    return {"gpus": 1 if parallel is None else parallel.world_size, "tokens_per_s": tokens_per_s,
            "mfu": trainer.mfu(tokens_per_s), "peak_gib": peak / 2**30, "loss": loss,
            "ms_per_step": 1000 * seconds / args.steps, "tf32": trainer.tf32,
            "rank": 0 if topology is None else topology.rank}


def run_layout(args: argparse.Namespace, model_name: str, name: str, n_gpus: int) -> dict[str, object]:
    """This script under torchrun for one layout; rank 0's RESULT line."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_gpus}",
           __file__, "--model", model_name, "--layout", name, "--steps", str(args.steps),
           "--warmup", str(args.warmup),
           "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--out-dir", args.out_dir]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail[:200]}"}
    return json.loads(lines[-1][len(RESULT):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps first (compilation, allocator)")
    ap.add_argument("--batch-size", type=int, default=16, help="global batch, sequences of 1024 tokens")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    ap.add_argument("--model", choices=("gpt2", "llama", "both"), default="both",
                    help="GPT-2 124M's network, the Llama-style one of the same size, or both")
    ap.add_argument("--layout", default=None, help=argparse.SUPPRESS)  # set for the torchrun children
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per multi-GPU layout")
    ap.add_argument("--out-dir", default="runs/gpu_benchmark")
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(f"benchmarks/gpu.py: no CUDA GPU on this machine (torch {torch.__version__}); nothing measured")
        return 0
    if args.layout is not None:  # a torchrun child
        n = int(os.environ.get("WORLD_SIZE", "1"))
        if args.model == "both":
            print("benchmarks/gpu.py: a --layout child needs --model gpt2 or llama", file=sys.stderr)
            return 2
        parallel, optimizer = layouts(n, args.batch_size, MODELS[args.model])[args.layout]
        result = measure(args, parallel, args.model, optimizer)
        if result["rank"] == 0:
            print(RESULT + json.dumps(result), flush=True)
        import torch.distributed as dist

        dist.destroy_process_group()
        return 0

    n_gpus = torch.cuda.device_count()
    name = torch.cuda.get_device_name(0)
    print(f"{name} x {n_gpus}, torch {torch.__version__}, bf16 autocast, fused AdamW, global batch "
          f"{args.batch_size} x 1024 tokens, {args.steps} timed steps after {args.warmup}", flush=True)
    for model_name in ("gpt2", "llama") if args.model == "both" else (args.model,):
        config = MODELS[model_name]
        results = {"1 GPU" + (", compiled" if args.compile else ""): measure(args, None, model_name)}
        for layout in layouts(n_gpus, args.batch_size, config):
            results[layout] = run_layout(args, model_name, layout, n_gpus)
        print(f"\n{model_name}: {config.n_layer}L/{config.d_model}d, {config.n_head} heads "
              f"({config.kv_heads} key/value), MLP {config.mlp} {config.ffn_width}, "
              f"context {config.block_size}")
        base = next(iter(results.values()))["tokens_per_s"]
        print(f"{'layout':<22}{'GPUs':>5}{'tokens/s':>12}{'/ 1 GPU':>9}{'ms/step':>9}{'MFU':>8}"
              f"{'peak GiB':>10}")
        for layout, r in results.items():
            if "error" in r:
                print(f"{layout:<22} failed: {r['error']}")
                continue
            mfu = "unknown" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
            print(f"{layout:<22}{r['gpus']:>5}{r['tokens_per_s']:>12,.0f}{r['tokens_per_s'] / base:>8.2f}x"
                  f"{r['ms_per_step']:>9.1f}{mfu:>8}{r['peak_gib']:>10.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
