"""``python -m pgot {precompute,train,eval,fetch,config} ...`` (the ``pgot`` command; see :mod:`pgot.cli`).

This form is what ``accelerate launch -m pgot train --config ...`` and ``torchrun -m pgot train ...``
start on every process.
"""

from __future__ import annotations

import sys

from pgot.cli import main

if __name__ == "__main__":
    sys.exit(main())
