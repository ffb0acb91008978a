#!/usr/bin/env bash
# Every Fashion-MNIST benchmark of docs/benchmarks.md, one after another, into runs/bench_fmnist (the shared
# 54k/6k split and MAE), their figures into docs/results/*.json and the results picture
# docs/results/fashion_mnist.png. Each script skips what is done and resumes what was interrupted, so this can run
# in the background and be started again after a stop:
#   nohup bash benchmarks/fmnist_all.sh > runs/fmnist_all.log 2>&1 &
# Run from anywhere; PYTHON and FASHION_MNIST override the interpreter and the IDX folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
FMNIST=${FASHION_MNIST:-../shared/datasets/fashion-mnist}
mkdir -p docs/results

# the rows with targets first: MAE -> finetune vs scratch and DeiT distillation

"$PY" benchmarks/finetune_fmnist.py --fashion-mnist "$FMNIST" --json docs/results/finetune.json
"$PY" benchmarks/linear_probe.py --fashion-mnist "$FMNIST" --json docs/results/probe.json # its raw-pixel L-BFGS sweep is slow (3,072-d)
# CLIP, then DETR, each on both cores (CLIP starts from the MAE and DETR from the finetuned MAE, both made by
# finetune_fmnist.py above). Not side by side on one thread each: DETR took 1.19 s a step on one thread beside
# another one-thread job against 0.39 s on two idle threads (AVX512-BF16 EPYC, bf16, 2026-12-06)
"$PY" benchmarks/clip_zeroshot.py --fashion-mnist "$FMNIST" --json docs/results/clip.json
"$PY" benchmarks/detr_fmnist.py --fashion-mnist "$FMNIST" --json docs/results/detr.json
# Swin last: UM-MAE and SimMIM pretraining plus three finetuning runs (about 65 min on 2 AVX512-BF16 EPYC cores)
"$PY" benchmarks/swin_fmnist.py --fashion-mnist "$FMNIST" --json docs/results/swin.json
"$PY" benchmarks/results_chart.py docs/results/{finetune,probe,clip,detr,swin}.json --out docs/results/fashion_mnist.png
