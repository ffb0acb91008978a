"""`python -m pretrain [--config FILE] [key=value ...]`: MAE pretraining (the CPU demo when given nothing)."""
from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
