#!/usr/bin/env python3
"""Speed and memory of LD3 learning (main.py) and teacher generation (gen_data.py).

    python bench/bench.py            # full: uni_pc and ipndm at NFE 4, 6, 10 (make bench)
    python bench/bench.py --short    # one solver, one NFE (CI)
    python bench/bench.py --quality  # ours vs --paper_compat, 3 training seeds, both embedded models (~25 min)

Every figure is measured in this run, side by side, on this machine:
- main.py with the config's defaults (plots on): wall time of the training, time inside network
  evaluations (forward + backward) and the loss, their ratio (overhead factor), network
  evaluations per sample (training, latent moves, validation), peak RSS, and the distance to the
  teacher on fresh noise;
- peak memory of one training step at NFE 4 and 10, with and without --low_gpu;
- gen_data.py images/s against the network-only bound (the same batches, no files);
- how often validation must run (--valid_every, the rounds trainer) for the selected schedule to stay as good;
- several processes (torchrun, gloo on CPUs, NCCL on GPUs): gen_data.py and sample.py with 1 and 2
  processes, and main.py's bytes all-reduced per optimizer step.
Results: bench/out/bench.md and bench.json, with the machine and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402


def sh(*args: str, env: dict | None = None) -> None:
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, **(env or {})))
    if r.returncode:
        sys.exit(f"command failed: {' '.join(args)}\n{r.stderr[-3000:]}")


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d %H:%M")}


# ------------------------------------------------------------------ memory probe (subprocess)
def _read_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def memprobe(config: str, solver: str, nfe: int, low_gpu: bool, batch: int) -> dict:
    """Peak memory of one LD3 training step (forward + backward through the solver)."""
    from ld3.config import parse_config
    from ld3.discretization import LearnedDiscretization
    from ld3.runtime import setup_device_and_model
    from ld3.student import Rollout, SolverSpec
    from ld3.samplers.solvers import steps_for_nfe

    cfg = parse_config(["--all_config", config, "--solver_name", solver, "--steps", str(nfe)])
    device, model = setup_device_and_model(cfg)
    disc = LearnedDiscretization(model.schedule, steps_for_nfe(solver, nfe)).to(device)
    roll = Rollout(model, SolverSpec.from_cfg(cfg), low_gpu=low_gpu)
    z = torch.randn(batch, *model.latent_shape, device=device, requires_grad=True)
    target = torch.zeros(batch, *model.info.get("img_shape", model.latent_shape), device=device)

    def step():
        t, tp = disc()
        loss = (roll(z, (t, tp)) - target).pow(2).mean()
        loss.backward()

    step()  # warm-up: allocator pools, lazy inits
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return {"peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20, "kind": "cuda allocated"}
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) of this process
    base = _read_status("VmRSS:")
    step()
    return {"peak_mb": (_read_status("VmHWM:") - base) / 2**20, "kind": "RSS above the step's start"}


# ------------------------------------------------------------------ pieces of the benchmark
def teacher_data(config: str, out: Path, n: int) -> Path:
    sh("gen_data.py", "--all_config", config, "--total_samples", str(n), "--sampling_batch_size", "100",
       "--steps", "20", "--solver_name", "uni_pc", "--skip_type", "edm", "--save_pt", "--data_dir", str(out))
    return out / "uni_pc_NFE20_edm_seed0"


def gen_speed(config: str, out: Path, n: int, repeats: int = 2) -> dict:
    """gen_data.py end to end (files written) against the network-only bound.

    The bound: images per second of network time alone, timed inside the network calls of a
    gen_data.py run on the same noise that writes no file (its own images/s, network plus solver,
    is the bare loop). The two runs alternate ``repeats`` times and the best of each is kept: on a
    shared machine a single run can be off by 20 %.
    """
    import shutil

    def run(folder: Path, *files: str) -> dict:
        shutil.rmtree(folder, ignore_errors=True)
        sh("gen_data.py", "--all_config", config, "--total_samples", str(n), "--sampling_batch_size", "100",
           "--steps", "20", "--solver_name", "uni_pc", "--skip_type", "edm", *files, "--data_dir", str(folder))
        return json.loads((folder / "uni_pc_NFE20_edm_seed0" / "gen_stats.json").read_text())

    gen, bound, loop, share = [], [], [], []
    for _ in range(repeats):
        st = run(out / "gen", "--save_pt", "--save_png")
        gen.append(st["images_per_s"])
        share.append(st["share_of_bound"])
        bare = run(out / "gen_nofiles")
        loop.append(bare["images_per_s"])
        bound.append(bare["network_bound_images_per_s"])
    return {"images": n, "repeats": repeats, "images_per_s": max(gen), "network_only_images_per_s": max(bound),
            "bare_loop_images_per_s": max(loop), "ratio": max(gen) / max(bound),
            "in_run_share_of_network": max(share), "runs_images_per_s": gen, "runs_bound_images_per_s": bound}


def timed(args: list[str], processes: int) -> float:
    """Wall seconds of one command, under ``torchrun --nproc_per_node processes`` when above 1."""
    cmd = list(args) if processes == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                             str(processes), *args]
    t0 = time.perf_counter()
    sh(*cmd, env={"OMP_NUM_THREADS": "1"} if processes > 1 else None)
    return time.perf_counter() - t0


def multi_process(config: str, data: Path, out: Path, n: int, repeats: int) -> dict:
    """1 and 2 processes on the same work: gen_data.py (its own images/s, start-up excluded, and the
    command's wall time), sample.py (command wall time) and main.py (training wall, bytes all-reduced).
    Best of ``repeats`` for each; the 1-process runs use the command's default threads."""
    import shutil

    rows = {"gen_data": {}, "sample": {}, "main": {}}
    for procs in (1, 2):
        gen, gen_wall, samp = [], [], []
        for _ in range(repeats):
            folder = out / f"mp_gen{procs}"
            shutil.rmtree(folder, ignore_errors=True)
            gen_wall.append(timed(["gen_data.py", "--all_config", config, "--total_samples", str(n),
                                   "--sampling_batch_size", "50", "--steps", "20", "--solver_name", "uni_pc",
                                   "--skip_type", "edm", "--save_pt", "--data_dir", str(folder)], procs))
            gen.append(json.loads((folder / "uni_pc_NFE20_edm_seed0" / "gen_stats.json").read_text())["images_per_s"])
            sfolder = out / f"mp_sample{procs}"
            shutil.rmtree(sfolder, ignore_errors=True)
            samp.append(timed(["sample.py", "--all_config", config, "--skip_type", "edm", "--steps", "6",
                               "--num_samples", str(n), "--sampling_batch_size", "50", "--metrics", "teacher,digits",
                               "--teacher", "solver_name=uni_pc,steps=20,skip_type=edm", "--out_dir",
                               str(sfolder)], procs))
        rows["gen_data"][procs] = {"images_per_s": max(gen), "wall_s": min(gen_wall)}
        rows["sample"][procs] = {"wall_s": min(samp), "images_per_s": n / min(samp)}
        logs = out / f"mp_main{procs}"
        shutil.rmtree(logs, ignore_errors=True)
        wall = timed(["main.py", "--all_config", config, "--data_dir", str(data), "--solver_name", "uni_pc",
                      "--steps", "4", "--main_train_batch_size", "2", "--visualize", "false", "--log_path", str(logs)],
                     procs)
        res = json.loads((next(logs.iterdir()) / "result.json").read_text())
        rows["main"][procs] = {"wall_s": wall, "train_s": res["timing"]["wall_train_s"], "steps": res["optimizer_steps"],
                               **res.get("processes", {})}
    return {"samples": n, "repeats": repeats, **rows}


def fresh_distance(config: str, run: Path, data: Path, solver: str, nfe: int, n: int) -> float:
    from ld3.config import parse_config
    from ld3.discretization import load_learned_times
    from ld3.evaluate import fresh_noise, images, teacher_images
    from ld3.losses import l2_distance
    from ld3.runtime import setup_device_and_model
    from ld3.student import SolverSpec

    cfg = {**parse_config(["--all_config", config, "--solver_name", solver, "--steps", str(nfe)]),
           "data_dir": str(data)}
    device, model = setup_device_and_model(cfg)
    z, c, uc = fresh_noise(cfg, model, n, device)
    teacher = teacher_images(cfg, model, z, c, uc, 250, device)
    t, tp = load_learned_times(run / "best_v2.pt")
    student = images(model, SolverSpec.from_cfg(cfg), t, tp, z, c, uc, 250, device)
    return float(l2_distance(student, teacher).mean())


def train(config: str, data: Path, out: Path, solver: str, nfe: int, *extra: str) -> tuple[Path, dict]:
    logs = out / ("runs" + "".join(e.strip("-") for e in extra))
    sh("main.py", "--all_config", config, "--data_dir", str(data), "--solver_name", solver, "--steps", str(nfe),
       "--log_path", str(logs), *extra)
    run = max(logs.iterdir(), key=lambda p: p.stat().st_mtime)
    return run, json.loads((run / "result.json").read_text())


# ------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "digits.yml"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--short", action="store_true", help="one solver, one NFE, no validation study (CI)")
    ap.add_argument("--n_fresh", type=int, default=200)
    ap.add_argument("--quality", action="store_true",
                    help="only the quality-at-cost table: our defaults vs --paper_compat at uni_pc, dpm_solver++, "
                         "ipndm x NFE 4, 6, 10, median of 3 training seeds, on the mixture and the U-Net "
                         "(scripts/quality_seeds.sh for each; bench/out_quality/quality.md)")
    ap.add_argument("--memprobe", nargs=4, metavar=("SOLVER", "NFE", "LOW_GPU", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memprobe:
        s, n, low, b = args.memprobe
        print(json.dumps(memprobe(args.config, s, int(n), low == "1", int(b))))
        return
    if args.quality:
        quality_table(Path(args.out if args.out != str(ROOT / "bench" / "out") else ROOT / "bench" / "out_quality"))
        return
    out = Path(args.out)
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    solvers = ["uni_pc"] if args.short else ["uni_pc", "ipndm"]
    nfes = [4] if args.short else [4, 6, 10]
    report: dict = {"machine": machine(), "config": args.config, "main": [], "memory": [], "validation": []}
    t_all = time.time()

    print("teacher data ...", flush=True)
    data = teacher_data(args.config, out / "data", 100)
    print("gen_data speed ...", flush=True)
    report["gen_data"] = gen_speed(args.config, out, 200 if args.short else 1000, 1 if args.short else 3)

    for solver in solvers:
        for nfe in nfes:
            print(f"main.py {solver} NFE {nfe} ...", flush=True)
            run, res = train(args.config, data, out, solver, nfe)
            tm = res["timing"]
            report["main"].append({
                "solver": solver, "nfe": nfe, "wall_s": tm["wall_train_s"],
                "network_s": tm["network_forward_s"] + tm["network_backward_s"], "loss_s": tm["loss_s"],
                "overhead": tm["overhead_factor"], "nfe_per_sample": res["nfe_per_sample"],
                "peak_rss_mb": res["memory"]["peak_rss_mb"], "steps": res["optimizer_steps"],
                "fresh_distance": fresh_distance(args.config, run, data, solver, nfe, args.n_fresh)})

    print("memory ...", flush=True)
    for nfe in (4, 10):
        for low in (0, 1):
            # large blocks straight from mmap and back on free: the peak RSS then follows live tensors
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
            r = subprocess.run([sys.executable, __file__, "--config", args.config, "--memprobe", solvers[0],
                                str(nfe), str(low), "64"], cwd=ROOT, capture_output=True, text=True, env=env)
            if r.returncode:
                sys.exit(r.stderr[-2000:])
            m = json.loads(r.stdout.strip().splitlines()[-1])
            report["memory"].append({"solver": solvers[0], "nfe": nfe, "low_gpu": bool(low), "batch": 64, **m})

    if not args.short:
        for every in (1, 5, 10, 25):
            print(f"validation every {every} ...", flush=True)
            run, res = train(args.config, data, out, "uni_pc", 4, "--trainer", "rounds", "--valid_every", str(every))
            report["validation"].append({"valid_every": every, "wall_s": res["timing"]["wall_train_s"],
                                         "validation_nfe_per_sample": res["nfe_per_sample"]["validation"],
                                         "fresh_distance": fresh_distance(args.config, run, data, "uni_pc", 4,
                                                                          args.n_fresh)})
    print("several processes (torchrun) ...", flush=True)
    report["processes"] = multi_process(args.config, data, out, 200 if args.short else 1000, 1 if args.short else 2)
    report["total_s"] = time.time() - t_all
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    md = to_markdown(report)
    (out / "bench.md").write_text(md)
    print(md)


def quality_table(out: Path) -> None:
    """scripts/quality_seeds.sh on both embedded configs (same teacher files for both modes; L2 to 1000 fresh
    teacher samples; seconds per main.py command), the tables one after the other with the target checked
    (on the 1000: the ratio to the first 200 is shown beside it)."""
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"Quality at cost (target: ours <= 0.8 x --paper_compat in every cell, no slower); {machine()['date']}.", ""]
    for cfg in ("configs/digits_gmm.yml", "configs/digits.yml"):
        print(f"quality_seeds.sh {cfg} ...", flush=True)
        r = subprocess.run(["bash", "scripts/quality_seeds.sh"], cwd=ROOT, capture_output=True, text=True,
                           env=dict(os.environ, CFG=cfg, OUT=str(out), PY=sys.executable))
        if r.returncode:
            sys.exit(f"quality_seeds.sh failed for {cfg}\n{r.stderr[-3000:]}")
        table = (out / f"{Path(cfg).stem}.md").read_text().strip()
        rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ") and "NFE" not in line]
        miss = [f"{r[0].strip()} {r[1].strip()}" for r in rows if float(r[4]) > 0.8 or float(r[6]) > float(r[7])]
        parts += [f"**{Path(cfg).name}**", "", table, "",
                  f"Cells missing the target: {', '.join(miss) if miss else 'none'}.", ""]
    (out / "quality.md").write_text("\n".join(parts))
    print("\n".join(parts))


def to_markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"Machine: {m['cpus']} CPUs ({m['processor']}), CUDA: {m['cuda'] or 'none'}; Python {m['python']}, "
             f"torch {m['torch']}; {m['date']}; config {Path(r['config']).name}.", "",
             "**main.py** (config defaults, plots on):", "",
             "| solver | NFE | wall (s) | network+loss (s) | overhead | NFE/sample train / moves / valid | "
             "peak RSS (MB) | fresh distance |", "|---|---|---|---|---|---|---|---|"]
    for x in r["main"]:
        n = x["nfe_per_sample"]
        lines.append(f"| {x['solver']} | {x['nfe']} | {x['wall_s']:.1f} | {x['network_s'] + x['loss_s']:.1f} | "
                     f"{x['overhead']:.2f} | {n['train']:.0f} / {n['latent_moves']:.0f} / {n['validation']:.0f} | "
                     f"{x['peak_rss_mb']:.0f} | {x['fresh_distance']:.5f} |")
    lines += ["", "**Peak memory of one training step** (batch 64):", "", "| NFE | --low_gpu | peak (MB) | measured as |",
              "|---|---|---|---|"]
    for x in r["memory"]:
        lines.append(f"| {x['nfe']} | {x['low_gpu']} | {x['peak_mb']:.1f} | {x['kind']} |")
    by = {(x["nfe"], x["low_gpu"]): x["peak_mb"] for x in r["memory"]}
    if (4, True) in by and (10, True) in by and by[(4, True)] > 0:
        lines.append(f"\nWith --low_gpu, NFE 10 / NFE 4 = {by[(10, True)] / by[(4, True)]:.2f}; without: "
                     f"{by[(10, False)] / max(by[(4, False)], 1e-9):.2f}.")
    g = r["gen_data"]
    runs = ", ".join(f"{a:.0f}" for a in g["runs_images_per_s"])
    bare = ", ".join(f"{a:.0f}" for a in g["runs_bound_images_per_s"])
    lines += ["", f"**gen_data.py** ({g['images']} images, 20 NFE, .pt and .png files): within each run the network "
              f"takes **{100 * g['in_run_share_of_network']:.0f} %** of the wall time (best of {g['repeats']}). "
              f"Against the network-only bound measured in separate runs (time inside the network calls of a "
              f"gen_data.py run that writes no file): {g['images_per_s']:.0f} vs {g['network_only_images_per_s']:.0f} "
              f"images/s, ratio {g['ratio']:.2f} (best of {g['repeats']} each; runs with files {runs}, bounds "
              f"{bare}: a ratio above 1 is this machine's run-to-run noise)."]
    if r["validation"]:
        lines += ["", "**Validation frequency** (uni_pc NFE 4, --trainer rounds):", "",
                  "| valid_every | wall (s) | validation NFE/sample | fresh distance |", "|---|---|---|---|"]
        for x in r["validation"]:
            lines.append(f"| {x['valid_every']} | {x['wall_s']:.1f} | {x['validation_nfe_per_sample']:.0f} | "
                         f"{x['fresh_distance']:.5f} |")
    if r.get("processes"):
        mp = r["processes"]
        g, sa, mn = mp["gen_data"], mp["sample"], mp["main"]
        lines += ["", f"**Several processes** (torchrun, gloo; {mp['samples']} samples, best of {mp['repeats']}; "
                  "2 processes run 1 thread each):", "",
                  "| command | 1 process | 2 processes | speed-up |", "|---|---|---|---|",
                  f"| gen_data.py, its own images/s (start-up excluded) | {g[1]['images_per_s']:.0f} | "
                  f"{g[2]['images_per_s']:.0f} | {g[2]['images_per_s'] / g[1]['images_per_s']:.2f}x |",
                  f"| gen_data.py, command wall (s) | {g[1]['wall_s']:.1f} | {g[2]['wall_s']:.1f} | "
                  f"{g[1]['wall_s'] / g[2]['wall_s']:.2f}x |",
                  f"| sample.py (uni_pc NFE 6, teacher + digit metrics), command wall (s) | {sa[1]['wall_s']:.1f} | "
                  f"{sa[2]['wall_s']:.1f} | {sa[1]['wall_s'] / sa[2]['wall_s']:.2f}x |",
                  f"| main.py (uni_pc NFE 4, batch 2), training wall (s) | {mn[1]['train_s']:.1f} | "
                  f"{mn[2]['train_s']:.1f} | {mn[1]['train_s'] / mn[2]['train_s']:.2f}x |"]
        if "all_reduce_bytes_per_step" in mn[2]:
            lines.append(f"\nmain.py with 2 processes all-reduced {mn[2]['all_reduce_bytes']:,} bytes in "
                         f"{mn[2]['all_reduce_calls']:,} calls over {mn[2]['steps']} optimizer steps: "
                         f"**{mn[2]['all_reduce_bytes_per_step']:,.0f} bytes per step** (time-parameter gradients, "
                         "loss sums, moved latents).")
    lines.append(f"\nBenchmark time: {r['total_s']:.0f} s.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
