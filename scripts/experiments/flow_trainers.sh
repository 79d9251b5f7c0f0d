#!/usr/bin/env bash
# The embedded flow model (configs/digits_flow.yml): --trainer rounds (its config's) against full_batch (the
# default elsewhere, robust objective), uni_pc at NFE 4, 6, 8, seeds 0-2, on the demo's 200 teacher files
# (100 + 100; full_batch with --fb_chunk 50, as digits.yml); L2 to 500 fresh teacher samples (sample.py runs the config's teacher on fresh noise) and the
# main.py command's seconds. One line per run to OUT (default /tmp/flow_trainers.txt).
#
#   scripts/experiments/flow_trainers.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
CFG=configs/digits_flow.yml
OUT=${OUT:-/tmp/flow_trainers.txt}
LOGS=${LOGS:-/tmp/flow_trainers}
"$PY" gen_data.py --all_config "$CFG" --total_samples 200 --sampling_batch_size 200 --steps 20 --solver_name uni_pc \
  --skip_type time_uniform --save_pt --data_dir "$LOGS/train_data" > /dev/null 2>&1
data=$LOGS/train_data/uni_pc_NFE20_time_uniform_seed0
for nfe in ${NFES:-4 6 8}; do for trainer in ${TRAINERS:-rounds full_batch}; do for seed in ${SEEDS:-0 1 2}; do
  logs=$LOGS/$trainer
  extra=(); [ "$trainer" = full_batch ] && extra=(--fb_chunk 50)  # as digits.yml (the flow config's batch is 1)
  start=$(date +%s.%N)
  "$PY" main.py --all_config "$CFG" --trainer "$trainer" "${extra[@]}" --data_dir "$data" --steps "$nfe" --num_train 100 \
    --num_valid 100 --visualize false --seed "$seed" --log_path "$logs" > /dev/null 2>&1
  secs=$("$PY" -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$start")
  run=$(ls -d "$logs/uni_pc-N$nfe-"*"-seed$seed" | head -n 1)
  dir=$LOGS/eval/$trainer-N$nfe-seed$seed
  "$PY" sample.py --all_config "$CFG" --steps "$nfe" --load_from "$run/best_v2.pt" --num_samples 500 \
    --metrics teacher --teacher_distances L2 --out_dir "$dir" > /dev/null 2>&1
  l2=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['teacher']['L2'])" "$dir/metrics.json")
  echo "uni_pc $nfe $trainer $seed $l2 $secs" | tee -a "$OUT"
done; done; done
