"""Train the small CNN that judges generated 8x8 digits (features for Frechet distances).

    python scripts/train_digit_classifier.py --seed 0

Trains on the training split of ``models.digit_classifier.load_digits_split`` (the same
split the diffusion model trains on), reports the held-out accuracy, and writes
``models/weights/digit_classifier.safetensors`` plus its JSON card. The same command
(seed, epochs, threads) gives the same weights on the same machine/library versions.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

from ld3.models.digit_classifier import (DEFAULT_CLASSIFIER_WEIGHTS, SPLIT_SEED, VALID_FRACTION,  # noqa: E402
                                     DigitClassifier, load_digits_split)
from ld3.models.digits_unet import count_parameters, write_weights  # noqa: E402

log = logging.getLogger("train_digit_classifier")


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (background -1 fills the border)."""
    b = x.shape[0]
    pad = F.pad(x, [max_shift] * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    out = torch.empty_like(x)
    h, w = x.shape[-2:]
    for i in range(b):
        out[i] = pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    return out


def accuracy(net: DigitClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    _, _, pred = net.predict(x)
    return (pred == y).float().mean().item()


def train(seed: int, epochs: int, batch_size: int, lr: float, weight_decay: float,
          shift_prob: float) -> tuple[DigitClassifier, dict]:
    """Train from scratch; returns the network (eval mode) and its measured figures."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_va, y_va = load_digits_split()
    net = DigitClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = (len(x_tr) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        total = 0.0
        for idx in perm.split(batch_size):
            xb, yb = x_tr[idx], y_tr[idx]
            if shift_prob > 0:
                shifted = random_shift(xb, gen)
                keep = torch.rand(len(xb), generator=gen) < shift_prob
                xb = torch.where(keep[:, None, None, None], shifted, xb)
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 10 == 0 or epoch == epochs - 1:
            net.eval()
            log.info("epoch %3d  loss %.4f  train acc %.4f  held-out acc %.4f", epoch + 1,
                     total / len(x_tr), accuracy(net, x_tr, y_tr), accuracy(net, x_va, y_va))
    net.eval()
    figures = dict(train_accuracy=accuracy(net, x_tr, y_tr), heldout_accuracy=accuracy(net, x_va, y_va),
                   train_seconds=round(time.perf_counter() - t0, 1))
    return net, figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight_decay", type=float, default=1e-4)
    ap.add_argument("--shift_prob", type=float, default=0.5,
                    help="probability of a random 1-pixel translation per training image")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed for reproducibility)")
    ap.add_argument("--out", type=Path, default=DEFAULT_CLASSIFIER_WEIGHTS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)

    net, figures = train(args.seed, args.epochs, args.batch_size, args.lr, args.weight_decay, args.shift_prob)
    card = dict(
        model="DigitClassifier", arch=net.arch, params=count_parameters(net),
        data=dict(source="sklearn.datasets.load_digits", split_seed=SPLIT_SEED, valid_fraction=VALID_FRACTION,
                  scaling="x / 8 - 1 (grey levels 0..16 -> [-1, 1])"),
        training=dict(seed=args.seed, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      weight_decay=args.weight_decay, shift_prob=args.shift_prob, threads=args.threads,
                      optimizer="Adam + OneCycleLR", torch=torch.__version__,
                      command=shlex.join(["python", "scripts/train_digit_classifier.py",
                                          *(sys.argv[1:] if argv is None else argv)])),
        **figures,
    )
    card = write_weights(net.state_dict(), args.out, card)
    log.info("held-out accuracy %.4f (train %.4f), %d parameters, %.1f s; wrote %s (sha256 %s)",
             figures["heldout_accuracy"], figures["train_accuracy"], card["params"], figures["train_seconds"],
             args.out, card["sha256"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
