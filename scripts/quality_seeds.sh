#!/usr/bin/env bash
# Ours against --paper_compat over training seeds (issue: quality ahead at equal cost): for uni_pc,
# dpm_solver++ and ipndm at NFE 4, 6 and 10, learn with --seed 0, 1, 2 both ways from the same teacher
# files (scripts/teacher_pair.sh makes them) and measure each schedule's L2 to 1000 fresh teacher samples
# (and to their first 200, the set earlier tables used: at 4-10 NFE the per-sample distances are
# heavy-tailed, so 200 samples rank schedules less surely). Our default trainer (full_batch) draws no
# random numbers: its three seeds give one schedule, run three times to show it.
# Prints a Markdown table of medians and writes it to samples/quality_seeds/<config>.md. The mixture: ~6 min; the U-Net: ~25 min.
#
#   CFG=configs/digits_gmm.yml scripts/quality_seeds.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=teacher_pair.sh
source scripts/teacher_pair.sh
PY=${PY:-.venv/bin/python}
CFG=${CFG:-configs/digits_gmm.yml}
name=$(basename "$CFG" .yml)
root=train_data/paper_compat/$name
OUT=${OUT:-samples/quality_seeds}
mkdir -p "$OUT"
raw=$OUT/$name.txt
if [ -z "${TABLE_ONLY:-}" ]; then  # TABLE_ONLY=1: only the table, from the records of a run made before
FRESH_N=1000 teacher_pair "$CFG" "$root"
: > "$raw"
rm -rf "logs/quality_seeds/$name"  # every run trains and is timed (main.py would skip a finished run of the same options)
for solver in uni_pc dpm_solver++ ipndm; do for nfe in 4 6 10; do for mode in default paper; do for seed in 0 1 2; do
  flags=(); [ "$mode" = paper ] && flags=(--paper_compat)
  logs=logs/quality_seeds/$name/$mode
  start=$(date +%s.%N)
  "$PY" main.py --all_config "$CFG" "${flags[@]}" --data_dir "$data" --solver_name "$solver" --steps "$nfe" \
    --num_train 50 --num_valid 50 --main_train_batch_size 2 --main_valid_batch_size 50 --visualize false \
    --seed "$seed" --log_path "$logs" > /dev/null 2>&1
  secs=$("$PY" -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$start")
  run=$(ls -d "$logs/$solver-N$nfe-"*"-seed$seed" | head -n 1)
  l2=()
  for n in 1000 200; do
    dir=$OUT/$name/$mode-$solver-N$nfe-seed$seed-fresh$n
    "$PY" sample.py --all_config "$CFG" "${flags[@]}" --solver_name "$solver" --steps "$nfe" \
      --load_from "$run/best_v2.pt" --data_dir "$fresh" --num_samples "$n" --metrics teacher \
      --teacher_distances L2 --out_dir "$dir" > /dev/null 2>&1
    l2+=("$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['teacher']['L2'])" "$dir/metrics.json")")
  done
  echo "$solver $nfe $mode $seed ${l2[0]} $secs ${l2[1]}" >> "$raw"
done; done; done; done
fi
"$PY" - "$raw" "$CFG" > "$OUT/$name.md" <<'PYEOF'
import statistics as st, sys
d = {}
for line in open(sys.argv[1]):
    s, n, m, seed, l2, t, l2_200 = line.split()
    d.setdefault((s, int(n)), {}).setdefault(m, []).append((float(l2), float(t), float(l2_200)))
print("| solver | NFE | ours: median L2 | --paper_compat | ratio | ratio, first 200 | ours: median s | "
      "--paper_compat s |")
print("|---|---|---|---|---|---|---|---|")
for (s, n), v in d.items():
    a, b = (st.median(x[0] for x in v[k]) for k in ("default", "paper"))
    a2, b2 = (st.median(x[2] for x in v[k]) for k in ("default", "paper"))
    ta, tb = (st.median(x[1] for x in v[k]) for k in ("default", "paper"))
    print(f"| {s} | {n} | {a:.4g} | {b:.4g} | {a / b:.3f} | {a2 / b2:.3f} | {ta:.1f} | {tb:.1f} |")
print()
print(f"Medians over training seeds 0, 1, 2; L2 to 1000 fresh teacher samples (ratio, first 200: to the first 200 "
      f"of them); seconds per main.py command (start-up included, 2 shared cores); "
      f"`CFG={sys.argv[2]} scripts/quality_seeds.sh`")
PYEOF
cat "$OUT/$name.md"
