"""`python -m finetune --config FILE [key=value ...]`: evaluate or adapt a pretrained encoder (linear probe,
zero-shot, finetune, distillation)."""
from __future__ import annotations

from pretrain.cli import exit_with

from .cli import main

if __name__ == "__main__":
    exit_with(main)
