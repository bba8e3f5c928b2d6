"""``python -m lmkit`` runs the ``lmkit`` command line."""

import sys

from lmkit.cli import main

sys.exit(main())
