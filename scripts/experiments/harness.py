"""In-process LD3 experiments (how README's "what was tried" rows were measured): train with options,
measure L2 to fresh teacher samples. Needs the teacher files of scripts/quality_seeds.sh (train, fresh)
and 1000 more seed-2 samples in train_data/paper_compat/<config>/big (see README of this folder)."""
import logging
import time
from pathlib import Path
import torch
from ld3.config import parse_config
from ld3.data import load_samples
from ld3.discretization import LearnedDiscretization
from ld3.losses import make_distance
from ld3.runtime import setup_device_and_model, derived_hparams, time_mode, check_solver_options
from ld3.student import Rollout, SolverSpec
from ld3.trainer import LD3Trainer, train_config_from
from ld3.cli.main import learning_sets

logging.getLogger("ld3").setLevel(logging.WARNING)
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
ROOT = {n: str(REPO / "train_data" / "paper_compat" / n) for n in ("digits_gmm", "digits")}

class Env:
    def __init__(self, name, solver, nfe, extra=()):
        root = ROOT[name]
        self.data_dir = f"{root}/train/uni_pc_NFE20_edm_seed0"
        self.fresh_dir = f"{root}/fresh/uni_pc_NFE20_edm_seed1"
        argv = ["--all_config", str(REPO / "configs" / f"{name}.yml"), "--data_dir", self.data_dir, "--solver_name", solver,
                "--steps", str(nfe), "--num_train", "50", "--num_valid", "50", "--main_train_batch_size", "2",
                "--main_valid_batch_size", "50", "--visualize", "false", "--log_path", "/tmp/unused", *extra]
        self.cfg = cfg = parse_config(argv, script="main")
        self.steps = check_solver_options(cfg)
        self.nfe = nfe
        self.device, self.model = setup_device_and_model(cfg)
        self.bound, self.shift_lr, self.lr2 = derived_hparams(cfg, self.model.latent_shape, nfe)
        shp = self.model.latent_shape
        self.data = load_samples(Path(self.data_dir), 100, shp, shp)
        self.fresh = load_samples(Path(self.fresh_dir), 200, shp, shp)
        self.distance = make_distance(cfg["loss_type"], self.device, 32)
        self.rollout = Rollout(self.model, SolverSpec.from_cfg(cfg))

    def disc(self, cfg=None):
        cfg = cfg or self.cfg
        return LearnedDiscretization(self.model.schedule, self.steps, time_mode(cfg, self.model), float(cfg["win_rate"]),
                                     window=cfg["window"], arithmetic=cfg["arithmetic"])

    def train(self, seed, overrides=None, disc=None, train=None, valid=None, tc_over=None):
        cfg = dict(self.cfg, seed=seed, **(overrides or {}))
        disc = disc or self.disc(cfg)
        tr_set, va_set = learning_sets(self.data, 50, 50, cfg["valid_use"])
        if train is not None: tr_set = train
        if valid is not None: va_set = valid
        tc = train_config_from(cfg, self.bound, self.shift_lr, self.lr2)
        for k, v in (tc_over or {}).items(): setattr(tc, k, v)
        tr = LD3Trainer(disc, self.rollout, self.distance, tr_set, va_set, tc, self.device, seed=seed)
        t0 = time.perf_counter()
        res = tr.run()
        el = time.perf_counter() - t0
        with torch.no_grad():
            t, tp = disc()
        return t.detach(), tp.detach(), el, res, tr

    @torch.no_grad()
    def loss_on(self, sset, t, tp, bs=100):
        tot = 0.0
        g = self.rollout.grid(t, tp, dtype=sset.latent.dtype)
        for i in range(0, len(sset), bs):
            x = self.rollout(sset.latent[i:i+bs], g)
            tot += float(self.distance(x.float(), sset.img[i:i+bs].float()).sum())
        return tot / len(sset)

    def fresh_l2(self, t, tp):
        return self.loss_on(self.fresh, t, tp)
