#!/usr/bin/env bash
# Every Fashion-MNIST benchmark of docs/benchmarks.md, one after another, into runs/bench_fmnist (the shared
# 54k/6k split and MAE) and runs/bench_detr (DETR's canvases), their figures into docs/results/*.json and the
# results picture docs/results/fashion_mnist.png. Each script skips what is done and resumes what was interrupted,
# so this can run in the background and be started again after a stop:
#   nohup bash benchmarks/fmnist_all.sh > runs/fmnist_all.log 2>&1 &
# Run from anywhere; PYTHON and FASHION_MNIST override the interpreter and the IDX folder; WORK_DIR, DETR_WORK_DIR
# and RESULTS_DIR the three folders (a second, independent run of the whole list, e.g. to time it from nothing:
#   mkdir -p runs/again && WORK_DIR=runs/again/bench_fmnist DETR_WORK_DIR=runs/again/bench_detr \
#     RESULTS_DIR=runs/again/results nohup bash benchmarks/fmnist_all.sh > runs/again/fmnist_all.log 2>&1 &).
set -euo pipefail

# bash reads a script as it runs it: the whole list is one function, read before it starts, so that editing this
# file during the hours it runs changes the next run, not this one
main() {
  cd "$(dirname "$0")/.."
  PY=${PYTHON:-.venv/bin/python}
  FMNIST=${FASHION_MNIST:-../shared/datasets/fashion-mnist}
  WORK=${WORK_DIR:-runs/bench_fmnist}
  DETR_WORK=${DETR_WORK_DIR:-runs/bench_detr}
  RESULTS=${RESULTS_DIR:-docs/results}
  mkdir -p "$RESULTS"

  # every start names the machine and the time, as the steps' wall times depend on both
  started() { echo "== $(date -u '+%F %T UTC') $1 on $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)," \
                   "$(nproc) cores$(grep -o -m1 -w -e amx_bf16 -e avx512_bf16 /proc/cpuinfo | sed 's/^/, /' | tr -d '\n')"; }

  # the rows with targets first: MAE -> finetune vs scratch and DeiT distillation
  started finetune_fmnist.py
  "$PY" benchmarks/finetune_fmnist.py --fashion-mnist "$FMNIST" --work-dir "$WORK" --json "$RESULTS/finetune.json"
  started linear_probe.py  # its raw-pixel L-BFGS sweep is slow (3,072-d)
  "$PY" benchmarks/linear_probe.py --fashion-mnist "$FMNIST" --work-dir "$WORK" --json "$RESULTS/probe.json"
  # CLIP, then DETR, each on both cores (CLIP starts from the MAE and DETR from the finetuned MAE, both made by
  # finetune_fmnist.py above). Not side by side on one thread each: DETR took 1.19 s a step on one thread beside
  # another one-thread job against 0.39 s on two idle threads (AVX512-BF16 EPYC, bf16, 2026-12-06)
  started clip_zeroshot.py
  "$PY" benchmarks/clip_zeroshot.py --fashion-mnist "$FMNIST" --work-dir "$WORK" --json "$RESULTS/clip.json"
  started detr_fmnist.py
  "$PY" benchmarks/detr_fmnist.py --fashion-mnist "$FMNIST" --work-dir "$DETR_WORK" \
      --backbone "$WORK/finetune_mae/last" --json "$RESULTS/detr.json"
  # Swin last: UM-MAE and SimMIM pretraining plus three finetuning runs (about 65 min on 2 AVX512-BF16 EPYC cores)
  started swin_fmnist.py
  "$PY" benchmarks/swin_fmnist.py --fashion-mnist "$FMNIST" --work-dir "$WORK" --json "$RESULTS/swin.json"
  started results_chart.py
  "$PY" benchmarks/results_chart.py "$RESULTS"/{finetune,probe,clip,detr,swin}.json --out "$RESULTS/fashion_mnist.png"
  started "done:"
}
main "$@"; exit
