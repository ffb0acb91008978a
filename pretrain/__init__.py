"""Self-supervised pretraining (`python -m pretrain`): MAE over ViT, UM-MAE and SimMIM over Swin, CLIP through
open_clip; and the shared core every run uses, pretraining and heads alike:

    config.py      configs as typed dataclasses, the shared sections (data, optim, train, logging, encoder)
    run.py         run set-up: accelerator, output folder, shards, the training stream
    engine.py      the one training loop (Trainer), resumable exactly
    tasks.py       the Task protocol between a model and the loop; the pretraining tasks
    evaluation.py  the one evaluator of training runs: metrics.json, best/ and last/ weights
    monitor.py     what that evaluator measures during pretraining: k-NN (MAE family), zero-shot and retrieval (CLIP)
    checkpoint.py  checkpoints, the one weights reader and writer, the mismatch report
    encoders.py    the one road from any of our checkpoints to a timm encoder
    cli.py         the command-line helpers every entry point shares (one-line errors, exit statuses)
    models/        MAE, UM-MAE, SimMIM, CLIP models and the model registry
"""
