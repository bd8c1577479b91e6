#!/bin/bash
# Issue #14: test accuracy reached in ~10 CPU-minutes end to end (1 thread), the demo recipe
# (final_norm) against the best cached depth mode, on SST-2 (MeZO template), RTE and CB.
# Each run: one `zotune train` under /usr/bin/time -v (user + sys = CPU time, wall clock),
# steps sized from dev-only pilots so that model load + cache build + evaluations + steps ~ 600 CPU-s.
#   scripts/cache_runs.sh NAME [NAME ...]     # run some rows (names below), results in $RUNS/NAME
#   scripts/cache_runs.sh --list              # print the commands
# Summarise with: python scripts/cache_runs_table.py $RUNS/*
set -euo pipefail
RUNS=${RUNS:-/work/runs/cache14/final}
PY=${PY:-python}
COMMON=(--threads 1 --no-progress --seed 0 --optimizer zosgd --batch-size 16 --overwrite)
declare -A ROW
# SST-2 (LM-BFF k=16, data seed 42, MeZO template, first 500 of GLUE dev as test): configs/demo.yaml
ROW[sst2-final_norm]="--config configs/demo.yaml --peft final_norm --lr 2e-2 --eps 1e-2 --steps 800 --eval-every 50"
ROW[sst2-top2]="--config configs/demo.yaml --peft top:2 --lr ${TOP2_LR:-1e-4} --eps 1e-3 --steps 600 --eval-every 50"
ROW[sst2-lora2]="--config configs/demo.yaml --peft lora --lora-layers top:2 --lr ${LORA_LR:-3e-2} --eps 1e-2 --steps 600 --eval-every 50"
# RTE (LM-BFF k=16, data seed 42, lmbff template; test = the 277 GLUE dev examples)
ROW[rte-final_norm]="--task rte --max-test 277 --peft final_norm --lr 2e-2 --eps 1e-2 --steps ${RTE_FN_STEPS:-1200} --eval-every 50"
ROW[rte-top2]="--task rte --max-test 277 --peft top:2 --lr ${TOP2_LR:-1e-4} --eps 1e-3 --steps ${RTE_TOP2_STEPS:-270} --eval-every 25"
ROW[rte-lora2]="--task rte --max-test 277 --peft lora --lora-layers top:2 --lr ${LORA_LR:-3e-2} --eps 1e-2 --steps ${RTE_TOP2_STEPS:-270} --eval-every 25"
# CB (SuperGLUE, MeZO protocol: 150 train / 100 dev drawn from train, test = the 56 labelled val examples)
ROW[cb-final_norm]="--task cb --peft final_norm --lr 2e-2 --eps 1e-2 --steps ${CB_FN_STEPS:-800} --eval-every 50"
ROW[cb-top2]="--task cb --peft top:2 --lr ${TOP2_LR:-1e-4} --eps 1e-3 --steps ${CB_TOP2_STEPS:-150} --eval-every 25"
ROW[cb-lora2]="--task cb --peft lora --lora-layers top:2 --lr ${LORA_LR:-3e-2} --eps 1e-2 --steps ${CB_TOP2_STEPS:-150} --eval-every 25"
if [[ "${1:-}" == "--list" ]]; then
  for name in "${!ROW[@]}"; do echo "$name: zotune train ${ROW[$name]} ${COMMON[*]} --output-dir $RUNS/$name"; done | sort
  exit 0
fi
mkdir -p "$RUNS"
for name in "$@"; do
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 /usr/bin/time -v -o "$RUNS/$name.time" \
    $PY -m zotune train ${ROW[$name]} "${COMMON[@]}" --output-dir "$RUNS/$name" > "$RUNS/$name.log" 2>&1
done
