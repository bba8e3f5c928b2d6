"""nanoGPT's CPU "baby GPT" on Tiny Shakespeare, characters, with lmkit's trainer.

    LMKIT_DATA=../shared/data python benchmarks/shakespeare_char.py

Configuration (nanoGPT's published CPU run of config/train_shakespeare_char.py): 4 layers, 4
heads, width 128, context 64, batch 12, 2000 iterations, dropout 0, no biases, AdamW lr 1e-3
with 100 warmup steps and cosine decay to 1e-4, beta2 0.99, weight decay 0.1, clipping 1.0.
nanoGPT reports a validation loss of 1.88 for it. This script prints the validation loss every
250 iterations (20 batches, like nanoGPT's eval_iters), the final validation loss averaged over
200 batches, and the wall time.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from lmkit.config import ModelConfig, TrainConfig
from lmkit.run import prepare_run
from lmkit.train import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--final-eval-batches", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()

    model_cfg = ModelConfig(n_layer=4, n_head=4, d_model=128, block_size=64, dropout=0.0, bias=False)
    with tempfile.TemporaryDirectory() as out_dir:
        train_cfg = TrainConfig(corpus="tinyshakespeare", tokenizer="char", batch_size=12,
                                max_steps=args.iters,
                                lr=1e-3, min_lr=1e-4, warmup_steps=100, beta2=0.99, weight_decay=0.1,
                                grad_clip=1.0, eval_interval=250, eval_iters=20, log_interval=250,
                                seed=args.seed, device=args.device, num_threads=args.threads, out_dir=out_dir)
        run = prepare_run(model_cfg, train_cfg)
        trainer = Trainer(run.model, train_cfg, run.train_tokens, run.val_tokens,
                          model_config=run.model_config, tokenizer=run.tokenizer)
        n_params = sum(p.numel() for p in run.model.parameters())
        print(f"lmkit GPT: {n_params / 1e6:.2f} M parameters, vocab {run.tokenizer.vocab_size}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {trainer.device}")

        def show(event: dict) -> None:
            if event["kind"] == "eval":
                print(f"iter {event['step']:5d}: val loss {event['val_loss']:.4f}", flush=True)
            else:
                print(f"iter {event['step']:5d}: train loss {event['loss']:.4f}, "
                      f"{event['tokens_per_s']:,.0f} tokens/s", flush=True)

        trainer.callbacks.append(show)
        start = time.perf_counter()
        trainer.fit()
        train_s = time.perf_counter() - start
        final = trainer.evaluate(args.final_eval_batches)
        wall = time.perf_counter() - start
    print(f"final validation loss ({args.final_eval_batches} batches): {final['val_loss']:.4f} "
          f"(nanoGPT publishes 1.88)")
    print(f"wall time: {wall:.0f} s ({train_s:.0f} s training, {args.iters} iterations)")


if __name__ == "__main__":
    main()
