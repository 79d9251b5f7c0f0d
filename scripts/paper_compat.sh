#!/usr/bin/env bash
# Our defaults against --paper_compat (README, "Departures from the paper's code"): for each config,
# solver and NFE, learn a schedule both ways from the same teacher files, then measure each one's L2
# to 200 fresh teacher samples (a second gen_data folder, another seed) with sample.py, each with
# its own arithmetic. Writes samples/paper_compat/<config>.md. CPU: the mixture in ~3 min, the
# U-Net in ~20.
#
#   scripts/paper_compat.sh                                # both embedded configs
#   CFGS=configs/digits_gmm.yml scripts/paper_compat.sh    # one
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=teacher_pair.sh
source scripts/teacher_pair.sh

PY=${PY:-.venv/bin/python}
CFGS=${CFGS:-configs/digits_gmm.yml configs/digits.yml}
SOLVERS=${SOLVERS:-uni_pc dpm_solver++}
NFES=${NFES:-4 6}
OUT=${OUT:-samples/paper_compat}
mkdir -p "$OUT"

for cfg in $CFGS; do
  name=$(basename "$cfg" .yml)
  root=train_data/paper_compat/$name
  # the paper's cifar10.yml batch sizes: 2 train samples per step (LD3's), 50 validation per batch
  common=(--all_config "$cfg" --num_train 50 --num_valid 50 --main_train_batch_size 2 --main_valid_batch_size 50
          --visualize false)
  teacher_pair "$cfg" "$root"
  table=$OUT/$name.md
  {
    echo "| solver | NFE | ours (default) | --paper_compat | ratio |"
    echo "|---|---|---|---|---|"
  } > "$table"
  for solver in $SOLVERS; do
    for nfe in $NFES; do
      l2=()
      for mode in default paper; do
        flags=(); [ "$mode" = paper ] && flags=(--paper_compat)
        logs=logs/paper_compat/$name/$mode
        "$PY" main.py "${common[@]}" "${flags[@]}" --data_dir "$data" --solver_name "$solver" --steps "$nfe" \
          --log_path "$logs"
        run=$(ls -d "$logs/$solver-N$nfe-"*"-seed0" | head -n 1)
        out=$OUT/$name/$mode-$solver-N$nfe
        "$PY" sample.py --all_config "$cfg" "${flags[@]}" --solver_name "$solver" --steps "$nfe" \
          --load_from "$run/best_v2.pt" --data_dir "$fresh" --num_samples 200 --metrics teacher \
          --teacher_distances L2 --out_dir "$out"
        l2+=("$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['teacher']['L2'])" "$out/metrics.json")")
      done
      "$PY" -c "import sys; a, b = map(float, sys.argv[3:5]); print(f'| {sys.argv[1]} | {sys.argv[2]} | {a:.4g} | {b:.4g} | {a / b:.2f} |')" \
        "$solver" "$nfe" "${l2[0]}" "${l2[1]}" >> "$table"
    done
  done
  echo "" >> "$table"
  echo "L2 to 200 fresh teacher samples (uni_pc bh2 order 3, 20 NFE, edm); \`CFGS=$cfg scripts/paper_compat.sh\`" >> "$table"
  cat "$table"
done
