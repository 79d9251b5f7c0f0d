#!/usr/bin/env bash
# Seconds per main.py command, ours against --paper_compat, alternating, training seeds 0-2, REPS times each,
# for CELLS ("solver nfe", comma-separated): a closer look at cells whose 3-run medians in
# scripts/quality_seeds.sh are within the machine's run-to-run noise. Needs that script's teacher files.
#
#   CFG=configs/digits_gmm.yml CELLS="dpm_solver++ 6,ipndm 6" REPS=3 scripts/experiments/timing_repeat.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
CFG=${CFG:-configs/digits_gmm.yml}
CELLS=${CELLS:-dpm_solver++ 6,ipndm 6}
REPS=${REPS:-3}
name=$(basename "$CFG" .yml)
data=train_data/paper_compat/$name/train/uni_pc_NFE20_edm_seed0
tmp=$(mktemp -d)
raw=$tmp/times.txt
IFS=, read -r -a cells <<< "$CELLS"
for rep in $(seq "$REPS"); do for cell in "${cells[@]}"; do
  read -r solver nfe <<< "$cell"
  for seed in 0 1 2; do for mode in default paper; do
    flags=(); [ "$mode" = paper ] && flags=(--paper_compat)
    start=$(date +%s.%N)
    "$PY" main.py --all_config "$CFG" "${flags[@]}" --data_dir "$data" --solver_name "$solver" --steps "$nfe" \
      --num_train 50 --num_valid 50 --main_train_batch_size 2 --main_valid_batch_size 50 --visualize false \
      --seed "$seed" --log_path "$tmp/logs/$rep/$mode" > /dev/null 2>&1
    echo "$solver $nfe $mode $("$PY" -c "import sys, time; print(time.time() - float(sys.argv[1]))" "$start")" >> "$raw"
  done; done
done; done
"$PY" - "$raw" <<'PYEOF'
import statistics as st, sys
d = {}
for line in open(sys.argv[1]):
    s, n, m, t = line.split()
    d.setdefault((s, n), {}).setdefault(m, []).append(float(t))
print("| solver | NFE | runs each | ours: median s | --paper_compat: median s |")
print("|---|---|---|---|---|")
for (s, n), v in d.items():
    print(f"| {s} | {n} | {len(v['default'])} | {st.median(v['default']):.2f} | {st.median(v['paper']):.2f} |")
PYEOF
rm -rf "$tmp"
