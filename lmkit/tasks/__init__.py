"""What a trained model is used for: the applications of chapter 8.

- `classify`: a pretrained GPT with a classification head, and a naive-Bayes baseline;
- `seq2seq`: a source-to-target mapping learnt by a decoder-only GPT (the source as its prompt);
- `datasets`: the labelled and the parallel text of those tasks, read offline from installed packages;
- `diversity`: distinct-n, how repetitive generated text is;
- `interpret`: attention maps recomputed from a model, and the loss at each position of its
  context (chapter 4 uses it too).

They build on the system (`lmkit.model`, `lmkit.generate`, `lmkit.data`) and never on the engine
(`lmkit.parallel`) or the harnesses (`lmkit.lab`).
"""
