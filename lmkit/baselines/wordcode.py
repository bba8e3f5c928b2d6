"""The whole cost of a text under a word-level language model, for an honest bits per byte.

A word model predicts tokens, not bytes. Divided by the bytes of the text, its negative
log-likelihood would leave three things unpaid for, and look better than it is:

1. **out-of-vocabulary words**: the model predicts ``<unk>``, a class of words, not the word;
   its spelling must still be coded. `WordCoder` spells each one with a character-level
   Kneser-Ney model trained on the rare words of the training text (a word ends with ``</s>``);
   a character that speller never saw costs 8 bits per UTF-8 byte.
2. **spacing**: ``wordpunct_tokenize`` drops the whitespace between tokens ("earth." and
   "earth ." give the same tokens). The coder predicts each gap (the exact string between two
   tokens, or before the first and after the last token of a line) from the kinds of its two
   neighbours (word, punctuation or line edge), with add-1/2 counts from the training text.
3. **line breaks**: the model's ``</s>`` codes the newline, blank lines included, provided the
   word model is scored on ``tokenize_words(text, lowercase=False, keep_blank=True)``.

With these, tokens + gaps + newlines reconstruct every line exactly (`WordCoder.split` checks
it), so the total is the length of a real code for the text and bits per byte compare a word
model with a character or BPE model on equal terms. Case is kept: lowercasing would discard
information the other models pay for.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from lmkit.baselines.ngram import KneserNeyLM
from lmkit.metrics import bits_per_byte

__all__ = ["TextCost", "WordCoder"]

_TOKEN = re.compile(r"\w+|[^\w\s]+")  # nltk's wordpunct_tokenize
_BYTE_NATS = math.log(256)


def _kind(token: str | None) -> str:
    if token is None:
        return "edge"
    return "word" if token[0].isalnum() or token[0] == "_" else "punct"


@dataclass(frozen=True)
class TextCost:
    """The parts of the code length of a text, in nats, and its size in bytes."""

    words_nats: float      # the word model's NLL of its tokens (words or <unk>, and </s>)
    spelling_nats: float   # spelling the out-of-vocabulary words
    spacing_nats: float    # the whitespace between tokens
    n_bytes: int
    n_oov: int

    @property
    def total_nats(self) -> float:
        return self.words_nats + self.spelling_nats + self.spacing_nats

    @property
    def bits_per_byte(self) -> float:
        """Bits per byte of the whole text: the yardstick shared with character and BPE models."""
        return self.total_nats / math.log(2) / self.n_bytes

    @property
    def words_only_bits_per_byte(self) -> float:
        """What dividing the word NLL alone by the bytes would claim (an underestimate)."""
        return self.words_nats / math.log(2) / self.n_bytes


class WordCoder:
    """Codes what a word model leaves out (OOV spellings, spacing), trained on the training text.

    Args:
        train_text: the training text (the speller and the spacing model are fitted on it).
        vocabulary: the words the word model predicts; any other word is spelled.
        speller_order: the order of the character n-gram speller, trained on the training
            tokens outside `vocabulary` (or, if there are none, on the words seen once).
    """

    def __init__(self, train_text: str, vocabulary: Iterable[str], speller_order: int = 4) -> None:
        self.vocabulary = set(vocabulary)
        rare, gaps, counts = [], Counter(), Counter()
        for line in train_text.splitlines():
            tokens, between = self.split(line)
            rare.extend(t for t in tokens if t not in self.vocabulary)
            counts.update(tokens)
            gaps.update(self._events(tokens, between))
        if not rare:  # a vocabulary of every training word: spell like the words seen once
            rare = [w for w, c in counts.items() if c == 1]
        if not rare:
            raise ValueError("the training text has no rare word to train the speller on")
        self.speller = KneserNeyLM(order=speller_order, min_count=1).fit([list(w) for w in rare])
        self._gaps = gaps
        self._context_totals: Counter = Counter()
        self._strings: dict[tuple[str, str], set[str]] = {}
        for (context, gap), c in gaps.items():
            self._context_totals[context] += c
            self._strings.setdefault(context, set()).add(gap)

    @staticmethod
    def split(line: str) -> tuple[list[str], list[str]]:
        """Tokens of `line` and the len(tokens) + 1 gaps around them; joined, they give `line` back."""
        tokens, gaps, end = [], [], 0
        for match in _TOKEN.finditer(line):
            gaps.append(line[end : match.start()])
            tokens.append(match.group())
            end = match.end()
        gaps.append(line[end:])
        rebuilt = "".join(g + t for g, t in zip(gaps, tokens, strict=False)) + gaps[-1]
        assert rebuilt == line, "tokens and gaps must reconstruct the line"
        return tokens, gaps

    @staticmethod
    def _events(tokens: list[str], gaps: list[str]) -> Iterable[tuple[tuple[str, str], str]]:
        padded = [None, *tokens, None]
        for i, gap in enumerate(gaps):
            yield (_kind(padded[i]), _kind(padded[i + 1])), gap

    def spelling_nats(self, word: str) -> float:
        """-ln P(spelling) of a word under the character speller (plus 8 bits per unseen character's byte)."""
        nll, _ = self.speller.nll([list(word)])
        unseen = [ch for ch in word if ch not in self.speller.index]
        return nll + sum(len(ch.encode("utf-8")) for ch in unseen) * _BYTE_NATS

    def gap_nats(self, context: tuple[str, str], gap: str) -> float:
        """-ln P(gap | the kinds of its neighbours), add-1/2 over the gap strings seen in that context."""
        seen = self._strings.get(context, set())
        denominator = self._context_totals[context] + 0.5 * (len(seen) + 1)  # + 1: an escape
        if gap in seen:
            return -math.log((self._gaps[(context, gap)] + 0.5) / denominator)
        return -math.log(0.5 / denominator) + len(gap.encode("utf-8")) * _BYTE_NATS + _BYTE_NATS

    def cost(self, words_nats: float, text: str) -> TextCost:
        """The code length of `text` given the word model's total NLL of its tokens."""
        spelling = spacing = 0.0
        n_oov = 0
        for line in text.splitlines():
            tokens, gaps = self.split(line)
            for token in tokens:
                if token not in self.vocabulary:
                    spelling += self.spelling_nats(token)
                    n_oov += 1
            spacing += sum(self.gap_nats(context, gap) for context, gap in self._events(tokens, gaps))
        n_bytes = len(text.encode("utf-8"))
        bits_per_byte(words_nats + spelling + spacing, text)  # validates the total
        return TextCost(words_nats, spelling, spacing, n_bytes, n_oov)
