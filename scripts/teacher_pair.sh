# Sourced by paper_compat.sh, departures.sh and quality_seeds.sh: the teacher files they share, from
# config $1 under $2: 100 seed-0 samples to learn from and FRESH_N (default 200) seed-1 samples to measure
# on (UniPC, 20 NFE, edm; each sample's noise depends on its index alone, so the first 200 of 1000 are the
# 200). Sets $data and $fresh to the two folders.
teacher_pair() {
  local cfg=$1 root=$2
  "$PY" gen_data.py --all_config "$cfg" --total_samples 100 --sampling_batch_size 50 --steps 20 \
    --solver_name uni_pc --skip_type edm --save_pt --data_dir "$root/train" --seed 0
  "$PY" gen_data.py --all_config "$cfg" --total_samples "${FRESH_N:-200}" --sampling_batch_size 50 --steps 20 \
    --solver_name uni_pc --skip_type edm --save_pt --data_dir "$root/fresh" --seed 1
  data=$root/train/uni_pc_NFE20_edm_seed0
  fresh=$root/fresh/uni_pc_NFE20_edm_seed1
}
