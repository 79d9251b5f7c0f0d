#!/usr/bin/env bash
# The README's results tables: LD3 against every baseline discretization, on the analytic digits
# mixture (configs/digits_gmm.yml), for uni_pc and ipndm at NFE 4, 6 and 8. CPU only, a few minutes.
#
#   scripts/compare.sh                    # writes samples/digits_gmm/compare/<solver>_<metric>/comparison.{md,csv,png}
#   CFG=configs/digits.yml scripts/compare.sh   # the same for another config
#   CFG=configs/digits_flow.yml TEACHER_SKIP=time_uniform N_DATA=200 N_TRAIN=100 scripts/compare.sh   # the flow model
#
# Each comparison.md is the table to paste into the README (it ends with the command that made it).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
CFG=${CFG:-configs/digits_gmm.yml}
NAME=$(basename "$CFG" .yml)
NFES=${NFES:-4,6,8}
SOLVERS=${SOLVERS:-uni_pc ipndm}
DATA_ROOT=${DATA_ROOT:-train_data/$NAME}
LOGS=${LOGS:-logs/$NAME}
OUT=${OUT:-samples/$NAME/compare}
N_TEACHER=${N_TEACHER:-1000}   # fresh noises per cell, distance to the teacher
N_DIGITS=${N_DIGITS:-360}      # fresh noises per cell, digit Frechet distance (= held-out digits: floor comparable)
TEACHER_SKIP=${TEACHER_SKIP:-edm}  # the teacher's grid
N_DATA=${N_DATA:-100}            # teacher samples
N_TRAIN=${N_TRAIN:-50}           # LD3's training samples (and as many for validation)

# teacher data: uni_pc, 20 NFE, edm (the paper's default teacher; the flow model's config: time_uniform)
"$PY" gen_data.py --all_config "$CFG" --total_samples "$N_DATA" --sampling_batch_size 50 --steps 20 \
  --solver_name uni_pc --skip_type "$TEACHER_SKIP" --save_pt --data_dir "$DATA_ROOT"
DATA="$DATA_ROOT/uni_pc_NFE20_${TEACHER_SKIP}_seed0"

for solver in $SOLVERS; do
  runs=()
  for nfe in ${NFES//,/ }; do
    "$PY" main.py --all_config "$CFG" --data_dir "$DATA" --solver_name "$solver" --steps "$nfe" \
      --num_train "$N_TRAIN" --num_valid "$N_TRAIN" --log_path "$LOGS"
    runs+=("$(ls -d "$LOGS/$solver-N$nfe-"*"-seed0" | head -n 1)")
  done
  run_list=$(IFS=,; echo "${runs[*]}")
  "$PY" sample.py --all_config "$CFG" --compare --solver_name "$solver" --nfes "$NFES" --runs "$run_list" \
    --data_dir "$DATA" --metric teacher --num_samples "$N_TEACHER" --out_dir "$OUT/${solver}_teacher"
  "$PY" sample.py --all_config "$CFG" --compare --solver_name "$solver" --nfes "$NFES" --runs "$run_list" \
    --data_dir "$DATA" --metric digit_fd --num_samples "$N_DIGITS" --out_dir "$OUT/${solver}_digit_fd"
done
echo "tables: $OUT/*/comparison.md"
