"""The LSTM baseline: the source document's recurrent language model, done right.

Chapter 4 trains it on the same tokens as the GPT and compares the two by bits per byte. It has
the GPT's contract (``forward(idx, targets) -> (logits, loss)``, ``new_kv_cache``, ``num_params``,
``flops_per_token``), so the one `lmkit.train.Trainer` and the one `lmkit.generate` serve both;
`lmkit.model.build_model` builds it for ``ModelConfig(arch="lstm")``. It checks its inputs with
the GPT's checks (`lmkit.model.validate_token_ids`, `lmkit.model.left_pad_tensor`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmkit.config import ModelConfig
from lmkit.model import left_pad_tensor, validate_token_ids

__all__ = ["LSTMLanguageModel", "LSTMState"]


class LSTMState:
    """The LSTM's counterpart of a KV cache: the hidden and cell states after the tokens so far.

    ``left_pad`` only matters for the first call (the prompt), where padded columns are skipped
    so that each row's state is the state after its own real tokens.
    """

    max_len: int | None = None  # a recurrent state has no length limit

    def __init__(self, left_pad: Tensor | Sequence[int] | None = None):
        self.left_pad = None if left_pad is None else torch.as_tensor(left_pad, dtype=torch.long)
        self.h: Tensor | None = None
        self.c: Tensor | None = None
        self.length = 0

    def reset(self) -> None:
        self.h = self.c = None
        self.length = 0


class LSTMLanguageModel(nn.Module):
    """The source document's recurrent language model, done right, as a baseline for the GPT.

    embedding -> dropout -> nn.LSTM(d, d, n_layer) -> LayerNorm -> dropout -> head (tied to the
    embedding). Same ``forward(idx, targets) -> (logits, loss)`` contract as `GPT`, so one trainer
    and one generator serve both. There are no position embeddings: order comes from the
    recurrence, and the model accepts sequences of any length.
    """

    check_token_ids: bool = True  # see GPT.check_token_ids

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        if config.arch != "lstm":
            raise ValueError(f"LSTMLanguageModel needs config.arch='lstm', got {config.arch!r}")
        self.config = config
        d = config.d_model
        self.tok_emb = nn.Embedding(config.vocab_size, d)
        self.drop = nn.Dropout(config.dropout)
        # nn.LSTM applies its dropout between layers only (and warns when there is one layer).
        self.lstm = nn.LSTM(d, d, config.n_layer, batch_first=True,
                            dropout=config.dropout if config.n_layer > 1 else 0.0)
        self.ln_f = nn.LayerNorm(d, bias=config.bias)
        self.head = nn.Linear(d, config.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight
        nn.init.normal_(self.tok_emb.weight, mean=0.0, std=0.02)

    def set_activation_checkpointing(self, enabled: bool = True) -> LSTMLanguageModel:
        """Accepted for interface parity with GPT; cuDNN/ATen LSTMs are not checkpointed here."""
        return self

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """``6 N`` for training, ``2 N`` for inference, N = non-embedding params + d*V head.

        An LSTM's cost per token does not depend on the context length (no attention term).
        """
        N = self.num_params(non_embedding=True) + self.config.d_model * self.config.vocab_size
        return float(6 * N if training else 2 * N)

    def new_kv_cache(
        self, batch_size: int, max_len: int | None = None, left_pad: Tensor | Sequence[int] | None = None
    ) -> LSTMState:
        return LSTMState(left_pad)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        kv_cache: LSTMState | None = None,
        start_pos: int | None = None,
        left_pad: Tensor | Sequence[int] | None = None,
        last_only: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Same contract as `GPT.forward`; ``kv_cache`` is an `LSTMState` carried across calls."""
        B, T = idx.shape
        if self.check_token_ids:
            validate_token_ids(idx, self.config.vocab_size)
        state = None
        if kv_cache is not None:
            if kv_cache.h is not None:
                state = (kv_cache.h, kv_cache.c)
            elif left_pad is None:
                left_pad = kv_cache.left_pad
        pad = left_pad_tensor(left_pad, B, idx.device) if state is None else None

        x = self.drop(self.tok_emb(idx))
        if pad is None:
            y, (h, c) = self.lstm(x, state)
        else:
            # Left-padded rows: shift each row so its real tokens start at column 0, run a packed
            # sequence (the recurrence stops at each row's last real token), shift back.
            lengths = T - pad
            cols = torch.arange(T, device=idx.device)
            gather = ((cols[None, :] + pad[:, None]) % T)[:, :, None].expand(-1, -1, x.size(-1))
            packed = nn.utils.rnn.pack_padded_sequence(
                x.gather(1, gather), lengths.cpu(), batch_first=True, enforce_sorted=False
            )
            y, (h, c) = self.lstm(packed)
            y, _ = nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=T)
            back = ((cols[None, :] - pad[:, None]) % T)[:, :, None].expand(-1, -1, y.size(-1))
            y = y.gather(1, back)
        if kv_cache is not None:
            kv_cache.h, kv_cache.c = h, c
            kv_cache.length += T
        y = self.drop(self.ln_f(y))
        if targets is None:
            return self.head(y[:, -1:, :] if last_only else y), None
        logits = self.head(y)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss
