#!/bin/bash
# Issue #13: the methods published since the seeds (FZOO, Sparse-MeZO, DiZO, LOZO, LOZO-M, SubZero,
# ZO-Muon, LeZO = ZO-SGD with layer_fraction) against ZO-SGD and ZO-Adam on SST-2 and RTE,
# SmolLM2-135M, top:2 (every weight of the last 2 blocks + final norm: 7.08M; the 28 blocks
# below run once per example through the shared activation store), 200 forwards per cell.
#   1. probe: SST-2, seed 13, a 3-7 point lr grid per method, dev (200 examples) at the end;
#   2. race:  SST-2 and RTE, seeds 13, 21, 42, each method at the lr its probe chose on dev,
#             dev every 40 forwards (converted per method to steps), test once at the end.
# docs/race.md ("The new methods") has the results and the CPU time (about 3.3 CPU-hours).
#   RUNS=runs/race13 scripts/race_new_methods.sh        # resumable: rerun to continue
set -euo pipefail
RUNS=${RUNS:-runs/race13}
ZOTUNE=${ZOTUNE:-zotune}
PY=${PY:-python}
export HF_HUB_OFFLINE=1
COMMON=(--peft top:2 --set k=500 --set max_train=500 --set max_dev=200 --set max_test=500 --set max_length=128
        --set batch_size=16 --set "cache_dir=$RUNS/activations" --threads 1 --jobs 2)
METHODS=zosgd,zoadam,fzoo,sparse-mezo,dizo,lozo,lozo-m,subzero,zo-muon,zosgd:layer_fraction=0.34
# the race reported in docs/race.md left LeZO (probe only: 3 layer units under top:2) out of step 2
MAIN=${MAIN:-zosgd,zoadam,fzoo,sparse-mezo,dizo,lozo,lozo-m,subzero,zo-muon}

"$ZOTUNE" race --tasks sst2 --seeds 13 --forwards 200 --eval-every 0 "${COMMON[@]}" --optimizers "$METHODS" \
  --lr zosgd=3e-5,1e-4,3e-4,1e-3,3e-3 --lr zoadam=1e-5,3e-5,1e-4,3e-4,1e-3,3e-3,1e-2 \
  --lr fzoo=1e-4,3e-4,1e-3,3e-3,1e-2,3e-2 --lr sparse-mezo=1e-4,3e-4,1e-3,3e-3 --lr dizo=1e-4,3e-4,1e-3,3e-3 \
  --lr lozo=3e-4,1e-3,3e-3 --lr lozo-m=1e-4,3e-4,1e-3,3e-3,1e-2 --lr subzero=3e-4,1e-3,3e-3 \
  --lr zo-muon=1e-3,3e-3,1e-2,3e-2,1e-1 --lr zosgd:layer_fraction=0.34=3e-4,1e-3,3e-3 \
  --output-dir "$RUNS/probe"

# the probe's report chose each method's lr on dev (ties: the smaller lr); pass it on per method
LRS=$("$PY" - "$RUNS/probe/summary.json" "$MAIN" <<'EOF'
import json, sys
rows = {r["method"]: r["lr"] for r in json.load(open(sys.argv[1]))["rows"] if r["kind"] == "train"}
labels = {"zosgd": "ZOSGD", "zoadam": "ZOAdam", "fzoo": "FZOO", "sparse-mezo": "SparseMeZO", "dizo": "DiZO",
          "lozo": "LOZO", "lozo-m": "LOZOM", "subzero": "SubZero", "zo-muon": "ZOMuon",
          "zosgd:layer_fraction=0.34": "ZOSGD(layer_fraction=0.34)"}
print(" ".join(f"--lr {spec}={rows[labels[spec]]:g}" for spec in sys.argv[2].split(",")))
EOF
)
echo "lr chosen on SST-2 dev: $LRS"
# shellcheck disable=SC2086
"$ZOTUNE" race --tasks sst2,rte --seeds 13,21,42 --forwards 200 --eval-every-forwards 40 --baselines zeroshot \
  "${COMMON[@]}" --optimizers "$MAIN" $LRS --output-dir "$RUNS/main"
