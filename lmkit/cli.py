"""The ``lmkit`` command: train, eval, generate, estimate, export, over the functions the notebooks use.

Options come from four places, later ones winning: the dataclass defaults (`lmkit.config`), a
model preset (``--preset llama``), a TOML file given with ``--config`` (sections ``[model]``,
``[train]``, ``[parallel]``) and the flags, one per config field (``--n-layer 4 --lr 3e-4``;
`lmkit.options`). Every option's
``--help`` line says its default. A bad argument or config exits with status 2 and one line saying
what is wrong, no traceback; a warning is one line, ``lmkit: warning: ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmkit import costs
from lmkit.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
from lmkit.options import (
    SECTIONS,
    HelpFormatter,
    Parser,
    UsageError,
    add_config_flags,
    one_line_warnings,
    resolve_configs,
)

__all__ = ["main", "build_parser"]

DESCRIPTION = """\
lmkit: train a GPT on one process or every rank of a torchrun launch, then evaluate it, generate
text with it and export its checkpoints; estimate what a parallel layout of any model costs
before launching it. Each command's --help lists its options and their defaults."""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lmkit", description=DESCRIPTION,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")

    train = sub.add_parser("train", help="train a model (also on every rank of torchrun -m lmkit train)",
                           formatter_class=HelpFormatter,
                           description="Train a model on one process, or on every rank of a torchrun launch.")
    train.add_argument("--config", type=str, default=None, metavar="TOML",
                       help="file with [model], [train] and [parallel] sections (default: no file, the "
                            "defaults and the flags only)")
    train.add_argument("--resume", type=str, default=None, metavar="{auto,DIR}",
                       help="checkpoint or run directory to continue; auto = the latest in --out-dir, "
                            "or a fresh start when it has none (default: start from step 0)")
    train.add_argument("--allow-schedule-change", action="store_true",
                       help="resume although --max-steps, --lr, --min-lr or --warmup-steps differ from the "
                            "checkpoint's (the schedule continues from the current step; default: refuse)")
    for section, cls in SECTIONS.items():
        add_config_flags(train, section, cls)

    ev = sub.add_parser("eval", help="validation loss and perplexity of a checkpoint",
                        formatter_class=HelpFormatter,
                        description="Validation loss and perplexity of a checkpoint on a corpus.")
    ev.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    ev.add_argument("--corpus", default=None,
                    help="corpus to evaluate on (default: the one the checkpoint was trained on)")
    ev.add_argument("--iters", type=int, default=200, help="validation batches to average")
    ev.add_argument("--batch-size", type=int, default=None,
                    help="sequences per batch (default: the checkpoint's training batch size)")
    ev.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    ev.add_argument("--json", action="store_true", help="print the result as JSON")

    gen = sub.add_parser("generate", help="continue prompts with a trained checkpoint",
                         formatter_class=HelpFormatter,
                         description="Continue one or more prompts with a checkpoint, or with a transformers "
                                     "GPT-2, Llama or Qwen3 directory.")
    gen.add_argument("checkpoint", nargs="?", default=None,
                     help="checkpoint directory, or a run directory (its latest checkpoint); or give "
                          "--hf-dir")
    gen.add_argument("--hf-dir", default=None, metavar="DIR",
                     help="generate with a transformers directory of GPT2LMHeadModel, LlamaForCausalLM or "
                          "Qwen3ForCausalLM (lmkit export --hf-dir, or save_pretrained) instead of a "
                          "checkpoint")
    gen.add_argument("--prompt", action="append", required=True,
                     help="prompt text (repeat for a batch: decoded together, left-padded)")
    gen.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate per prompt")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy")
    gen.add_argument("--top-k", type=int, default=None,
                     help="sample among the k most likely tokens (default: among all tokens)")
    gen.add_argument("--top-p", type=float, default=None,
                     help="nucleus sampling: among the most likely tokens whose probabilities add up to p, "
                          "in (0, 1] (default: among all tokens)")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    gen.add_argument("--greedy", action="store_true", help="always take the most likely token")
    gen.add_argument("--stop", action="append", default=None,
                     help="stop at this string (repeatable; default: at the end-of-text token or after "
                          "--max-new-tokens)")
    gen.add_argument("--seed", type=int, default=None,
                     help="seed for reproducible sampling (default: a different sample every run)")
    gen.add_argument("--no-cache", action="store_true", help="decode without the KV cache")
    gen.add_argument("--int8", action="store_true",
                     help="int8 weights in the blocks' linear layers (PyTorch dynamic quantization, CPU; "
                          "chapter 7): about 4x smaller weights, faster decoding")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated (1 prompt)")
    gen.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")

    est = sub.add_parser("estimate", help="rank the parallel layouts of a model on a cluster (chapter 5)",
                         formatter_class=HelpFormatter,
                         description="Memory per device, communication, bubble and an estimated step time "
                                     "for every dp x cp x tp x pp layout that fits; the cost model of "
                                     "chapter 5 (lmkit.costs).")
    est.add_argument("--preset", choices=list(costs.PRESETS), default=None,
                     help="a model of lmkit.costs.PRESETS: " + ", ".join(
                         f"{k} ({m.name})" for k, m in costs.PRESETS.items())
                     + " (default: none; give the model's shape instead: --n-layer, --d-model, --n-head, "
                       "--vocab-size, --seq-len, optionally --n-kv-head, --mlp, --d-ff and the experts' "
                       "flags; --seq-len also changes a preset's sequence length)")
    for flag, what in (("n-layer", "layers"), ("d-model", "width"), ("n-head", "attention heads"),
                       ("vocab-size", "vocabulary size"), ("seq-len", "sequence length")):
        est.add_argument(f"--{flag}", type=int, default=None,
                         help=f"the model's {what} (instead of --preset)")
    est.add_argument("--n-kv-head", type=int, default=None,
                     help="key/value heads: grouped-query attention when fewer than --n-head (default: as "
                          "many as --n-head; with the shape flags)")
    est.add_argument("--mlp", choices=costs.MLP_CHOICES, default=None,
                     help="the MLP: plain (4 d, GELU) or swiglu (gated) (default: plain; with the shape "
                          "flags)")
    est.add_argument("--d-ff", type=int, default=None,
                     help="hidden width of the MLP (default: 4 d plain, 8/3 d rounded up to 32 swiglu; with "
                          "the shape flags)")
    for flag, what in (("n-experts", "routed experts of a mixture-of-experts MLP (default 0: dense)"),
                       ("moe-top-k", "experts per token (default 2)"),
                       ("moe-every", "experts in every k-th block (default 1)"),
                       ("moe-d-ff", "hidden width of one expert (default: the MLP's)"),
                       ("n-shared-experts", "shared experts every token passes (default 0)")):
        est.add_argument(f"--{flag}", type=int, default=None, help=f"{what}; with the shape flags")
    est.add_argument("--imbalance", type=float, default=1.0, help="load-imbalance factor of the experts' "
                     "all-to-alls: a rank's rows sent and received over their uniform expectation")
    est.add_argument("--devices", type=int, required=True, help="number of devices (GPUs)")
    est.add_argument("--device", choices=sorted(costs.DEVICES), default="h100",
                     help="device preset: memory, dense bf16 peak FLOP/s, link bandwidths")
    est.add_argument("--device-memory-gb", type=float, default=None,
                     help="memory per device in GB (default: the --device preset's)")
    est.add_argument("--peak-tflops", type=float, default=None,
                     help="dense peak TFLOP/s per device (default: the --device preset's)")
    est.add_argument("--devices-per-node", type=int, default=8, help="devices per node")
    est.add_argument("--intra-node-gbps", type=float, default=None,
                     help="GB/s per device inside a node (default: the --device preset's)")
    est.add_argument("--inter-node-gbps", type=float, default=None,
                     help="GB/s per device between nodes (default: the --device preset's)")
    est.add_argument("--global-batch", type=int, required=True, help="sequences per optimizer step")
    est.add_argument("--precision", choices=costs.PRECISIONS, default="mixed",
                     help="mixed (bf16 weights and activations, fp32 master weights) or fp32")
    est.add_argument("--reduce-dtype", choices=costs.REDUCE_DTYPES, default="fp32", help="dtype of the "
                     "gradients under mixed precision, accumulated and reduced over dp: fp32 or bf16 (half)")
    est.add_argument("--efficiency", type=float, default=0.5, help="fraction of peak the compute reaches")
    est.add_argument("--zero", type=int, nargs="+", default=[0, 1, 2, 3],
                     help="ZeRO stages to consider (default: 0 1 2 3)")
    est.add_argument("--tp", type=int, default=None,
                     help="only layouts with this tensor-parallel size (default: any)")
    est.add_argument("--pp", type=int, default=None,
                     help="only layouts with this pipeline-parallel size (default: any)")
    est.add_argument("--ep", type=int, default=None,
                     help="only layouts with this expert-parallel size (default: any dividing dp x cp and "
                          "the experts)")
    est.add_argument("--top", type=int, default=10, help="rows to print")
    est.add_argument("--json", action="store_true", help="print the rows as JSON")
    exp = sub.add_parser("export", help="a checkpoint as one safetensors directory (generate, transformers)",
                         formatter_class=HelpFormatter,
                         description="Read every shard of a sharded checkpoint (any layout) in this process "
                                     "and write the single-directory checkpoint: model.safetensors, "
                                     "state.pt, tokenizer.json, meta.json; or, with --hf-dir, a transformers "
                                     "directory (config.json, model.safetensors, the tokenizer): "
                                     "GPT2LMHeadModel for GPT-2's network, LlamaForCausalLM for the "
                                     "Llama-style one (--preset llama), Qwen3ForCausalLM for it with "
                                     "--qk-norm.")
    exp.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    exp.add_argument("out", nargs="?", default=None,
                     help="directory to write: a new one, or a checkpoint to replace (or give --hf-dir)")
    exp.add_argument("--hf-dir", default=None, metavar="DIR",
                     help="write a transformers directory instead (from_pretrained of GPT2LMHeadModel, "
                          "LlamaForCausalLM or Qwen3ForCausalLM loads it, by the model's network; lmkit's "
                          "tokenizer beside it)")
    return parser


# --------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    """Train on one process, or on one rank of a torchrun launch (``--dp/--cp/--tp/--pp`` > 1)."""
    from lmkit.parallel.engine import validate_layout
    from lmkit.run import prepare_run

    model_cfg, train_cfg, parallel_cfg = resolve_configs(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    parallel_cfg.validate(world_size=world)  # before any work: a wrong launch fails on every rank at once
    check_out_dir(train_cfg.out_dir)  # before the corpus, the model and the first step
    if args.resume not in (None, "auto") and not Path(args.resume).exists():
        raise UsageError(f"lmkit train: --resume {args.resume} does not exist; pass a run directory (its "
                         "latest checkpoint is used) or one of its step_* directories, or --resume auto")
    layout = parallel_cfg if parallel_cfg.world_size > 1 else None
    run = prepare_run(model_cfg, train_cfg, meta=layout is not None)  # a rank allocates only its part
    topology = None
    if layout is not None:
        mc = run.model_config
        validate_layout(parallel_cfg, train_cfg, mc.n_layer, mc.n_head, mc.vocab_size, mc.block_size, world,
                        mc.dropout, mc.kv_heads, mc.ffn_width, experts=mc)
        if mc.arch != "gpt":
            raise ConfigError("parallel layouts need model.arch='gpt' (the LSTM baseline is single-process)")
        from lmkit.parallel.mesh import init_topology

        topology = init_topology(parallel_cfg, train_cfg.device, timeout_s=train_cfg.timeout)
    try:
        return _train(args, run, train_cfg, parallel_cfg, layout, topology, world)
    except RuntimeError as e:
        if topology is None or not _is_peer_failure(e):
            raise
        raise PeerError(
            f"rank {topology.rank}: a collective failed ({_first_line(e)}): another rank died, or hung "
            f"past --timeout {train_cfg.timeout:g} s; see that rank's log, then restart with --resume auto "
            "(torchrun --max-restarts does it)") from e


def _train(args: argparse.Namespace, run: Any, train_cfg: TrainConfig, parallel_cfg: ParallelConfig,
           layout: ParallelConfig | None, topology: Any, world: int) -> int:
    """The part of `cmd_train` after the set-up: build the trainer, resume, fit, save."""
    from lmkit.checkpoint.format import find_latest
    from lmkit.train import Trainer

    n_params = sum(p.numel() for p in run.model.parameters())
    trainer = Trainer(run.model, train_cfg, run.train_tokens, run.val_tokens, model_config=run.model_config,
                      tokenizer=run.tokenizer, parallel=layout, topology=topology)
    run.model = None  # the trainer holds what this rank needs
    talk = trainer.is_logging_rank
    if args.resume == "auto" and find_latest(train_cfg.out_dir) is None:
        if talk:  # the command that starts a run also restarts it (torchrun --max-restarts, requeues)
            print(f"no checkpoint in {train_cfg.out_dir} yet: starting from step 0", flush=True)
    elif args.resume:
        source = train_cfg.out_dir if args.resume == "auto" else args.resume
        info = trainer.resume(source, allow_schedule_change=args.allow_schedule_change)
        if talk:
            print(f"resumed from {info.directory} at step {info.step}", flush=True)
    if talk:
        cp = f" cp={parallel_cfg.cp}" if parallel_cfg.cp > 1 else ""
        where = (f"dp={parallel_cfg.dp}{cp} tp={parallel_cfg.tp} pp={parallel_cfg.pp} over {world} processes"
                 if layout else "1 process")
        print(f"model: {run.model_config.arch}, {n_params:,} parameters | corpus {train_cfg.corpus}: "
              f"{len(run.train_tokens):,} train / {len(run.val_tokens):,} val tokens "
              f"({train_cfg.tokenizer} tokenizer, vocab {run.tokenizer.vocab_size}) | {where} on "
              f"{trainer.device}",
              flush=True)
    trainer.callbacks.append(_print_event)
    trainer.fit()
    path = trainer.save()
    if talk:
        print(f"saved {path}", flush=True)
    if topology is not None:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


class PeerError(Exception):
    """Another rank of a parallel run died or hung: one line, exit status 1."""


def _is_peer_failure(error: BaseException) -> bool:
    """A gloo / NCCL error raised because a peer rank vanished or a collective timed out."""
    import torch.distributed as dist

    if isinstance(error, dist.DistError):
        return True
    # gloo words it "Timed out waiting ..." in a collective, "Application timeout caused pair closure"
    # when the wait began before the timeout was set off by a peer that never arrived.
    pattern = r"gloo|NCCL|[Tt]imed out|[Tt]imeout caused pair closure|Connection (closed|reset|refused)"
    return re.search(pattern, str(error)) is not None


def _first_line(error: BaseException) -> str:
    line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    line = re.sub(r"^\[[^\]]*\] ", "", line)  # drop gloo's "[/path/to/file.cc:78] "
    return line.split(". ")[0][:160]


def check_out_dir(out_dir: str | Path) -> None:
    """Refuse (one line) an out-dir that cannot hold a run, before any work; changes nothing on disk.

    The nearest existing ancestor must be a directory in which this process can create files
    (probed with a temporary file or directory, removed at once; root ignores permission bits).
    """
    import tempfile

    path = Path(out_dir)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"lmkit train: --out-dir {path}: {existing} is a file, not a directory; choose "
                         "another --out-dir")
    try:
        if existing == path:
            fd, probe = tempfile.mkstemp(prefix=".lmkit-probe-", dir=path)
            os.close(fd)
            os.unlink(probe)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".lmkit-probe-", dir=existing))
    except OSError as e:
        raise UsageError(f"lmkit train: --out-dir {path} is not writable ({e.strerror} in {existing}); "
                         "choose a directory you can write, or fix its permissions") from e


def _print_event(event: dict[str, Any]) -> None:
    if event["kind"] == "skip":
        print(f"step {event['step']:>6} | skipped: {event['problem']} ({event['skipped_steps']} skipped so "
              "far; the weights are unchanged)", flush=True)
    elif event["kind"] == "eval":
        print(f"step {event['step']:>6} | val loss {event['val_loss']:.4f} | val ppl {event['val_ppl']:.2f}",
              flush=True)
    else:
        mfu = "" if event.get("mfu") is None else f" | MFU {100 * event['mfu']:.1f} %"
        print(f"step {event['step']:>6} | loss {event['loss']:.4f} | lr {event['lr']:.2e} | "
              f"grad norm {event['grad_norm']:.3f} | {event['tokens_per_s']:,.0f} tok/s{mfu}", flush=True)


def _load_for_inference(path: str, device_name: str):
    """Model (eval mode, on device), tokenizer and configs from a checkpoint or run directory."""
    from lmkit.checkpoint.format import META_FILE, CheckpointError, find_latest
    from lmkit.checkpoint.single import load_checkpoint
    from lmkit.model import build_model
    from lmkit.run import resolve_device

    directory = Path(path)
    if not (directory / META_FILE).exists():
        latest = find_latest(directory) if directory.is_dir() else None
        if latest is None:
            raise CheckpointError(
                f"{directory} is neither a checkpoint (no {META_FILE}) nor a run directory with "
                "checkpoints; pass the out_dir of a training run or one of its step_* directories")
        directory = latest
    info = load_checkpoint(directory, verify=False)
    model_cfg = info.config("model", ModelConfig)
    train_cfg = info.config("train", TrainConfig)
    model = build_model(model_cfg)
    load_checkpoint(directory, model=model)
    device = resolve_device(device_name)
    return model.to(device).eval(), info.load_tokenizer(), model_cfg, train_cfg, info


def cmd_eval(args: argparse.Namespace) -> int:
    from lmkit.data import encode_to_file, load_splits
    from lmkit.train import Trainer

    model, tokenizer, model_cfg, train_cfg, info = _load_for_inference(args.checkpoint, args.device)
    corpus = args.corpus or train_cfg.corpus
    _, val_text = load_splits(corpus, 0.1)
    val_tokens = encode_to_file(val_text, tokenizer)
    overrides = {"corpus": corpus, "device": args.device, "out_dir": str(info.directory / "eval")}
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
        overrides["grad_accum"] = 1
    cfg = dataclasses.replace(train_cfg, **overrides)
    trainer = Trainer(model, cfg, val_tokens, val_tokens, model_config=model_cfg)
    result = {"checkpoint": str(info.directory), "step": info.step, "corpus": corpus,
              "batches": args.iters, **trainer.evaluate(args.iters)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{info.directory} (step {info.step}) on {corpus}: val loss {result['val_loss']:.4f}, "
              f"perplexity {result['val_ppl']:.2f} over {args.iters} batches")
    return 0


def _load_hf_dir(path: str, device_name: str):
    """Model (eval mode, on device) and tokenizer from a transformers GPT-2, Llama or Qwen3 directory."""
    from lmkit.hf import TOKENIZER_FILE, load_pretrained
    from lmkit.run import resolve_device

    model, tokenizer = load_pretrained(path)
    if tokenizer is None:
        raise UsageError(f"lmkit generate: --hf-dir {path} has no tokenizer ({TOKENIZER_FILE} or a "
                         "byte-level BPE tokenizer.json); export it with lmkit export --hf-dir, which "
                         "writes one")
    return model.to(resolve_device(device_name)).eval(), tokenizer


def cmd_generate(args: argparse.Namespace) -> int:
    from lmkit.generate import GenerationError, check_options, generate_text, stream
    from lmkit.lab.efficiency import dynamic_quantization_available, quantize_int8
    from lmkit.run import resolve_device

    try:  # the options first: a typo costs no checkpoint load
        check_options(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    except GenerationError as e:
        raise UsageError(f"lmkit generate: --{str(e).replace('_', '-', 2)}") from None
    if (args.checkpoint is None) == (args.hf_dir is None):
        raise UsageError("lmkit generate: give a checkpoint directory or --hf-dir DIR (exactly one of them)")
    if args.int8:
        if resolve_device(args.device).type != "cpu":
            raise UsageError("lmkit generate: --int8 uses PyTorch's CPU int8 kernels; add --device cpu")
        if not dynamic_quantization_available():
            raise UsageError("lmkit generate: --int8 needs torch.ao.quantization's dynamic quantization, "
                             "which this torch lacks; drop --int8")
    if args.hf_dir is not None:
        model, tokenizer = _load_hf_dir(args.hf_dir, args.device)
    else:
        model, tokenizer, *_ = _load_for_inference(args.checkpoint, args.device)
    if args.int8:
        model = quantize_int8(model)
    for prompt in args.prompt:
        try:
            tokenizer.encode(prompt)
        except ValueError as e:
            problem = str(e).split(";")[0]  # the tokenizer's advice is for its Python users
            raise UsageError(f"lmkit generate: --prompt {prompt!r}: {problem}; leave that character out, or "
                             "train with --tokenizer bpe (byte-level: it encodes any text)") from None
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   repetition_penalty=args.repetition_penalty, greedy=args.greedy, seed=args.seed,
                   use_cache=not args.no_cache, stop_token_ids=[tokenizer.eot_id])
    if args.stream:
        if len(args.prompt) != 1:
            raise UsageError("lmkit generate: --stream takes exactly one --prompt")
        prompt = args.prompt[0]
        print(prompt, end="", flush=True)
        ids: list[int] = []
        shown = ""
        for step in stream(model, [tokenizer.encode(prompt)], args.max_new_tokens, **options):
            if step[0] is None:
                break
            ids.append(step[0])
            text = tokenizer.decode(ids)
            if args.stop and any(s in text for s in args.stop):
                text = text[: min(text.find(s) for s in args.stop if s in text)]
                print(text[len(shown):], end="", flush=True)
                break
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                print(text[len(shown):], end="", flush=True)
                shown = text
        print()
        return 0
    outputs = generate_text(model, tokenizer, list(args.prompt), args.max_new_tokens, stop=args.stop,
                            **options)
    for prompt, text in zip(args.prompt, outputs, strict=True):
        print(prompt + text)
        if len(args.prompt) > 1:
            print("-" * 40)
    return 0


def _estimate_inputs(args: argparse.Namespace) -> tuple[costs.Model, costs.Cluster]:
    shape = {k: getattr(args, k) for k in ("n_layer", "d_model", "n_head", "vocab_size", "seq_len")}
    options = {k: getattr(args, k) for k in ("n_kv_head", "mlp", "d_ff", "n_experts", "moe_top_k",
                                             "moe_every", "moe_d_ff", "n_shared_experts")
               if getattr(args, k) is not None}
    given = [k for k, v in shape.items() if v is not None and k != "seq_len"] + list(options)
    if args.preset and given:
        raise UsageError(f"lmkit estimate: give --preset or the model's shape, not both (got --preset and "
                         f"{', '.join('--' + k.replace('_', '-') for k in given)})")
    if args.preset:
        model = costs.PRESETS[args.preset]
        if args.seq_len is not None:
            model = dataclasses.replace(model, seq_len=args.seq_len).validate()
    elif all(v is not None for v in shape.values()):
        model = costs.Model(**shape, **options, name="custom").validate()
    else:
        missing = [k for k in shape if shape[k] is None]
        raise UsageError("lmkit estimate: give --preset, or all of --n-layer --d-model --n-head --vocab-size "
                         f"--seq-len (missing {', '.join('--' + k.replace('_', '-') for k in missing)})")
    memory_gb, peak, intra, inter = costs.DEVICES[args.device]
    cluster = costs.Cluster(
        args.devices, args.device_memory_gb or memory_gb, (args.peak_tflops or peak / 1e12) * 1e12,
        args.devices_per_node, args.intra_node_gbps or intra, args.inter_node_gbps or inter,
        name=args.device).validate()
    if not 0 < args.efficiency <= 1:
        raise UsageError(f"lmkit estimate: --efficiency must be in (0, 1], got {args.efficiency}")
    if any(z not in (0, 1, 2, 3) for z in args.zero):
        raise UsageError(f"lmkit estimate: --zero takes stages among 0 1 2 3, got {args.zero}")
    return model, cluster


def cmd_estimate(args: argparse.Namespace) -> int:
    """Rank the layouts that fit (`lmkit.costs.search`) and print them as a table (chapter 5)."""
    model, cluster = _estimate_inputs(args)
    if args.precision == "fp32" and args.reduce_dtype != "fp32":
        raise UsageError("lmkit estimate: --reduce-dtype bf16 applies to --precision mixed (bf16 weights "
                         "with fp32 masters); drop it or use --precision mixed")
    if args.ep is not None and args.ep > 1 and not model.n_experts:
        raise UsageError(f"lmkit estimate: --ep {args.ep} splits experts, but the model has none; give "
                         "--n-experts or a preset with experts")
    if args.imbalance < 1:
        raise UsageError(f"lmkit estimate: --imbalance is at least 1 (uniform routing), got {args.imbalance}")
    found = costs.search(model, args.global_batch, cluster, args.precision, args.efficiency,
                         zero_stages=tuple(sorted(set(args.zero))), reduce=args.reduce_dtype,
                         imbalance=args.imbalance, ep_sizes=None if args.ep is None else (args.ep,))
    found = [c for c in found if (args.tp is None or c.layout.tp == args.tp)
             and (args.pp is None or c.layout.pp == args.pp)]
    if not found:
        raise costs.CostError(f"no layout with tp={args.tp}, pp={args.pp} and ep={args.ep} fits; drop "
                              "--tp/--pp/--ep to see the layouts that do")
    rows = costs.estimate_rows(found[:args.top], model, cluster, args.precision, args.imbalance)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("\n".join(costs.estimate_lines(rows, model, cluster, args.global_batch, args.precision,
                                         args.reduce_dtype, args.efficiency, len(found), args.imbalance)))
    return 0


# --------------------------------------------------------------------------- export


def cmd_export(args: argparse.Namespace) -> int:
    """``lmkit export CHECKPOINT OUT``: `lmkit.checkpoint.export.export_checkpoint`, with one-line errors."""
    from lmkit.checkpoint.export import export_checkpoint
    from lmkit.checkpoint.format import META_FILE, find_latest
    from lmkit.checkpoint.sharded import is_sharded
    from lmkit.checkpoint.single import load_checkpoint

    if (args.out is None) == (args.hf_dir is None):
        raise UsageError("lmkit export: give an output directory or --hf-dir DIR (exactly one of them)")
    source = Path(args.checkpoint)
    if not (source / META_FILE).exists() and (latest := find_latest(source)) is not None:
        source = latest
    if args.hf_dir is not None:
        return _export_hf(source, Path(args.hf_dir))
    out = Path(args.out)
    if out.exists() and not (out / META_FILE).is_file():
        raise UsageError(f"lmkit export: {out} exists and is not an lmkit checkpoint; choose a new directory")
    if out.resolve() == source.resolve():
        raise UsageError(f"lmkit export: {out} is the checkpoint itself; choose another directory")
    path = export_checkpoint(source, out)
    kind = "sharded" if is_sharded(source) else "single-directory"
    print(f"exported the {kind} checkpoint {source} (step {load_checkpoint(path).step}) to {path}")
    return 0


def _export_hf(source: Path, out: Path) -> int:
    """``lmkit export CHECKPOINT --hf-dir DIR``: the checkpoint as a transformers directory of the class
    that computes its network (`lmkit.hf.hf_architecture`: GPT-2, Llama or Qwen3)."""
    from lmkit.checkpoint.format import META_FILE, CheckpointError
    from lmkit.checkpoint.single import load_checkpoint, load_model_state
    from lmkit.hf import hf_architecture, hf_config, save_pretrained
    from lmkit.model import GPT

    if out.exists() and not (out / "config.json").is_file():
        raise UsageError(f"lmkit export: --hf-dir {out} exists and is not a transformers model directory; "
                         "choose a new directory")
    if not (source / META_FILE).is_file():
        raise CheckpointError(f"{source} is neither a checkpoint (no {META_FILE}) nor a run "
                              "directory with checkpoints; pass the out_dir of a training run or a "
                              "step_* directory")
    info = load_checkpoint(source)
    model_cfg = info.config("model", ModelConfig)
    hf_config(model_cfg)  # refuses what transformers cannot express, before the weights are read
    model = GPT(model_cfg)
    model.load_state_dict(load_model_state(source))
    path = save_pretrained(model, out, info.load_tokenizer())
    architecture = hf_architecture(model_cfg)
    family = {"GPT2LMHeadModel": "GPT-2", "LlamaForCausalLM": "Llama", "Qwen3ForCausalLM": "Qwen3"}
    print(f"exported {source} (step {info.step}) as a transformers {family[architecture]} directory "
          f"({architecture}) {path}")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "estimate": cmd_estimate,
            "export": cmd_export}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lmkit`` command; returns the exit status."""
    from lmkit.checkpoint.format import CheckpointError
    from lmkit.data import CorpusError
    from lmkit.generate import GenerationError
    from lmkit.hf import HFError
    from lmkit.train import NonFiniteError

    try:
        with one_line_warnings():
            args = build_parser().parse_args(argv)
            return COMMANDS[args.command](args)
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return 2
    except (ConfigError, CorpusError, CheckpointError, FileNotFoundError, costs.CostError, NonFiniteError,
            GenerationError, HFError) as e:
        print(f"lmkit: error: {e}", file=sys.stderr)
        return 2
    except PeerError as e:
        print(f"lmkit: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lmkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
