"""The smallest neural language model (Bengio et al. 2003) and a trainer/scorer for word streams.

Bengio's model replaces the count table of an n-gram model by a function: the previous
``n - 1`` words are looked up in an embedding table ``C`` (one learned vector per word), the
vectors are concatenated, and a one-hidden-layer network maps them to a softmax over the
vocabulary,

    x = [C(w_{t-n+1}); ...; C(w_{t-1})],   h = tanh(H x + d),   P(w_t | context) = softmax(U h + b).

Similar words get similar vectors, so what the model learns about "the king said" transfers to
"the prophet said": the context is no longer a key in a table but a point in a space. (The
paper also adds direct connections from ``x`` to the output; they are left out here.)

`BengioLM.forward` has the interface of `lmkit.model.GPT` (``idx [B, T]`` -> logits
``[B, T, V]`` and the mean cross-entropy), so `train_on_stream` and `stream_nll` train and score
either model on one stream of word ids: the lines of a text, each followed by ``</s>``
(`word_stream`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BengioLM", "word_stream", "train_on_stream", "stream_nll"]


def word_stream(sentences: Iterable[Sequence[str]], index: Mapping[str, int], unk: str = "<unk>",
                eos: str = "</s>") -> np.ndarray:
    """One array of word ids: ``</s>`` first (the context of the first word), then every sentence
    followed by ``</s>``; words outside `index` become ``<unk>``.

    The tokens after the first are exactly those an n-gram model predicts on the same
    sentences (words and one ``</s>`` per line), so total NLLs compare.
    """
    u, e = index[unk], index[eos]
    ids = [e]
    for sentence in sentences:
        ids.extend(index.get(w, u) for w in sentence)
        ids.append(e)
    return np.asarray(ids, dtype=np.int64)


class BengioLM(nn.Module):
    """Embeddings of the previous `context` words, concatenated, through a tanh layer to a softmax.

    Args:
        vocab_size: number of words.
        context: n - 1, the number of previous words the model sees.
        d_embed: width of a word vector.
        d_hidden: width of the hidden layer.
        pad_id: the id that fills the window before the start of a sequence (``</s>``).
    """

    def __init__(self, vocab_size: int, context: int = 4, d_embed: int = 64, d_hidden: int = 256,
                 pad_id: int = 1) -> None:
        super().__init__()
        if context < 1:
            raise ValueError(f"context must be >= 1, got {context}")
        self.context, self.pad_id = context, pad_id
        self.tok_emb = nn.Embedding(vocab_size, d_embed)
        self.hidden = nn.Linear(context * d_embed, d_hidden)
        self.out = nn.Linear(d_hidden, vocab_size)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits ``[B, T, V]``: position t predicts the word after ``idx[:, t]`` from the window
        ``idx[:, t - context + 1 .. t]``; and the mean cross-entropy when `targets` are given."""
        padded = F.pad(idx, (self.context - 1, 0), value=self.pad_id)
        windows = padded.unfold(1, self.context, 1)                   # [B, T, context]
        x = self.tok_emb(windows).flatten(2)                          # [B, T, context * d_embed]
        logits = self.out(torch.tanh(self.hidden(x)))                 # [B, T, V]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def train_on_stream(model: nn.Module, ids: np.ndarray, *, block_size: int, batch_size: int, steps: int,
                    lr: float = 3e-3, weight_decay: float = 0.0, seed: int = 0) -> list[float]:
    """Train `model` on random windows of `ids` with AdamW and a cosine schedule; the losses (nats)."""
    if len(ids) <= block_size + 1:
        raise ValueError(f"the stream has {len(ids)} ids, fewer than block_size + 2 = {block_size + 2}")
    gen = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    offsets = torch.arange(block_size + 1)
    model.train()
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - block_size - 1, (batch_size,), generator=gen)
        window = data[starts[:, None] + offsets]
        _, loss = model(window[:, :-1], window[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def stream_nll(model: nn.Module, ids: np.ndarray, *, block_size: int,
               batch_size: int = 64) -> tuple[float, int]:
    """Total NLL (nats) of ``ids[1:]``, each predicted once, in consecutive windows of `block_size`.

    The context restarts at every window (the first token of a window sees only itself), the
    simplest scheme that scores every token exactly once.
    """
    data = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    n = len(data) - 1
    starts = list(range(0, n, block_size))
    total = 0.0
    model.eval()
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        lengths = [min(block_size, n - s) for s in chunk]
        x = torch.full((len(chunk), block_size), int(data[0]), dtype=torch.long)
        y = torch.full((len(chunk), block_size), -100, dtype=torch.long)
        for row, (s, length) in enumerate(zip(chunk, lengths, strict=True)):
            x[row, :length] = data[s : s + length]
            y[row, :length] = data[s + 1 : s + 1 + length]
        logits, _ = model(x)
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum").item()
    return total, n
