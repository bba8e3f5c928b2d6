"""lmkit: a small but real GPT toolkit with a hand-written hybrid-parallel trainer.

Companion package of the book "Large Language Models from Theory to Practice: Hybrid
Parallelism". The book explains, lmkit does, the tests prove.
"""

__version__ = "0.1.0"
