#!/usr/bin/env python3
"""GPU bench: LD3 on full-size networks with random weights (offline), one short run.

    python bench/gpu.py            # on a GPU: at most ~8 minutes
    python bench/gpu.py --tiny     # the same code on small networks, on the CPU (CI)

Networks (random weights, built from diffusers' classes, nothing downloaded):
- ``cifar10_unet``: UNet2DModel with DDPM's CIFAR-10 layout (32x32x3, ~36M parameters), noise
  prediction on DDPM's linear-beta VP schedule;
- ``sd15_unet``: UNet2DConditionModel of SD 1.5's size (64x64x4 latents, 77x768 text states,
  ~860M parameters), classifier-free guidance off (one network call per evaluation).
For each: one LD3 training step (batch 2, as the paper's configs) at NFE 4 and 10 with the
network's share of its time (overhead factor), peak ``torch.cuda.max_memory_allocated`` with and
without ``--low_gpu``, teacher images per second (NFE 20, no grad), and each speed option against
plain float32 on the teacher batch: bf16 autocast, TF32, channels_last, torch.compile, CUDA graphs
(torch.compile's reduce-overhead mode).
- ``sd3_blocks`` / ``flux_blocks``: two full-width SD3 MMDiT blocks (1536 wide) and three Flux blocks
  (3072 wide, guidance embedding) on 1024 px latents (128 x 128 x 16), velocity turned into eps.
Then whole LD3 runs at the paper's CIFAR-10 settings (cifar10.yml: 50 + 50 teacher samples, NFE 10) on
the CIFAR-size network, with LPIPS of a randomly initialised VGG16 (``lpips.LPIPS(net="vgg",
pretrained=False, pnet_rand=True)``, the cost of the real one): with our default full-batch trainer
(40 + 40 iterations, chunks of 50) and with the paper's rounds (2 + 5 rounds, batch 2 / 10).
Writes bench/out_gpu/gpu.md and gpu.json (device, date, versions). Every ratio is measured in this run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import platform
import time
from pathlib import Path

import torch

from ld3.data import SampleSet
from ld3.discretization import LearnedDiscretization
from ld3.io import atomic_write_text
from ld3.losses import l2_distance
from ld3.models.base import Model
from ld3.samplers.discretizations import get_discretization
from ld3.samplers.schedules import VPDiscreteSchedule
from ld3.student import Rollout, SolverSpec
from ld3.full_batch import FullBatchConfig, FullBatchTrainer
from ld3.trainer import LD3Trainer, TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _peak_reset(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_mb(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None


def build(kind: str, tiny: bool, dev: torch.device) -> tuple[Model, dict]:
    """A Model around a randomly initialised diffusers network, and a description."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    torch.manual_seed(0)
    if kind in ("sd3_blocks", "flux_blocks"):
        return build_flow(kind, tiny, dev)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    sch = VPDiscreteSchedule(betas=betas)
    if kind == "cifar10_unet":
        ch = (32, 64, 64, 64) if tiny else (128, 256, 256, 256)
        res = 8 if tiny else 32
        net = UNet2DModel(sample_size=res, in_channels=3, out_channels=3, layers_per_block=1 if tiny else 2,
                          block_out_channels=ch, norm_num_groups=8 if tiny else 32,
                          down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
        shape, cond = (3, res, res), None
    else:
        ch = (32, 64, 64, 64) if tiny else (320, 640, 1280, 1280)
        res = 8 if tiny else 64
        ctx = 32 if tiny else 768
        net = UNet2DConditionModel(sample_size=res, in_channels=4, out_channels=4, layers_per_block=1 if tiny else 2,
                                   block_out_channels=ch, cross_attention_dim=ctx, norm_num_groups=8 if tiny else 32,
                                   attention_head_dim=8)
        shape = (4, res, res)
        cond = torch.randn(1, 77, ctx, generator=torch.Generator().manual_seed(1))
    net = net.to(dev).eval().requires_grad_(False)
    params = sum(p.numel() for p in net.parameters())
    text = None if cond is None else cond.to(dev)

    def noise_fn(x, t, c=None, uc=None):
        tt = sch.model_time(torch.as_tensor(t, device=x.device).reshape(-1)).expand(x.shape[0])
        xin = x.to(next(net.parameters()).dtype)
        if text is None:
            out = net(xin, tt).sample
        else:
            out = net(xin, tt, encoder_hidden_states=text.expand(x.shape[0], -1, -1)).sample
        return out.to(x.dtype)

    model = Model(name=kind, noise_fn=noise_fn, schedule=sch, latent_shape=shape, net=net, time_mode="lambda")
    return model, {"network": kind, "parameters_M": round(params / 1e6, 2), "shape": list(shape)}


def train_step(model: Model, nfe: int, dev: torch.device, low_gpu: bool, repeats: int) -> dict:
    """Seconds per LD3 training step (rollout with gradients in t, t' and z', L2, backward), its network
    share, and peak memory."""
    roll = Rollout(model, SolverSpec("uni_pc", 3), low_gpu=low_gpu, timed=True)
    disc = LearnedDiscretization(model.schedule, nfe, "lambda", 0.5).to(dev)
    z = torch.randn(2, *model.latent_shape, device=dev)
    target = torch.randn(2, *model.latent_shape, device=dev)
    times = []
    _peak_reset(dev)
    for i in range(repeats + 1):
        zp = z.clone().requires_grad_(True)
        _sync(dev)
        t0 = time.perf_counter()
        t, tp = disc()
        loss = l2_distance(roll(zp, (t.float(), tp.float())).float(), target).mean()
        loss.backward()
        _sync(dev)
        if i:  # the first is warm-up
            times.append(time.perf_counter() - t0)
        if i == 0:
            roll.fn.clock.reset()
    step = sum(times) / len(times)
    net = roll.fn.clock.total_s / repeats
    return {"step_s": step, "network_share": net / step if step > 0 else None, "peak_MB": _peak_mb(dev)}


def teacher_speed(model: Model, dev: torch.device, batch: int, nfe: int, option: str) -> float | None:
    """Teacher images per second (uni_pc, NFE ``nfe``, no grad) under a speed option."""
    net = model.net
    roll = Rollout(model, SolverSpec("uni_pc", 3))
    t = get_discretization("logSNR", model.schedule, nfe).to(dev)
    grid = roll.grid(t.float(), device=dev)
    z = torch.randn(batch, *model.latent_shape, device=dev)
    ctx = contextlib.nullcontext()
    restore = []
    if option == "bf16 autocast":
        if dev.type != "cuda":
            ctx = torch.autocast("cpu", dtype=torch.bfloat16)
        else:
            ctx = torch.autocast("cuda", dtype=torch.bfloat16)
    elif option == "tf32":
        if dev.type != "cuda":
            return None
        restore = [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32]
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    elif option == "channels_last":
        net.to(memory_format=torch.channels_last)
    elif option in ("torch.compile", "cuda graphs"):  # cuda graphs: inductor's reduce-overhead mode
        if option == "cuda graphs" and dev.type != "cuda":
            return None
        mode = "reduce-overhead" if option == "cuda graphs" else None
        try:
            model = Model(**{**model.__dict__, "noise_fn": torch.compile(model.noise_fn, dynamic=False, mode=mode)})
            roll = Rollout(model, SolverSpec("uni_pc", 3))
            grid = roll.grid(t.float(), device=dev)
        except Exception:  # noqa: BLE001 - not available on this platform
            return None
    try:
        with torch.no_grad(), ctx:
            roll(z, grid)  # warm-up (and compilation)
            _sync(dev)
            t0 = time.perf_counter()
            roll(z, grid)
            _sync(dev)
            return batch / (time.perf_counter() - t0)
    except Exception:  # noqa: BLE001 - an option this build lacks: reported as not measured
        return None
    finally:
        if option == "channels_last":
            net.to(memory_format=torch.contiguous_format)
        if restore:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = restore


def whole_run(model: Model, dev: torch.device, tiny: bool, trainer: str = "full_batch") -> dict:
    """A whole LD3 run at cifar10.yml's settings: teacher data (uni_pc NFE 20), then learning at NFE 10, with
    our full-batch trainer (40 + 40 iterations over all 100 samples, chunks of 50) or the paper's rounds."""
    import lpips

    n_train, n_valid = (4, 4) if tiny else (50, 50)
    nfe = 4 if tiny else 10
    t_start = time.perf_counter()
    teacher = Rollout(model, SolverSpec("uni_pc", 3))
    tt = get_discretization("logSNR", model.schedule, 20).to(dev)
    z = torch.randn(n_train + n_valid, *model.latent_shape, generator=torch.Generator().manual_seed(0)).to(dev)
    with torch.no_grad():
        imgs = torch.cat([teacher(z[i:i + 25], teacher.grid(tt.float(), device=dev)) for i in range(0, len(z), 25)])
    _sync(dev)
    t_teacher = time.perf_counter() - t_start
    vgg = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False).to(dev).eval()
    vgg.requires_grad_(False)

    def dist(a, b):
        if a.shape[-1] < 32:  # --tiny's 8x8 images: VGG needs 32 and up (as --lpips_size)
            a, b = (torch.nn.functional.interpolate(v, size=(32, 32), mode="bilinear") for v in (a, b))
        return vgg(a.float(), b.float()).reshape(-1)

    sets = SampleSet(z.cpu(), imgs.cpu(), None, None, [Path(f"memory_{i:06d}") for i in range(len(z))])
    d = model.latent_shape
    bound = 0.001 * d[0] * d[1] * d[2] / nfe**2
    cfg = TrainConfig(rounds_v1=1 if tiny else 2, rounds_v2=1 if tiny else 5, lr_time_2=0.1 / nfe, bound=bound,
                      shift_lr=12 / nfe, train_batch_size=2, valid_batch_size=10)
    disc = LearnedDiscretization(model.schedule, nfe, "lambda", 0.5).to(dev)
    if trainer == "full_batch":  # main.py's default: all 100 samples learned from and chosen on
        fb = FullBatchConfig(iters_v1=4 if tiny else 40, iters_v2=4 if tiny else 40, chunk=50)
        tr = FullBatchTrainer(disc, Rollout(model, SolverSpec("uni_pc", 3)), dist, sets, sets, fb, dev)
    else:
        tr = LD3Trainer(disc, Rollout(model, SolverSpec("uni_pc", 3)), dist, sets.subset(slice(0, n_train)),
                        sets.subset(slice(n_train, n_train + n_valid)), cfg, dev)
    res = tr.run()
    _sync(dev)
    total = time.perf_counter() - t_start
    return {"trainer": trainer, "teacher_s": t_teacher, "learning_s": total - t_teacher, "total_s": total,
            "steps": res.steps, "best_valid_lpips": res.best_loss, "nfe": nfe, "samples": [n_train, n_valid]}


def build_flow(kind: str, tiny: bool, dev: torch.device) -> tuple[Model, dict]:
    """A few full-width blocks of SD3 (MMDiT, 1536 wide, 24 heads) or Flux (3072 wide, 24 heads of 128,
    guidance embedding) on 1024 px latents (128 x 128 x 16, 2x2 patches), velocity turned into eps."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from ld3.models.base import velocity_noise_fn
    from ld3.samplers.schedules import FlowSchedule

    sch = FlowSchedule()
    side = 8 if tiny else 128
    g = torch.Generator().manual_seed(1)
    if kind == "sd3_blocks":
        heads, hd = (2, 8) if tiny else (24, 64)
        net = SD3Transformer2DModel(sample_size=side, patch_size=2, in_channels=16, num_layers=1 if tiny else 2,
                                    attention_head_dim=hd, num_attention_heads=heads,
                                    joint_attention_dim=32 if tiny else 4096, caption_projection_dim=heads * hd,
                                    pooled_projection_dim=32 if tiny else 2048, out_channels=16,
                                    pos_embed_max_size=side)
        text = torch.randn(1, 77 + (8 if tiny else 256), 32 if tiny else 4096, generator=g)
        pooled = torch.randn(1, 32 if tiny else 2048, generator=g)
    else:
        heads, hd = (2, 8) if tiny else (24, 128)
        net = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1 if tiny else 2,
                                     attention_head_dim=hd, num_attention_heads=heads,
                                     joint_attention_dim=32 if tiny else 4096, pooled_projection_dim=32 if tiny else 768,
                                     guidance_embeds=True, axes_dims_rope=(2, 2, 4) if tiny else (16, 56, 56))
        text = torch.randn(1, 8 if tiny else 512, 32 if tiny else 4096, generator=g)
        pooled = torch.randn(1, 32 if tiny else 768, generator=g)
    net = net.to(dev).eval().requires_grad_(False)
    text, pooled = text.to(dev), pooled.to(dev)
    params = sum(p.numel() for p in net.parameters())

    def velocity(x, t, c=None, uc=None):
        b = x.shape[0]
        dtype = next(net.parameters()).dtype
        tt = torch.as_tensor(t, device=x.device, dtype=torch.float32).reshape(-1).expand(b)
        if kind == "sd3_blocks":
            out = net(hidden_states=x.to(dtype), timestep=1000 * tt, encoder_hidden_states=text.expand(b, -1, -1),
                      pooled_projections=pooled.expand(b, -1), return_dict=False)[0]
            return out.to(x.dtype)
        from diffusers import FluxPipeline

        c, h, w = x.shape[1:]
        tokens = FluxPipeline._pack_latents(x.to(dtype), b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, dtype)
        out = net(hidden_states=tokens, timestep=tt, guidance=torch.full((b,), 3.5, device=x.device),
                  pooled_projections=pooled.expand(b, -1), encoder_hidden_states=text.expand(b, -1, -1),
                  txt_ids=torch.zeros(text.shape[1], 3, device=x.device), img_ids=img_ids, return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8).to(x.dtype)

    model = Model(name=kind, noise_fn=velocity_noise_fn(velocity, sch), schedule=sch, latent_shape=(16, side, side),
                  net=net, time_mode="time")
    return model, {"network": kind, "parameters_M": round(params / 1e6, 2), "shape": [16, side, side]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small networks, CPU (CI)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out_gpu"))
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    t_all = time.perf_counter()
    rows, speed, runs = [], [], {}
    for kind in ("cifar10_unet", "sd15_unet", "sd3_blocks", "flux_blocks"):
        model, desc = build(kind, args.tiny, dev)
        for nfe in (4, 10):
            for low in (False, True):
                r = train_step(model, nfe, dev, low, repeats=1 if args.tiny else 3)
                rows.append({**desc, "nfe": nfe, "low_gpu": low, **r})
                print(rows[-1], flush=True)
        batch = 4 if args.tiny else {"cifar10_unet": 64, "sd15_unet": 8}.get(kind, 2)
        base = None
        for opt in ("float32", "bf16 autocast", "tf32", "channels_last", "torch.compile", "cuda graphs"):
            # --tiny (CI) skips the compilations (tens of seconds on a CPU): reported as n/a
            skip = args.tiny and opt in ("torch.compile", "cuda graphs")
            ips = None if skip else teacher_speed(model, dev, batch, 4 if args.tiny else 20, opt)
            base = ips if opt == "float32" else base
            speed.append({"network": kind, "option": opt, "images_per_s": ips,
                          "vs_float32": (ips / base) if ips and base else None})
            print(speed[-1], flush=True)
        if kind == "cifar10_unet":
            for trainer in ("full_batch", "rounds"):
                runs[f"{kind} ({trainer})"] = whole_run(model, dev, args.tiny, trainer)
                print(runs[f"{kind} ({trainer})"], flush=True)
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    info = {"date": _dt.date.today().isoformat(), "device": torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else platform.processor() or "cpu", "torch": torch.__version__, "tiny": args.tiny,
            "wall_s": time.perf_counter() - t_all}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "gpu.json", json.dumps({"info": info, "train_step": rows, "teacher": speed,
                                                     "whole_run": runs}, indent=1))

    def f(v, fmt="{:.3g}"):
        return "n/a" if v is None else fmt.format(v)

    md = [f"GPU bench, {info['date']}, {info['device']}, torch {info['torch']}{' (tiny, CPU)' if args.tiny else ''}"
          f"; `python bench/gpu.py{' --tiny' if args.tiny else ''}` ({info['wall_s']:.0f} s)", "",
          "| network | params (M) | NFE | low_gpu | step s | network share | peak MB |", "|---|---|---|---|---|---|---|"]
    md += [f"| {r['network']} | {r['parameters_M']} | {r['nfe']} | {r['low_gpu']} | {f(r['step_s'])} | "
           f"{f(r['network_share'], '{:.2f}')} | {f(r['peak_MB'], '{:.0f}')} |" for r in rows]
    md += ["", "| network | option | teacher images/s | vs float32 |", "|---|---|---|---|"]
    md += [f"| {s['network']} | {s['option']} | {f(s['images_per_s'])} | {f(s['vs_float32'], '{:.2f}')} |"
           for s in speed]
    for k, r in runs.items():
        md += ["", f"Whole LD3 run on {k} (teacher {r['samples'][0]} + {r['samples'][1]} samples, NFE {r['nfe']}, "
               f"LPIPS with random VGG): {r['total_s']:.1f} s ({r['teacher_s']:.1f} s teacher, {r['learning_s']:.1f} s "
               f"learning, {r['steps']} {'iterations' if r['trainer'] == 'full_batch' else 'steps'})."]
    atomic_write_text(out / "gpu.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
