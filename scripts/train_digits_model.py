"""Train an embedded 8x8 digits model from scratch (EDM recipe, or rectified flow) and judge it.

    python scripts/train_digits_model.py --seed 0 --iters 18000                      # the EDM U-Net
    python scripts/train_digits_model.py --objective flow --seed 0 --iters 15000     # the flow U-Net

``--objective flow`` trains ``DigitsFlow`` (the same U-Net, velocity output, see its docstring) by
conditional flow matching as SD3 does: x_t = (1 - t) y + t n, loss ``||v(x_t; t) - (n - y)||^2``
unweighted, ``logit(t) ~ N(P_mean, P_std^2)`` (logit(t) is EDM's log sigma for sigma = t / (1 - t),
so the noise levels are drawn as in the EDM recipe below), the same optimizer, schedule and EMA.
Its check sampler is Heun on the flow ODE at the EDM grid's noise levels, t = sigma / (1 + sigma).

Recipe (Karras et al. 2022, "EDM"): noise levels ln(sigma) ~ N(P_mean = -1.2, P_std = 1.2^2),
loss ``w(sigma) ||D(y + n; sigma) - y||^2`` with ``w = (sigma^2 + sd^2) / (sigma sd)^2`` and
``n ~ N(0, sigma^2 I)``, Adam with a linear warm-up and a cosine decay of the learning
rate, an exponential moving average (EMA) of the weights with EDM's half-life ramp-up;
the EMA weights are the ones saved. Only the training split of the digits is used (no
augmentation: flips and shifts are not label- or distribution-preserving for digits).

At the end the EMA model draws ``--eval_samples`` digits with a deterministic EDM Heun
sampler (``--eval_steps`` steps, rho = 7, sigma 80 -> 0.002 -> 0), the digit classifier
scores them (``ld3.metrics.digit_quality``), and the figures go into the JSON card beside
the weights. The run is deterministic for a given ``--seed``/``--iters``/``--threads``
on one machine and library version; ``--minutes`` only caps the wall time: a run it stops
is reproduced by ``--stop_after N`` (same learning-rate schedule, stop after N iterations),
which the card's ``reproduce`` command spells out.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from ld3.metrics import digit_quality  # noqa: E402
from ld3.models.digit_classifier import (DEFAULT_CLASSIFIER_WEIGHTS, SPLIT_SEED, VALID_FRACTION,  # noqa: E402
                                     load_digit_classifier, load_digits_split)
from ld3.models.digits_unet import (DEFAULT_ARCH, DEFAULT_FLOW_WEIGHTS, DEFAULT_WEIGHTS,  # noqa: E402
                                    DIGITS_IMG_SHAPE, SIGMA_DATA, DigitsDenoiser, DigitsFlow, count_parameters,
                                    load_digits_denoiser, load_digits_flow, sha256_of, write_weights)

log = logging.getLogger("train_digits_model")

P_MEAN, P_STD = -1.2, 1.2
REFERENCE_SIGMAS = (0.002, 0.05, 0.5, 2.0, 80.0)
REFERENCE_TIMES = (0.002, 0.05, 0.3, 0.7, 0.99)
DEFAULT_TEST_REFERENCE = ROOT / "tests" / "data" / "digits_denoiser_reference.safetensors"
FLOW_TEST_REFERENCE = ROOT / "tests" / "data" / "digits_flow_reference.safetensors"


def edm_loss(net: DigitsDenoiser, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """EDM training loss, averaged over pixels and the batch."""
    sigma = (torch.randn(y.shape[0], 1, 1, 1, generator=gen) * P_STD + P_MEAN).exp()
    weight = (sigma ** 2 + net.sigma_data ** 2) / (sigma * net.sigma_data) ** 2
    noise = torch.randn(y.shape, generator=gen) * sigma
    d = net(y + noise, sigma.reshape(-1))
    return (weight * (d - y) ** 2).mean()


def flow_loss(net: DigitsFlow, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Conditional flow matching: ``||v(x_t; t) - (n - y)||^2`` at x_t = (1 - t) y + t n, logit(t) normal."""
    t = torch.sigmoid(torch.randn(y.shape[0], 1, 1, 1, generator=gen) * P_STD + P_MEAN)
    noise = torch.randn(y.shape, generator=gen)
    v = net((1 - t) * y + t * noise, t.reshape(-1))
    return ((v - (noise - y)) ** 2).mean()


def edm_sigma_steps(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                    rho: float = 7.0) -> torch.Tensor:
    """Karras noise levels ``(smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho`` and a final 0."""
    i = torch.arange(num_steps, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def heun_sample(net: DigitsDenoiser, z: torch.Tensor, num_steps: int = 32, batch_size: int = 500) -> torch.Tensor:
    """Deterministic EDM Heun sampler (Karras et al. 2022, Algorithm 1 without churn).

    ``x_0 = sigma_0 z``; per step ``d_i = (x_i - D(x_i; s_i)) / s_i``,
    ``x~ = x_i + (s_{i+1} - s_i) d_i`` and, unless ``s_{i+1} = 0``,
    ``x_{i+1} = x_i + (s_{i+1} - s_i) (d_i + d~) / 2`` with ``d~ = (x~ - D(x~; s_{i+1})) / s_{i+1}``.
    Runs in float64 for the state (network in float32). NFE = 2 * num_steps - 1.
    """
    sig = edm_sigma_steps(num_steps)
    out = []
    for zb in z.split(batch_size):
        x = zb.double() * sig[0]
        for s, s_next in zip(sig[:-1], sig[1:]):
            d = (x - net(x, s)) / s
            x_next = x + (s_next - s) * d
            if s_next > 0:
                d2 = (x_next - net(x_next, s_next)) / s_next
                x_next = x + (s_next - s) * 0.5 * (d + d2)
            x = x_next
        out.append(x.float())
    return torch.cat(out)


@torch.no_grad()
def flow_heun_sample(net: DigitsFlow, z: torch.Tensor, num_steps: int = 32, batch_size: int = 500) -> torch.Tensor:
    """Heun on the flow ODE dx/dt = v(x; t) at t_i = s_i / (1 + s_i), s_i the EDM grid's noise levels
    (x at t_0 = 80/81 is t_0 z, the data part left out as the samplers' priors do); the last step, to
    t = 0, is Euler. State in float64. NFE = 2 * num_steps - 1."""
    sig = edm_sigma_steps(num_steps)
    ts = sig / (1 + sig)
    out = []
    for zb in z.split(batch_size):
        x = zb.double() * ts[0]
        for t, t_next in zip(ts[:-1], ts[1:]):
            d = net(x, t)
            x_next = x + (t_next - t) * d
            if t_next > 0:
                x_next = x + (t_next - t) * 0.5 * (d + net(x_next, t_next))
            x = x_next
        out.append(x.float())
    return torch.cat(out)


def sample(net: torch.nn.Module, z: torch.Tensor, num_steps: int) -> torch.Tensor:
    """The check sampler of either objective."""
    return (flow_heun_sample if isinstance(net, DigitsFlow) else heun_sample)(net, z, num_steps=num_steps)


def save_grid(images: torch.Tensor, path: Path, nrow: int = 10, scale: int = 4, pad: int = 1) -> None:
    """Save images (N x 1 x 8 x 8 in [-1, 1]) as a PNG grid, ink white on black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image

    imgs = ((images.clamp(-1, 1) + 1) / 2)[:, 0]
    n, h, w = imgs.shape
    ncol = math.ceil(n / nrow)
    hs, ws = h * scale, w * scale
    canvas = torch.full((nrow * (hs + pad) + pad, ncol * (ws + pad) + pad), 0.35)
    for k in range(n):
        r, c = divmod(k, ncol)
        tile = imgs[k].repeat_interleave(scale, 0).repeat_interleave(scale, 1)
        canvas[pad + r * (hs + pad):pad + r * (hs + pad) + hs, pad + c * (ws + pad):pad + c * (ws + pad) + ws] = tile
    path.parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(str(path), canvas.numpy(), cmap="gray", vmin=0.0, vmax=1.0)


def write_test_reference(net: DigitsDenoiser | DigitsFlow, weights_sha256: str, path: Path) -> None:
    """Store a fixed input, noise levels (flow: times) and ``D`` (flow: ``v``) outputs for the regression test."""
    from safetensors.torch import save_file

    x = torch.randn(2, *DIGITS_IMG_SHAPE, generator=torch.Generator().manual_seed(0))
    if isinstance(net, DigitsFlow):
        ts = torch.tensor(REFERENCE_TIMES, dtype=torch.float32)
        with torch.no_grad():
            outs = torch.stack([net(x, t) for t in ts])
        tensors = {"x": x, "times": ts, "v": outs.contiguous()}
        note = "v[i] = v(x, times[i]) of the shipped EMA weights"
    else:
        sig = torch.tensor(REFERENCE_SIGMAS, dtype=torch.float32)
        with torch.no_grad():
            outs = torch.stack([net(x * max(float(s), 1.0), s) for s in sig])
        tensors = {"x": x, "sigmas": sig, "d": outs.contiguous()}
        note = "d[i] = D(x * max(sigmas[i], 1), sigmas[i]) of the shipped EMA weights"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"weights_sha256": weights_sha256, "note": note})
    tmp.chmod(0o644)
    tmp.replace(path)


def time_calls(net: DigitsDenoiser | DigitsFlow, batch_sizes: tuple[int, ...] = (1, 10, 100),
               threads: tuple[int, ...] = (1, 2), repeats: int = 50) -> list[dict]:
    """Median wall time of one call of ``D`` (forward, and forward+backward w.r.t. x) per setting.

    The backward pass is the one LD3 needs: gradients flow to the input and the noise level,
    never to the frozen weights.
    """
    net = copy.deepcopy(net).eval().requires_grad_(False)
    before = torch.get_num_threads()
    rows = []
    for th in threads:
        torch.set_num_threads(th)
        for b in batch_sizes:
            x = torch.randn(b, *DIGITS_IMG_SHAPE, generator=torch.Generator().manual_seed(0))
            sigma = torch.full((b,), 0.7)
            row: dict = dict(threads=th, batch=b)
            for mode in ("forward", "forward_backward"):
                times = []
                for k in range(repeats + 5):
                    t0 = time.perf_counter()
                    if mode == "forward":
                        with torch.no_grad():
                            net(x, sigma)
                    else:
                        xx = x.clone().requires_grad_(True)
                        net(xx, sigma).square().sum().backward()
                    if k >= 5:
                        times.append(time.perf_counter() - t0)
                row[f"{mode}_ms"] = round(1e3 * sorted(times)[len(times) // 2], 3)
            rows.append(row)
    torch.set_num_threads(before)
    return rows


def lr_at(it: int, iters: int, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` iterations, then a cosine decay to 5 percent of ``lr``."""
    if it < warmup:
        return lr * (it + 1) / warmup
    progress = (it - warmup) / max(1, iters - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args: argparse.Namespace) -> tuple[DigitsDenoiser | DigitsFlow, dict]:
    """Train and return the EMA network (eval mode) and the training figures."""
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_tr, _, _, _ = load_digits_split()
    arch = {**DEFAULT_ARCH, "model_channels": args.model_channels, "channel_mult": tuple(args.channel_mult),
            "emb_channels": args.emb_channels, "dropout": args.dropout}
    flow = args.objective == "flow"
    net = (DigitsFlow if flow else DigitsDenoiser)(sigma_data=SIGMA_DATA, **arch).train()
    loss_fn = flow_loss if flow else edm_loss
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    log.info(f"{type(net).__name__} %s: %d parameters; %d training digits", arch, count_parameters(net), len(x_tr))
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)

    t0 = time.perf_counter()
    perm, pos, it, running = torch.randperm(len(x_tr), generator=gen), 0, 0, 0.0
    stopped_by_time = False
    last = min(args.iters, args.stop_after or args.iters)
    while it < last:
        if args.minutes and time.perf_counter() - t0 > 60 * args.minutes:
            stopped_by_time = True
            log.warning("wall-time cap of %.1f minutes reached at iteration %d of %d", args.minutes, it, args.iters)
            break
        if pos + args.batch_size > len(perm):
            perm, pos = torch.randperm(len(x_tr), generator=gen), 0
        y = x_tr[perm[pos:pos + args.batch_size]]
        pos += args.batch_size
        for group in opt.param_groups:
            group["lr"] = lr_at(it, args.iters, args.lr, args.warmup)
        loss = loss_fn(net, y, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        it += 1
        # EMA with EDM's ramp-up: half-life min(ema_halflife, rampup * images seen so far).
        nimg = it * args.batch_size
        halflife = min(args.ema_halflife_kimg * 1000, args.ema_rampup * nimg)
        beta = 0.5 ** (args.batch_size / max(halflife, 1e-8))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.lerp_(p, 1 - beta)
        running = loss.item() if it == 1 else 0.99 * running + 0.01 * loss.item()
        if it % args.log_every == 0 or it == args.iters:
            el = time.perf_counter() - t0
            log.info("iter %6d/%d  loss %.4f  lr %.2e  %.1f ms/iter  elapsed %.1f min  eta %.1f min", it,
                     args.iters, running, opt.param_groups[0]["lr"], 1e3 * el / it, el / 60,
                     el / it * (args.iters - it) / 60)
    seconds = time.perf_counter() - t0
    figures = dict(iters_planned=args.iters, iters=it, images_seen=it * args.batch_size, train_seconds=round(seconds, 1),
                   stopped_by_time=stopped_by_time, final_loss_smoothed=round(running, 5))
    return ema, figures


def evaluate(net: DigitsDenoiser | DigitsFlow, classifier_path: Path, num_samples: int, steps: int,
             seed: int) -> tuple[dict, torch.Tensor]:
    """Draw samples with the Heun sampler and score them with the digit classifier."""
    clf = load_digit_classifier(classifier_path)
    z = torch.randn(num_samples, *DIGITS_IMG_SHAPE, generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    images = sample(net, z, steps)
    seconds = time.perf_counter() - t0
    q = digit_quality(images, clf)
    what = "flow ODE Heun at t = s / (1 + s)" if isinstance(net, DigitsFlow) else "EDM Heun"
    q.update(sampler=f"{what}, {steps} steps (NFE {2 * steps - 1}), rho 7, sigma 80 -> 0.002 -> 0",
             num_samples=num_samples, noise_seed=seed, sampling_seconds=round(seconds, 1),
             classifier_sha256=sha256_of(classifier_path))
    hist = q["class_histogram"]
    q["targets_met"] = bool(q["confident_share"] >= 0.93 and min(hist) >= 0.05 and max(hist) <= 0.15
                            and q["frechet_ratio"] <= 3.0)
    return q, images


def evaluate_seeds(net: DigitsDenoiser | DigitsFlow, classifier_path: Path, num_samples: int, steps: int,
                   num_seeds: int) -> dict:
    """Spread of the quality figures over noise seeds 0..num_seeds-1 (and the floor over train subsets).

    The Frechet figures at a few hundred samples are noisy (class proportions alone move them a
    lot), so one seed is not enough to judge the model; this reports mean, min and max.
    """
    clf = load_digit_classifier(classifier_path)
    keys = ("confident_share", "frechet", "frechet_matched", "frechet_ratio", "min_class_share", "max_class_share")
    rows: dict[str, list[float]] = {k: [] for k in keys}
    floors, failing = [], []
    for seed in range(num_seeds):
        z = torch.randn(num_samples, *DIGITS_IMG_SHAPE, generator=torch.Generator().manual_seed(seed))
        q = digit_quality(sample(net, z, steps), clf, seed=seed)
        q["min_class_share"], q["max_class_share"] = min(q["class_histogram"]), max(q["class_histogram"])
        q["frechet_ratio"] = q["frechet_matched"] / q["frechet_floor"]
        for k in keys:
            rows[k].append(float(q[k]))
        floors.append(q["frechet_floor"])
        if not (q["confident_share"] >= 0.93 and q["min_class_share"] >= 0.05 and q["max_class_share"] <= 0.15
                and q["frechet_ratio"] <= 3.0):
            failing.append(seed)
    summary: dict = {k: dict(mean=round(sum(v) / len(v), 4), min=round(min(v), 4), max=round(max(v), 4))
                     for k, v in rows.items()}
    summary["frechet_floor"] = dict(mean=round(sum(floors) / len(floors), 4), min=round(min(floors), 4),
                                    max=round(max(floors), 4))
    summary.update(num_seeds=num_seeds, num_samples=num_samples, seeds_missing_a_target=failing,
                   note="seed s: noise seed s for the samples and train-subset seed s for the Frechet "
                        "reference and floor (frechet_ratio = frechet_matched / frechet_floor of that seed)")
    return summary


def train_and_save(args: argparse.Namespace, argv: list[str] | None) -> tuple[DigitsDenoiser | DigitsFlow, dict]:
    """Train, write the EMA weights and their card; return the EMA network and the card."""
    ema, figures = train(args)
    flow = args.objective == "flow"
    argv_used = list(sys.argv[1:] if argv is None else argv)
    cmd = shlex.join(["python", "scripts/train_digits_model.py", *argv_used])
    # The command that gives these exact weights again: a wall-time stop becomes an iteration stop.
    repro = [a for i, a in enumerate(argv_used)
             if not (a.startswith("--minutes") or (i > 0 and argv_used[i - 1] == "--minutes"))]
    if figures["iters"] < args.iters and not args.stop_after:
        repro += ["--stop_after", str(figures["iters"])]
    repro = shlex.join(["python", "scripts/train_digits_model.py", *repro])
    card = dict(
        model=("DigitsFlow (rectified-flow velocity, preconditioned, around DigitsUNet)" if flow else
               "DigitsDenoiser (EDM preconditioning around DigitsUNet)"), arch=ema.arch, sigma_data=SIGMA_DATA,
        params=count_parameters(ema), img_shape=[ema.img_channels, 8, 8],
        data=dict(source="sklearn.datasets.load_digits", split="train", split_seed=SPLIT_SEED,
                  valid_fraction=VALID_FRACTION, scaling="x / 8 - 1 (grey levels 0..16 -> [-1, 1])",
                  augmentation="none"),
        training=dict(seed=args.seed, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                      lr_schedule="linear warm-up, cosine decay to 5%", optimizer="Adam(0.9, 0.999)",
                      ema_halflife_kimg=args.ema_halflife_kimg, ema_rampup=args.ema_rampup,
                      **(dict(objective="flow matching, v = noise - y", logit_t_mean=P_MEAN, logit_t_std=P_STD,
                              loss_weight="none") if flow else
                         dict(objective="EDM denoising", P_mean=P_MEAN, P_std=P_STD,
                              loss_weight="(s^2 + sd^2) / (s sd)^2")),
                      threads=args.threads, torch=torch.__version__, command=cmd, reproduce=repro,
                      saved="EMA weights", **figures),
    )
    card = write_weights(ema.state_dict(), args.out, card)
    log.info("wrote %s (%d bytes, sha256 %s)", args.out, card["file_bytes"], card["sha256"])
    return ema, card


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objective", choices=("edm", "flow"), default="edm",
                    help="edm: the EDM denoiser (digits_edm_unet); flow: the rectified-flow network (digits_flow_unet)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iters", type=int, default=18000, help="optimizer steps (the reproducible budget)")
    ap.add_argument("--minutes", type=float, default=0.0, help="optional wall-time cap (0: none)")
    ap.add_argument("--stop_after", type=int, default=0,
                    help="stop after this many iterations, keeping the learning-rate schedule of --iters "
                         "(reproduces a run that --minutes stopped early)")
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--ema_halflife_kimg", type=float, default=50.0, help="EMA half-life in thousands of images")
    ap.add_argument("--ema_rampup", type=float, default=0.1)
    ap.add_argument("--model_channels", type=int, default=DEFAULT_ARCH["model_channels"])
    ap.add_argument("--channel_mult", type=float, nargs="+", default=list(DEFAULT_ARCH["channel_mult"]))
    ap.add_argument("--emb_channels", type=int, default=DEFAULT_ARCH["emb_channels"])
    ap.add_argument("--dropout", type=float, default=DEFAULT_ARCH["dropout"])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (fixed for reproducibility; 1 is fastest on a shared 2-core CPU)")
    ap.add_argument("--log_every", type=int, default=500)
    ap.add_argument("--eval_samples", type=int, default=1000)
    ap.add_argument("--eval_steps", type=int, default=32, help="Heun steps of the quality check")
    ap.add_argument("--eval_seed", type=int, default=0)
    ap.add_argument("--eval_seeds", type=int, default=10,
                    help="also summarise the quality over this many noise seeds (0: skip)")
    ap.add_argument("--eval_only", action="store_true",
                    help="do not train: re-measure the weights at --out and update their JSON card")
    ap.add_argument("--no_bench", action="store_true", help="skip timing the network calls")
    ap.add_argument("--classifier", type=Path, default=DEFAULT_CLASSIFIER_WEIGHTS)
    ap.add_argument("--out", type=Path, default=None, help="weights file (default: the shipped one of --objective)")
    ap.add_argument("--samples_png", default=None,
                    help="PNG grid of the first 100 samples ('' to skip; default docs/digits[_flow]_samples.png)")
    ap.add_argument("--test_reference", default=None,
                    help="where to store the regression-test reference outputs ('' to skip)")
    args = ap.parse_args(argv)
    flow = args.objective == "flow"
    if args.out is None:
        args.out = DEFAULT_FLOW_WEIGHTS if flow else DEFAULT_WEIGHTS
    if args.samples_png is None:
        args.samples_png = str(ROOT / "docs" / ("digits_flow_samples.png" if flow else "digits_samples.png"))
    if args.test_reference is None:
        args.test_reference = str(FLOW_TEST_REFERENCE if flow else DEFAULT_TEST_REFERENCE)
    args.channel_mult = [int(m) if float(m).is_integer() else m for m in args.channel_mult]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)

    if args.eval_only:
        ema = (load_digits_flow if flow else load_digits_denoiser)(args.out)
        card = json.loads(args.out.with_suffix(".json").read_text())
        if card.get("sha256") != sha256_of(args.out):
            log.error("%s does not match the sha256 in its card; retrain instead of --eval_only", args.out)
            return 2
    else:
        ema, card = train_and_save(args, argv)

    quality, images = evaluate(ema, args.classifier, args.eval_samples, args.eval_steps, args.eval_seed)
    card["quality"] = quality
    if args.eval_seeds:
        card["quality_over_seeds"] = evaluate_seeds(ema, args.classifier, args.eval_samples, args.eval_steps,
                                                    args.eval_seeds)
    if not args.no_bench:
        card["speed"] = dict(note="median ms per call of D on this machine (2 shared CPU cores), x of shape "
                                  "B x 1 x 8 x 8; backward to x only", calls=time_calls(ema))
        for row in card["speed"]["calls"]:
            log.info("speed: %s", row)
    jpath = args.out.with_suffix(".json")
    jpath.write_text(json.dumps(card, indent=2) + "\n")
    if args.samples_png:
        save_grid(images[:100], Path(args.samples_png))
        log.info("wrote %s", args.samples_png)
    if args.test_reference and not args.eval_only:
        write_test_reference(ema, card["sha256"], Path(args.test_reference))
        log.info("wrote %s", args.test_reference)

    q = quality
    print(f"quality of {q['num_samples']} samples ({q['sampler']}):")
    print(f"  confident (max softmax > 0.9): {100 * q['confident_share']:.1f}%   (target >= 93%)")
    print(f"  class shares: {' '.join(f'{100 * h:.1f}' for h in q['class_histogram'])}   (target 5..15% each)")
    print(f"  Frechet, {q['n_floor']} samples vs {q['n_floor']} train digits: {q['frechet_matched']:.3f}; "
          f"floor (held-out vs train): {q['frechet_floor']:.3f}; ratio {q['frechet_ratio']:.2f}x (target <= 3x)")
    print(f"  Frechet, {q['n']} samples vs {q['n']} train digits: {q['frechet']:.3f}")
    print(f"  all targets met: {q['targets_met']}")
    if "quality_over_seeds" in card and args.eval_seeds:
        m = card["quality_over_seeds"]
        print(f"over {m['num_seeds']} noise seeds (mean [min, max]): confident {m['confident_share']}, "
              f"ratio {m['frechet_ratio']}, Frechet({q['n']}) {m['frechet']}, floor {m['frechet_floor']}, "
              f"seeds missing a target: {m['seeds_missing_a_target']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
