"""Heads on pretrained encoders: linear probing (more heads to come: finetuning, distillation, detection)."""
