"""Time to a given loss (chapter 7): recipes trained on the same batches, judged on the same
fixed validation batches, compared by the training wall time at which each reaches a target loss.

What a user compares is not tokens per second but seconds to a quality. `train_curve` trains one
`Recipe` (a model configuration, a training configuration and, for the reference, transformers'
``GPT2LMHeadModel`` with the same initial weights) and records the validation loss every
``eval_every`` steps against the training seconds so far; evaluation time is excluded (the clock
stops while evaluating). `Curve.time_to` reads off when a curve first reaches a loss,
interpolating linearly between evaluations. `benchmarks/time_to_loss.py`, chapter 7 and the tests
call these functions.

`step_work` counts what one training step of a recipe dispatches (operators) and computes
(FLOPs): counts, unlike times, are the same on every machine, and they say why a change that adds
little arithmetic can still cost time per step on a small model.

`equal_flops_moe` turns a dense recipe into a mixture of experts of the same FLOPs per token (chapter 7,
"Experts at equal compute"); a curve of such a model also holds the tokens each expert received at its
last evaluation (`Curve.expert_loads`), and `bits_per_byte` converts a curve's losses to the book's
yardstick.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmkit import metrics
from lmkit.config import ModelConfig, ParallelConfig, TrainConfig
from lmkit.experts import expert_counts
from lmkit.lab.efficiency import count_flops, count_ops
from lmkit.lab.layouts import layout_losses, layout_name, max_relative_difference
from lmkit.model import GPT
from lmkit.optim import configure_optimizer, lr_multiplier
from lmkit.run import prepare_run

__all__ = ["Recipe", "Curve", "fixed_batches", "train_curve", "train_curves", "nanogpt_recipe", "best_recipe",
           "ablation_recipes", "shakespeare_tokens", "shakespeare_tokenizer", "time_table", "step_work",
           "recipe_under_layouts", "equal_flops_moe", "bits_per_byte"]


@dataclass
class Recipe:
    """One way to train: the model, the optimisation (`TrainConfig`: lr, schedule, batch, optimizer)
    and whether the network is transformers' GPT-2 (``hf=True``, the reference) or lmkit's GPT."""

    name: str
    model: ModelConfig
    train: TrainConfig
    hf: bool = False

    def with_options(self, name: str, model: dict | None = None, train: dict | None = None) -> Recipe:
        """A copy under another name with some model / training fields changed."""
        return Recipe(name, dataclasses.replace(self.model, **(model or {})).validate(),
                      dataclasses.replace(self.train, **(train or {})).validate(), self.hf)


def nanogpt_recipe(vocab_size: int, max_steps: int = 2000, hf: bool = False) -> Recipe:
    """nanoGPT's CPU run of ``train_shakespeare_char``: 4 layers, 4 heads, width 128, context 64,
    no biases, batch 12, AdamW lr 1e-3 (warmup 100, cosine to 1e-4), beta2 0.99, wd 0.1, clip 1."""
    model = ModelConfig(vocab_size=vocab_size, block_size=64, n_layer=4, n_head=4, d_model=128,
                        dropout=0.0, bias=False)
    train = TrainConfig(batch_size=12, max_steps=max_steps, lr=1e-3, min_lr=1e-4,
                        warmup_steps=min(100, max_steps // 10), beta2=0.99, weight_decay=0.1, grad_clip=1.0)
    return Recipe("transformers GPT-2, nanoGPT recipe" if hf else "lmkit, nanoGPT recipe",
                  model.validate(), train.validate(), hf)


@dataclass
class Curve:
    """Validation loss against training seconds (evaluation excluded) and steps for one recipe."""

    name: str
    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    #: a mixture of experts' token-expert assignments per expert, per MoE layer, summed over the validation
    #: batches of the last evaluation (empty for a dense model)
    expert_loads: list[list[int]] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        return self.val_loss[-1]

    @property
    def train_seconds(self) -> float:
        return self.seconds[-1]

    def time_to(self, target: float) -> float:
        """Training seconds when the validation loss first reaches `target`, linearly interpolated
        between the two evaluations around the crossing (``inf`` when it never does)."""
        for i, loss in enumerate(self.val_loss):
            if loss <= target:
                if i == 0:
                    return self.seconds[0]
                l0, l1, t0, t1 = self.val_loss[i - 1], loss, self.seconds[i - 1], self.seconds[i]
                return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
        return math.inf

    def step_to(self, target: float) -> float:
        """Like `time_to`, in optimizer steps."""
        for i, loss in enumerate(self.val_loss):
            if loss <= target:
                if i == 0:
                    return float(self.steps[0])
                l0, l1, s0, s1 = self.val_loss[i - 1], loss, self.steps[i - 1], self.steps[i]
                return s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
        return math.inf


def fixed_batches(tokens: Tensor, n: int, batch_size: int, block_size: int, seed: int) -> Tensor:
    """`n` batches of windows of ``block_size + 1`` tokens drawn once with `seed`: [n, B, T+1].

    Training draws its batch of step ``i`` as row ``i`` (every recipe sees the same text in the
    same order); validation uses one such set for every evaluation of every recipe.
    """
    if len(tokens) <= block_size + 1:
        raise ValueError(f"{len(tokens)} tokens are too few for windows of {block_size + 1}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - block_size - 1, (n, batch_size), generator=g)
    return tokens[starts[..., None] + torch.arange(block_size + 1)].long()


def _shakespeare_run():
    return prepare_run(ModelConfig(block_size=64), TrainConfig(corpus="tinyshakespeare", tokenizer="char"))


def shakespeare_tokenizer():
    """The character tokenizer of `shakespeare_tokens` (to turn its tokens back into text and bytes)."""
    return _shakespeare_run().tokenizer


def shakespeare_tokens() -> tuple[Tensor, Tensor, int]:
    """Tiny Shakespeare as characters: (train tokens, validation tokens, vocabulary size), the split
    and tokenizer of ``lmkit train --corpus tinyshakespeare --tokenizer char``."""
    run = _shakespeare_run()
    as_long = [torch.from_numpy(np.asarray(t, dtype=np.int64)) for t in (run.train_tokens, run.val_tokens)]
    return as_long[0], as_long[1], run.tokenizer.vocab_size


def time_table(curves: list[Curve], target: float, reference: int = 0) -> list[dict[str, float | str]]:
    """One row per curve: steps, training seconds, final loss, seconds and steps to `target`, and
    the time to target as a multiple of curve `reference`'s."""
    ref = curves[reference].time_to(target)
    return [{"recipe": c.name, "steps": c.steps[-1], "train_s": c.train_seconds, "final_loss": c.final_loss,
             "s_to_target": c.time_to(target), "step_to_target": c.step_to(target),
             "x_reference": c.time_to(target) / ref} for c in curves]


def _build(recipe: Recipe, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model: nn.Module = GPT(recipe.model)  # the HF reference starts from the same weights
    if recipe.hf:
        from lmkit.hf import to_transformers

        model = to_transformers(model)  # sdpa attention, gelu_pytorch_tanh: lmkit's function
        if not recipe.model.bias:  # GPT-2 always has biases: keep them at zero, as lmkit has none
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.requires_grad_(False)
    model.train()
    cfg = recipe.train
    optimizer = configure_optimizer(model, cfg)  # MuonAdamW when cfg.optimizer == "muon"
    return model, optimizer


def _loss(model: nn.Module, hf: bool, x: Tensor, y: Tensor) -> Tensor:
    if hf:
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
    return model(x, y)[1]


def bits_per_byte(loss: float, val_batches: Tensor, tokenizer) -> float:
    """A mean validation loss on `val_batches` (nats per predicted token, as `Curve.val_loss`) in bits per
    UTF-8 byte of the text its targets spell: the book's yardstick, comparable across tokenizers."""
    targets = val_batches[..., 1:].reshape(-1, val_batches.size(-1) - 1)
    text = "".join(tokenizer.decode(row.tolist()) for row in targets)
    return metrics.bits_per_byte(loss * targets.numel(), text)


@torch.no_grad()
def _evaluate(model: nn.Module, hf: bool, val: Tensor) -> tuple[float, list[list[int]]]:
    """The mean validation loss on `val`, and of a mixture of experts the assignments per expert summed
    over its batches (`lmkit.experts.expert_counts`; empty for a dense model)."""
    model.eval()
    total, loads = 0.0, []
    for b in val:
        total += float(_loss(model, hf, b[:, :-1], b[:, 1:]))
        counts = expert_counts(model)
        loads = [[a + c for a, c in zip(la, lc, strict=True)] for la, lc in zip(loads, counts, strict=True)
                 ] if loads else counts
    model.train()
    return total / len(val), loads


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, recipe: Recipe, batch: Tensor) -> None:
    """One optimizer step on `batch` ([B, T+1]): forward, backward, clipping, update."""
    loss = _loss(model, recipe.hf, batch[:, :-1], batch[:, 1:])
    loss.backward()
    if recipe.train.grad_clip > 0:
        trained = [p for p in model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(trained, recipe.train.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_work(recipe: Recipe, batch: Tensor, seed: int = 1337) -> dict[str, int]:
    """Operators dispatched and FLOPs computed by one training step of `recipe` on `batch`.

    The step is the one `train_curves` times (forward, backward, clipping, optimizer); it is
    counted after one warm-up step, so that the optimizer's state already exists. Returns
    ``{"ops": ..., "flops": ...}`` (`lmkit.lab.efficiency.count_ops` and `count_flops`).
    """
    model, optimizer = _build(recipe, seed)
    _train_step(model, optimizer, recipe, batch)
    ops = sum(count_ops(lambda: _train_step(model, optimizer, recipe, batch)).values())
    flops = count_flops(lambda: _train_step(model, optimizer, recipe, batch))
    return {"ops": ops, "flops": flops}


class _Training:
    """One recipe in training: its model, optimizer, schedule, batches, clock and curve."""

    def __init__(self, recipe: Recipe, train_tokens: Tensor, val_batches: Tensor, seed: int, data_seed: int):
        self.recipe, self.cfg, self.val = recipe, recipe.train, val_batches
        self.model, self.optimizer = _build(recipe, seed)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lambda s: lr_multiplier(s, self.cfg))
        self.batches = fixed_batches(train_tokens, self.cfg.max_steps, self.cfg.batch_size,
                                     recipe.model.block_size, data_seed)
        self.step, self.elapsed = 0, 0.0
        loss, loads = _evaluate(self.model, recipe.hf, val_batches)
        self.curve = Curve(recipe.name, [0], [0.0], [loss], loads)

    @property
    def done(self) -> bool:
        return self.step >= self.cfg.max_steps

    def advance(self, eval_every: int) -> None:
        """Train up to the next evaluation (every `eval_every` steps and at the end), then evaluate."""
        stop = min(self.cfg.max_steps, (self.step // eval_every + 1) * eval_every)
        t0 = time.perf_counter()
        while self.step < stop:
            _train_step(self.model, self.optimizer, self.recipe, self.batches[self.step])
            self.scheduler.step()
            self.step += 1
        self.elapsed += time.perf_counter() - t0  # the clock stops before evaluating
        self.curve.steps.append(self.step)
        self.curve.seconds.append(self.elapsed)
        loss, self.curve.expert_loads = _evaluate(self.model, self.recipe.hf, self.val)
        self.curve.val_loss.append(loss)


def train_curves(recipes: list[Recipe], train_tokens: Tensor, val_batches: Tensor, eval_every: int,
                 seed: int = 1337, data_seed: int = 0) -> list[Curve]:
    """Train every recipe and return their `Curve`s, interleaved: the recipe furthest behind in its
    own schedule trains up to its next evaluation, then the next one, so machine noise (other jobs,
    clock changes) hits all of them alike, however many steps each has.

    Step ``i`` of every recipe trains on batch ``i`` of ``fixed_batches(train_tokens, ...,
    data_seed)`` (the same text in the same order for recipes of the same batch size); every
    model starts from ``torch.manual_seed(seed); GPT(recipe.model)``; the validation loss on
    `val_batches` is taken at step 0, every `eval_every` steps and at the end. The clock runs only
    while training: forward, backward, clipping, the optimizer and the schedule.
    """
    runs = [_Training(r, train_tokens, val_batches, seed, data_seed) for r in recipes]
    while not all(run.done for run in runs):
        # the run furthest behind in its own schedule goes next: short and long schedules progress in
        # proportion and end together, so a change of load during the run hits every recipe alike
        behind = min((run for run in runs if not run.done), key=lambda run: run.step / run.cfg.max_steps)
        behind.advance(eval_every)
    return [run.curve for run in runs]


def train_curve(recipe: Recipe, train_tokens: Tensor, val_batches: Tensor, eval_every: int,
                seed: int = 1337, data_seed: int = 0) -> Curve:
    """`train_curves` for one recipe."""
    return train_curves([recipe], train_tokens, val_batches, eval_every, seed, data_seed)[0]


#: lmkit's best recipe at nanoGPT's CPU budget, from chapter 7's ablation: the model options and the
#: training changes that paid, and the schedule's length as a fraction of the baseline's steps.
BEST_MODEL = {"pos": "rope", "qk_norm": True, "activation": "relu2"}
BEST_TRAIN = {"optimizer": "muon", "lr": 2e-3}
BEST_STEPS_FRACTION = 0.3


def best_recipe(base: Recipe) -> Recipe:
    """`base` (an lmkit recipe) with `BEST_MODEL` and `BEST_TRAIN`, on a cosine schedule of
    ``BEST_STEPS_FRACTION`` of its steps (warmup shortened in proportion)."""
    steps = max(1, round(base.train.max_steps * BEST_STEPS_FRACTION))
    warmup = round(base.train.warmup_steps * BEST_STEPS_FRACTION)
    return base.with_options("lmkit, best recipe", BEST_MODEL,
                             {**BEST_TRAIN, "max_steps": steps, "warmup_steps": warmup})


def equal_flops_moe(base: Recipe, n_experts: int, top_k: int, name: str | None = None,
                    **moe: object) -> Recipe:
    """`base` (a dense lmkit recipe without biases) with a mixture of `n_experts` experts in every block,
    `top_k` of them per token, of the same FLOPs per token (`GPT.flops_per_token`, checked).

    A token of the dense MLP multiplies by ``m d f`` weights (``f`` its width, ``m`` = 2 matrices, 3 for
    SwiGLU); with experts it multiplies by its k experts' ``k m d w`` and the router's ``d E``. Equal
    FLOPs: ``w = (m f - E) / (m k)``, which must be a whole number. `moe` sets other expert fields
    (``moe_aux_coef``, ``moe_router``, ...)."""
    m = base.model
    matrices = 3 if m.mlp == "swiglu" else 2
    width, rest = divmod(matrices * m.ffn_width - n_experts, matrices * top_k)
    if m.bias or rest or width <= 0:
        raise ValueError(f"no expert width gives the FLOPs of a dense MLP of width {m.ffn_width} with "
                         f"E={n_experts}, k={top_k}{' and biases (use bias=False)' if m.bias else ''}: "
                         f"{matrices} x {m.ffn_width} - E must be a positive multiple of {matrices} x k")
    recipe = base.with_options(name or f"{n_experts} experts, top-{top_k}",
                               {"n_experts": n_experts, "moe_top_k": top_k, "moe_d_ff": width, **moe})
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # shapes only; the caller's RNG untouched
        flops = [GPT(r.model).flops_per_token() for r in (base, recipe)]
    assert flops[0] == flops[1], flops
    return recipe


#: Chapter 7's single changes: (row label, model fields, training fields).
ABLATION = (
    ("+ rotary positions", {"pos": "rope"}, {}),
    ("+ RMSNorm", {"norm": "rms"}, {}),
    ("+ QK-norm", {"qk_norm": True}, {}),
    ("+ ReLU^2 MLP", {"activation": "relu2"}, {}),
    ("+ Muon for the matrices", {}, {"optimizer": "muon"}),
    ("+ AdamW lr 2e-3", {}, {"lr": 2e-3}),
)


def combined_changes() -> list[str]:
    """Labels of the `ABLATION` rows whose every field the best recipe (`BEST_MODEL`, `BEST_TRAIN`) has."""
    return [label for label, model, train in ABLATION
            if all(BEST_MODEL.get(k) == v for k, v in model.items())
            and all(BEST_TRAIN.get(k) == v for k, v in train.items())]


def ablation_recipes(base: Recipe) -> list[Recipe]:
    """Chapter 7's ablation: the baseline, each means alone on it, and the best combination."""
    rows = [dataclasses.replace(base, name="baseline (nanoGPT recipe)")]
    for label, model, train in ABLATION:
        rows.append(base.with_options(label, model, train))
    best = best_recipe(base)
    rows.append(dataclasses.replace(best, name="best combination"))
    return rows


def recipe_under_layouts(recipe: Recipe, layouts: list[ParallelConfig], steps: int, out_dir: str,
                         cache_dir: str | None = None) -> list[dict[str, float | str]]:
    """The first `steps` of `recipe` (an lmkit one) trained by `lmkit.train.Trainer` on Tiny Shakespeare
    characters in one process and under each of `layouts`; per run its losses, wall seconds and largest
    relative loss difference from the single process. Muon's Newton-Schulz runs in fp32 here, so that a
    layout's curve is the single process's to ~1e-7 (in bf16 it agrees to bf16's rounding, ~1e-5)."""
    train = dataclasses.replace(recipe.train, corpus="tinyshakespeare", tokenizer="char", eval_interval=0,
                                out_dir=out_dir, muon_precision="float32")
    rows: list[dict[str, float | str]] = []
    reference: list[float] | None = None
    for layout in [None, *layouts]:
        start = time.perf_counter()
        got = layout_losses(recipe.model, train, layout, steps, cache_dir=cache_dir)
        seconds = time.perf_counter() - start
        reference = reference or got["losses"]
        rows.append({"layout": layout_name(layout), "final_loss": got["losses"][-1], "seconds": seconds,
                     "max_rel_diff": max_relative_difference(got["losses"], reference)})
    return rows
