"""Text classification: a pretrained GPT with a classification head, and a bag-of-words baseline.

`SequenceClassifier` puts a linear layer on top of a `lmkit.model.GPT`: the final hidden states
(after ``ln_f``, captured by a forward hook so the model is used unchanged) are averaged over
the real tokens of each text and mapped to one logit per class. Fine-tuning trains the head and
the whole backbone with cross-entropy; with ``freeze_backbone=True`` only the head learns (a
*linear probe* of what pretraining put into the features).

`NaiveBayes` is the classic baseline: multinomial naive Bayes over bags of character n-grams
(Chinese has no spaces, so characters and character pairs stand in for words), with add-one
smoothing. A fine-tuned model is only worth its cost if it beats this.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["SequenceClassifier", "pad_right", "fit_classifier", "predict", "NaiveBayes",
           "confusion_matrix", "accuracy"]


def pad_right(rows: Sequence[Sequence[int]], max_len: int, pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Ids [B, L] (each row cut to `max_len`, right-padded) and the mask of real tokens [B, L].

    Right padding is harmless for a causal model: no real token attends to the padding after it.
    """
    rows = [list(r)[:max_len] or [pad_id] for r in rows]
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[b, : len(r)] = True
    return ids, mask


class SequenceClassifier(nn.Module):
    """A GPT backbone, mean-pooled over real tokens, and a linear head with `n_classes` outputs."""

    def __init__(self, backbone: nn.Module, n_classes: int, freeze_backbone: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.d_model, n_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        if freeze_backbone:
            backbone.requires_grad_(False)
        self._hidden: Tensor | None = None
        backbone.ln_f.register_forward_hook(self._keep)

    def _keep(self, _module, _inputs, output: Tensor) -> None:
        self._hidden = output

    def features(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Mean of the final hidden states over the real tokens: [B, d_model]."""
        self.backbone(ids, last_only=True)  # the LM head runs on one position only
        hidden, self._hidden = self._hidden, None
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.head(self.features(ids, mask))


def fit_classifier(model: SequenceClassifier, rows: Sequence[Sequence[int]], labels: Sequence[int], *,
                   epochs: int = 1, batch_size: int = 32, lr: float = 3e-4, max_len: int = 64,
                   seed: int = 0, weight_decay: float = 0.01,
                   callback: Callable[[dict], None] | None = None) -> list[dict]:
    """Fine-tune with AdamW and a linear decay of the learning rate; returns the loss history."""
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(rows) / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / max(steps, 1))
    generator = torch.Generator().manual_seed(seed)
    history, step = [], 0
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(rows), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            ids, mask = pad_right([rows[i] for i in batch], max_len)
            loss = F.cross_entropy(model(ids, mask), labels_t[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            event = {"step": step, "epoch": epoch, "loss": loss.item()}
            history.append(event)
            if callback is not None:
                callback(event)
    model.eval()
    return history


@torch.no_grad()
def predict(model: SequenceClassifier, rows: Sequence[Sequence[int]], batch_size: int = 64,
            max_len: int = 64) -> np.ndarray:
    """The most likely class of every row."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(rows), batch_size):
            ids, mask = pad_right(rows[start : start + batch_size], max_len)
            out.append(model(ids, mask).argmax(-1).numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out)


class NaiveBayes:
    """Multinomial naive Bayes over character n-grams (n in `orders`), add-`alpha` smoothing."""

    def __init__(self, orders: Sequence[int] = (1, 2), alpha: float = 1.0):
        self.orders = tuple(orders)
        self.alpha = alpha

    def _grams(self, text: str) -> list[str]:
        return [text[i : i + n] for n in self.orders for i in range(len(text) - n + 1)]

    def fit(self, texts: Sequence[str], labels: Sequence[int]) -> NaiveBayes:
        labels = np.asarray(labels)
        self.classes = np.unique(labels)
        counts = [Counter() for _ in self.classes]
        for text, y in zip(texts, labels, strict=True):
            counts[int(np.searchsorted(self.classes, y))].update(self._grams(text))
        self.vocab = {g: i for i, g in enumerate(sorted(set().union(*counts)))}
        table = np.zeros((len(self.classes), len(self.vocab)))
        for c, counter in enumerate(counts):
            for g, n in counter.items():
                table[c, self.vocab[g]] = n
        table += self.alpha
        self.log_likelihood = np.log(table / table.sum(1, keepdims=True))
        self.log_prior = np.log(np.bincount(np.searchsorted(self.classes, labels)) / len(labels))
        return self

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        scores = []
        for text in texts:
            idx = [self.vocab[g] for g in self._grams(text) if g in self.vocab]  # unseen n-grams: ignored
            scores.append(self.log_prior + self.log_likelihood[:, idx].sum(1))
        return self.classes[np.argmax(np.asarray(scores), axis=1)]


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """Counts [true class, predicted class]."""
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return m


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))
