"""The models the book compares the Transformer with, each judged by bits per byte of one text.

- `ngram`: word n-gram models with add-k and (modified) Kneser-Ney smoothing (chapter 1; chapter 4
  fits one on characters);
- `neural_lm`: Bengio et al.'s neural language model over a fixed window (chapter 1);
- `embeddings`: skip-gram word embeddings with negative sampling (chapter 1);
- `wordcode`: the whole cost of a text under a word model, for an honest bits per byte (chapter 1);
- `lstm`: the recurrent language model of the source document (chapter 4), which
  `lmkit.model.build_model` builds for ``arch="lstm"``.

They build on the system (`lmkit.model`, `lmkit.metrics`) and never on the engine
(`lmkit.parallel`) or the harnesses (`lmkit.lab`).
"""
