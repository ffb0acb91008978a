"""`python -m finetune --config FILE [key=value ...]`: evaluate a pretrained encoder (linear probe)."""
from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
