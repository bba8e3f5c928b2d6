"""``python -m lmkit`` is the ``lmkit`` command line, and the torchrun entry point.

``python -m lmkit train ...`` = ``lmkit train ...``; ``torchrun --nproc_per_node=N -m lmkit train
...`` runs the same command on each of N ranks (`lmkit.cli`).
"""

import sys

from lmkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
