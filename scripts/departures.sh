#!/usr/bin/env bash
# One departure at a time (README, "Departures from the paper's code"): learn with --paper_compat, then
# with --paper_compat and a single option set back to ours, from the same teacher files; measure each
# schedule's L2 to 1000 fresh teacher samples and the training time. Writes samples/departures/<config>.md.
# CPU, the mixture: ~5 min.
#
#   scripts/departures.sh                                  # configs/digits_gmm.yml, uni_pc NFE 4 and dpm_solver++ NFE 6
#   CFG=configs/digits.yml RUNS="uni_pc:4" scripts/departures.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=teacher_pair.sh
source scripts/teacher_pair.sh

PY=${PY:-.venv/bin/python}
CFG=${CFG:-configs/digits_gmm.yml}
RUNS=${RUNS:-uni_pc:4 dpm_solver++:6}
OUT=${OUT:-samples/departures}
name=$(basename "$CFG" .yml)
root=train_data/paper_compat/$name
mkdir -p "$OUT"
FRESH_N=1000 teacher_pair "$CFG" "$root"

# label|flags (on top of --paper_compat); "paper" = all of the paper's values, "ours" = none of them
VARIANTS=(
  "paper|"
  "trainer full_batch|--trainer full_batch"
  "valid_every 10|--valid_every 10"
  "valid_use train|--valid_use train"
  "eval_on_one false|--eval_on_one false"
  "latent_step sample|--latent_step sample"
  "latent_check same_times|--latent_check same_times"
  "reload_latents false|--reload_latents false"
  "window schedule|--window schedule"
  "order_rng private|--order_rng private"
  "arithmetic fast|--arithmetic fast"
  "dpmpp_3m exact|--dpmpp_3m exact"
  "ours with --trainer rounds|OURS_ROUNDS"
  "ours (no --paper_compat)|OURS"
)
table=$OUT/$name.md
{
  printf "| --paper_compat, but | "; for r in $RUNS; do printf "%s NFE %s: L2 | train s | " "${r%%:*}" "${r##*:}"; done; echo
  printf "|---|"; for r in $RUNS; do printf -- "---|---|"; done; echo
} > "$table"
for v in "${VARIANTS[@]}"; do
  label=${v%%|*}; extra=${v#*|}
  case $extra in
    OURS) flags=() ;;
    OURS_ROUNDS) flags=(--trainer rounds) ;;
    *) flags=(--paper_compat $extra) ;;
  esac
  slug=$(echo "$label" | tr -c 'a-zA-Z0-9_\n' '_')
  row="| $label |"
  for r in $RUNS; do
    solver=${r%%:*}; nfe=${r##*:}
    if [ "$label" = "dpmpp_3m exact" ] && [ "$solver" != dpm_solver++ ]; then row="$row (no effect) | |"; continue; fi
    logs=logs/departures/$name/$slug
    "$PY" main.py --all_config "$CFG" "${flags[@]}" --data_dir "$data" --solver_name "$solver" --steps "$nfe" \
      --num_train 50 --num_valid 50 --main_train_batch_size 2 --main_valid_batch_size 50 --visualize false \
      --log_path "$logs" 2>/dev/null
    run=$(ls -d "$logs/$solver-N$nfe-"*"-seed0" | head -n 1)
    out=$OUT/$name/$slug-$solver-N$nfe
    "$PY" sample.py --all_config "$CFG" "${flags[@]}" --solver_name "$solver" --steps "$nfe" \
      --load_from "$run/best_v2.pt" --data_dir "$fresh" --num_samples 1000 --metrics teacher \
      --teacher_distances L2 --out_dir "$out" > /dev/null 2>&1
    cell=$("$PY" -c "import json,sys; m=json.load(open(sys.argv[1])); r=json.load(open(sys.argv[2])); print(f\"{m['teacher']['L2']:.4g} | {r['timing']['wall_train_s']:.1f} |\")" \
      "$out/metrics.json" "$run/result.json")
    row="$row $cell"
  done
  echo "$row" >> "$table"
done
{
  echo
  echo "L2 to 1000 fresh teacher samples (uni_pc bh2 order 3, 20 NFE, edm), batch 2 / 50; \`CFG=$CFG scripts/departures.sh\`"
} >> "$table"
cat "$table"
