"""Self-supervised pretraining: MAE over ViT, run by one accelerate-based training engine."""
