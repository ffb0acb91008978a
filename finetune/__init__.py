"""Heads on pretrained encoders (`python -m finetune`): linear probe, zero-shot classification with prompt
ensembles, full finetuning and DeiT distillation, DETR detection. Every head gets its encoder from
`pretrain.encoders.build_encoder` and trains through `pretrain.engine.Trainer`."""
