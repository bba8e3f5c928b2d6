"""The lab: harnesses that run the system and measure it, for the book's chapters and its tests.

- `layouts`: train parallel layouts and measure them: loss curves, bytes per collective,
  timelines, memory at start, ideal pipeline schedules (chapters 5 and 6);
- `experiments`: the chapter-6 program, ``python -m lmkit.lab.experiments chapter6 --out DIR``,
  and the reading of its results folder (chapter 6);
- `ring_check`: ring attention against full attention on real processes (chapter 5);
- `collectives_tour`: the five collectives on numbers small enough to read, on real processes
  (chapter 5);
- `time_to_loss`: recipes compared by the training time to a target loss (chapter 7);
- `efficiency`: memory, size, speed and quality of a model, and int8 weights (chapters 2 and 7;
  ``lmkit generate --int8``);
- `blocks`: the Transformer block's parts by hand, a post-norm variant, the residual stream read
  with hooks (chapter 2);
- `scaling`: a compute sweep of model sizes at fixed FLOP budgets, IsoFLOP fits and the
  compute-optimal size (chapter 3);
- `positions`: learned, sinusoidal and rotary positions from their formulas (chapter 1);
- `seedcode`: the source document's section 5.2 program run statement by statement, each error
  reported and the smallest fix applied to reach the next (chapter 4);
- `likelihood`: negative log-likelihood, perplexity and bits per byte of a text (chapters 1, 4, 8);
- `textprep`: cleaning, Chinese segmentation and what BPE learnt (chapter 2);
- `plots`, `live`: figures, and a live loss curve while a notebook trains (chapters 1, 4, 5, 6);
- `tables`: tables a notebook shows as rendered HTML that fits the column (every chapter);
- `report`: the key figures a notebook records for the regression tests (every chapter).

The lab sits on top: it may use everything below it (the trainer, the engine, the baselines);
nothing outside it imports it but the command line (``tests/test_layering.py``).
"""
