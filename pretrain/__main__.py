"""`python -m pretrain [--config FILE] [key=value ...]`: MAE pretraining (the CPU demo when given nothing)."""
from __future__ import annotations

from .cli import exit_with, main

if __name__ == "__main__":
    exit_with(main)
