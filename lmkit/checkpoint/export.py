"""``lmkit export``: a checkpoint as one single directory, whatever layout saved it.

`export_checkpoint` reads every shard of a sharded checkpoint (`lmkit.checkpoint.sharded`) in this
process and writes the single-directory checkpoint (`lmkit.checkpoint.single`) that
``lmkit generate`` and Hugging Face users load; a single-directory source is copied as is, through
the same verified load and atomic save.
"""

from __future__ import annotations

from pathlib import Path

from lmkit.checkpoint.format import PathLike
from lmkit.checkpoint.sharded import is_sharded, load_sharded_full
from lmkit.checkpoint.single import load_checkpoint, load_model_state, save_checkpoint

__all__ = ["export_checkpoint"]


def export_checkpoint(source: PathLike, target: PathLike) -> Path:
    """A sharded checkpoint as today's single directory (model.safetensors + state.pt): what
    ``lmkit generate`` and Hugging Face users load. A single-directory source is copied as is."""
    source, target = Path(source), Path(target)
    if not is_sharded(source):
        info = load_checkpoint(source)
        return save_checkpoint(target, model=load_model_state(source), optimizer=info.optimizer_state,
                               scheduler=info.scheduler_state, step=info.step, configs=info.configs,
                               tokenizer=info.tokenizer_path, extra=info.extra, rng_state=info.rng_state)
    weights, optimizer, info = load_sharded_full(source)
    return save_checkpoint(target, model=weights, optimizer=optimizer, scheduler=info.scheduler_state,
                           step=info.step, configs=info.configs, tokenizer=info.tokenizer_path,
                           extra=info.extra, rng_state=info.rng_state or None)
