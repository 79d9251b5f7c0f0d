"""EDM network pickles (NVIDIA ``torch_utils.persistence`` format) loaded without the EDM repository.

The test writes its own pickle in that format: a small network whose module source is embedded
as a string, pickled through a ``__reduce__`` that returns ``(_reconstruct_persistent_obj, (meta,))``
exactly as NVIDIA's ``persistent_class`` decorator does. The writer below uses its own stand-in
``torch_utils.persistence`` module (only while writing); the loader must not see it.
"""

from __future__ import annotations

import copy
import json
import pickle
import sys
import types
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import gen_data
import main as ld3_main
from ld3.config import run_cli
from ld3.models.edm_pickle import Placeholder, load_edm_pickle
from ld3.models.registry import ModelError, build_model

# --------------------------------------------------------------------------- the embedded module source
NET_SRC = '''\
"""Miniature EDM-style networks (preconditioning + a small U-Net-like body) for the loader test."""

import numpy as np
import torch
from torch_utils import persistence
from torch_utils import misc
from torch.nn.functional import silu
import dnnlib


def weight_init(shape, fan_in):
    return np.sqrt(1 / fan_in) * torch.randn(*shape)


@persistence.persistent_class
class Conv2d(torch.nn.Module):
    def __init__(self, in_channels, out_channels, kernel):
        super().__init__()
        self.weight = torch.nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], in_channels * kernel * kernel))
        self.bias = torch.nn.Parameter(torch.randn(out_channels) * 0.1)
        self.register_buffer("gain", torch.ones([]))

    def forward(self, x):
        return torch.nn.functional.conv2d(x, self.weight * self.gain, self.bias, padding=self.weight.shape[-1] // 2)


@persistence.persistent_class
class TinyUNet(torch.nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, model_channels=8):
        super().__init__()
        self.conv_in = Conv2d(in_channels, model_channels, 3)
        self.map_noise = torch.nn.Linear(1, model_channels)
        self.map_label = torch.nn.Linear(label_dim, model_channels) if label_dim else None
        self.enc = torch.nn.ModuleDict({f"{img_resolution}x{img_resolution}_block{i}": Conv2d(model_channels, model_channels, 3)
                                        for i in range(2)})
        self.norm = torch.nn.GroupNorm(2, model_channels)
        self.conv_out = Conv2d(model_channels, out_channels, 3)
        self.skip_scale = np.sqrt(0.5)

    def forward(self, x, noise_labels, class_labels):
        emb = silu(self.map_noise(noise_labels.reshape(-1, 1)))
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels)
        h = self.conv_in(x) + emb[:, :, None, None]
        for block in self.enc.values():
            h = (h + block(silu(self.norm(h)))) * self.skip_scale
        return self.conv_out(silu(h))


@persistence.persistent_class
class EDMPrecond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float("inf"), sigma_data=0.5, **model_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.model = TinyUNet(img_resolution, img_channels, img_channels, label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        class_labels = None if self.label_dim == 0 else torch.zeros([1, self.label_dim], device=x.device) \\
            if class_labels is None else class_labels.to(torch.float32).reshape(-1, self.label_dim)
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        F_x = self.model(c_in * x, c_noise.flatten(), class_labels)
        misc.assert_shape(F_x, [None, self.img_channels, self.img_resolution, self.img_resolution])
        return c_skip * x + c_out * F_x.to(torch.float32)


@persistence.persistent_class
class EDMLoss:
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data
        self.options = dnnlib.EasyDict(weighting="edm")
'''

# A second embedded module whose code cannot run in the loader (a helper it lacks): the object
# must come back as an inert placeholder while the network still loads.
AUG_SRC = '''\
import torch
from torch_utils import persistence
from torch_utils.ops import grid_sample_gradfix  # not provided by the loader's stand-ins


@persistence.persistent_class
class AugmentPipe:
    def __init__(self, p=1, xflip=0):
        self.p = float(p)
        self.xflip = float(xflip)
'''


# --------------------------------------------------------------------------- writer (NVIDIA's format)
def _writer_modules() -> dict[str, types.ModuleType]:
    """Stand-ins of torch_utils.persistence / dnnlib used only to WRITE the test pickle.

    ``persistent_class`` wraps the class in a subclass whose ``__reduce__`` turns the object into
    ``(_reconstruct_persistent_obj, (meta,), None)`` with meta = dict(type='class', version=6,
    module_src=<source of the defining module>, class_name=..., state=<the object's __dict__>).
    """
    persistence = types.ModuleType("torch_utils.persistence")
    sources: dict[types.ModuleType, str] = {}

    def _reconstruct_persistent_obj(meta):  # never called here; the pickle only names it
        raise AssertionError("the writer's reconstruct function must not be used for loading")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"

    def persistent_class(orig_class):
        orig_module = sys.modules[orig_class.__module__]
        orig_module_src = sources[orig_module]

        class Decorator(orig_class):
            _orig_module_src = orig_module_src
            _orig_class_name = orig_class.__name__

            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self._init_args = copy.deepcopy(args)
                self._init_kwargs = copy.deepcopy(kwargs)

            def __reduce__(self):
                fields = list(super().__reduce__())
                fields += [None] * max(3 - len(fields), 0)
                if fields[0] is not _reconstruct_persistent_obj:
                    meta = dict(type="class", version=6, module_src=self._orig_module_src,
                                class_name=self._orig_class_name, state=fields[2])
                    fields[0] = _reconstruct_persistent_obj
                    fields[1] = (meta,)
                    fields[2] = None
                return tuple(fields)

        Decorator.__name__ = orig_class.__name__
        Decorator.__module__ = orig_class.__module__
        return Decorator

    persistence.persistent_class = persistent_class
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    persistence._sources = sources
    misc = types.ModuleType("torch_utils.misc")

    def assert_shape(t, shape):
        assert t.ndim == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))

    misc.assert_shape = assert_shape
    tu = types.ModuleType("torch_utils")
    tu.persistence, tu.misc = persistence, misc
    dnnlib = types.ModuleType("dnnlib")

    class EasyDict(dict):
        def __getattr__(self, k):
            return self[k]

    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    util = types.ModuleType("dnnlib.util")
    util.EasyDict = dnnlib.EasyDict = EasyDict
    dnnlib.util = util
    return {"torch_utils": tu, "torch_utils.persistence": persistence, "torch_utils.misc": misc, "dnnlib": dnnlib,
            "dnnlib.util": util}


def _exec_source(src: str, mods: dict, created: list) -> types.ModuleType:
    module = types.ModuleType("_imported_module_" + uuid.uuid4().hex)
    sys.modules[module.__name__] = module
    created.append(module.__name__)
    mods["torch_utils.persistence"]._sources[module] = src
    exec(src, module.__dict__)  # noqa: S102 - what NVIDIA's persistence does
    return module


def write_edm_pickle(path: Path, label_dim: int = 0, res: int = 8, seed: int = 0) -> dict:
    """Write an EDM-format pickle; return reference inputs and the writer network's outputs."""
    mods = _writer_modules()
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    created = []
    try:
        torch.manual_seed(seed)
        net_mod = _exec_source(NET_SRC, mods, created)
        ema = net_mod.EDMPrecond(img_resolution=res, img_channels=3, label_dim=label_dim, model_channels=8)
        ema.eval().requires_grad_(False)
        data = dict(ema=ema, loss_fn=net_mod.EDMLoss(), augment_pipe=None,
                    dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="x.zip",
                                        use_labels=bool(label_dim), xflip=False, resolution=res, max_size=50000))
        # the writer lacks torch_utils.ops too: run the class without that import, embed the original source
        aug_mod = _exec_source(AUG_SRC.replace("from torch_utils.ops import grid_sample_gradfix", "pass  #"), mods,
                               created)
        aug_mod.AugmentPipe._orig_module_src = AUG_SRC
        data["augment_pipe"] = aug_mod.AugmentPipe(p=0.12, xflip=1e8)
        with open(path, "wb") as f:
            pickle.dump(data, f)
        g = torch.Generator().manual_seed(123)
        x = torch.randn(5, 3, res, res, generator=g) * 3
        sigma = torch.tensor([80.0, 10.0, 1.0, 0.1, 0.002])
        labels = torch.eye(label_dim)[torch.tensor([0, 1, 2, 3, 1]) % label_dim] if label_dim else None
        with torch.no_grad():
            d = ema(x, sigma, labels)
        return {"x": x, "sigma": sigma, "labels": labels, "D": d}
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        for name in created:
            sys.modules.pop(name, None)


# --------------------------------------------------------------------------- tests
def test_pickle_really_uses_the_persistence_format(tmp_path):
    ref_path = tmp_path / "edm-tiny-8x8-uncond-vp.pkl"
    write_edm_pickle(ref_path)
    raw = ref_path.read_bytes()
    assert b"torch_utils.persistence" in raw and b"_reconstruct_persistent_obj" in raw
    assert b"class EDMPrecond(torch.nn.Module)" in raw  # the module source travels in the file
    with pytest.raises(ModuleNotFoundError if "torch_utils" not in sys.modules else Exception):
        pickle.loads(raw)  # a plain unpickler cannot read it without NVIDIA's code


def test_load_matches_writer_exactly(tmp_path):
    path = tmp_path / "edm-tiny-8x8-uncond-vp.pkl"
    ref = write_edm_pickle(path)
    before = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence", "dnnlib")}
    data = load_edm_pickle(path)
    after = {k: sys.modules.get(k) for k in before}
    assert before == after, "the stand-in modules must leave sys.modules as they found it"
    assert set(data) == {"ema", "loss_fn", "augment_pipe", "dataset_kwargs"}
    ema = data["ema"]
    assert type(ema).__name__ == "EDMPrecond" and isinstance(ema, torch.nn.Module)
    assert ema.init_kwargs["model_channels"] == 8 and ema.img_resolution == 8
    assert type(ema.model.map_noise) is torch.nn.Linear  # plain torch modules come back as themselves
    assert isinstance(ema.model.skip_scale, np.floating)
    assert data["loss_fn"].options.weighting == "edm" and data["loss_fn"].P_std == 1.2
    assert isinstance(data["augment_pipe"], Placeholder) and "failed to run" in data["augment_pipe"].reason
    with torch.no_grad():
        d = ema(ref["x"], ref["sigma"])
    assert torch.equal(d, ref["D"])
    assert data["dataset_kwargs"]["resolution"] == 8


def test_model_record_and_noise_prediction(tmp_path):
    path = tmp_path / "edm-tiny-8x8-uncond-vp.pkl"
    ref = write_edm_pickle(path)
    model = build_model({"model": "edm", "ckp_path": str(path)}, torch.device("cpu"))
    assert model.latent_shape == (3, 8, 8) and model.info["img_shape"] == (3, 8, 8)
    assert model.time_mode == "lambda" and model.schedule.T == 80.0 and model.schedule.t_min == 0.002
    assert model.conditions([0, 1], 0, "cpu") == (None, None)
    x, sigma = ref["x"], ref["sigma"]
    with torch.no_grad():
        eps = model.noise_fn(x, sigma, None, None)
    expect = (x - ref["D"]) / sigma.reshape(-1, 1, 1, 1)
    assert torch.allclose(eps, expect, rtol=0, atol=0)
    # differentiable in x and in the time given to the network (LD3 learns t')
    t = torch.tensor(3.0, requires_grad=True)
    xx = x[:1].clone().requires_grad_(True)
    model.noise_fn(xx, t.expand(1), None, None).square().sum().backward()
    assert t.grad is not None and torch.isfinite(t.grad) and xx.grad is not None


def test_class_conditional_pickle(tmp_path):
    path = tmp_path / "edm-tiny-8x8-cond-vp.pkl"
    ref = write_edm_pickle(path, label_dim=4)
    model = build_model({"model": "edm", "ckp_path": str(path)}, torch.device("cpu"))
    c, uc = model.conditions([0, 1, 2, 7], seed=3, device="cpu")
    assert uc is None and c.shape == (4, 4) and torch.equal(c.sum(1), torch.ones(4))
    c2, _ = model.conditions([7, 2], seed=3, device="cpu")
    assert torch.equal(c2, c[[3, 2]]), "labels depend on the sample index only"
    with torch.no_grad():
        eps = model.noise_fn(ref["x"], ref["sigma"], ref["labels"], None)
        other = model.noise_fn(ref["x"], ref["sigma"], ref["labels"].roll(1, 1), None)
    assert torch.equal(eps, (ref["x"] - ref["D"]) / ref["sigma"].reshape(-1, 1, 1, 1))
    assert not torch.allclose(eps, other), "the class labels must reach the network"


def _config(tmp_path: Path, ckp: Path, **extra) -> Path:
    cfg = {"model": "edm", "ckp_path": str(ckp), "solver_name": "uni_pc", "unipc_variant": "bh1", "order": 3,
           "steps": 4, "time_mode": "lambda", "seed": 0, "loss_type": "L2", "threads": 1, "visualize": False,
           "training_rounds_v1": 1, "training_rounds_v2": 1, "main_train_batch_size": 1,
           "main_valid_batch_size": 4, "num_train": 4, "num_valid": 4, "log_path": str(tmp_path / "logs"), **extra}
    p = tmp_path / "edm_tiny.yml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_gen_data_and_main_on_the_pickle(tmp_path):
    path = tmp_path / "edm-tiny-8x8-uncond-vp.pkl"
    write_edm_pickle(path)
    cfg = _config(tmp_path, path)
    out = Path(gen_data.main(["--all_config", str(cfg), "--total_samples", "8", "--sampling_batch_size", "8",
                              "--steps", "20", "--skip_type", "edm", "--save_pt", "--data_dir", str(tmp_path / "data")]))
    files = sorted(out.glob("latent_*.pt"))
    assert out.name == "uni_pc_NFE20_edm_seed0" and len(files) == 8
    d = torch.load(files[0], weights_only=True)
    assert d["latent"].shape == (3, 8, 8) and d["img"].shape == (3, 8, 8) and d["c"] is None
    assert torch.isfinite(d["img"]).all() and d["img"].std() > 0.01  # not clamped, as the paper writes it
    run = Path(ld3_main.main(["--all_config", str(cfg), "--data_dir", str(out)]))
    hist = json.loads((run / "history.json").read_text())
    first = hist[0]["valid_loss"]
    best = min(h["best_valid"] for h in hist if "best_valid" in h)
    assert best < first, f"learning did not lower the validation loss ({first} -> {best})"
    ck = torch.load(run / "best_v2.pt", weights_only=True)
    assert ck["best_t_steps"].numel() == 2 * 5


def test_missing_or_wrong_checkpoint_is_one_line(tmp_path, capsys):
    missing = tmp_path / "pretrained" / "edm-afhqv2-64x64-uncond-vp.pkl"
    cfg = _config(tmp_path, missing)
    argv = ["--all_config", str(cfg), "--total_samples", "2", "--skip_type", "edm", "--data_dir", str(tmp_path / "d")]
    assert run_cli(gen_data.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0] and "bash scripts/download_model.sh afhqv2" in err[0]

    bad = tmp_path / "edm-cifar10-32x32-uncond-vp.pkl"
    bad.write_bytes(b"<html>404 not found</html>")
    assert run_cli(gen_data.main, ["--all_config", str(_config(tmp_path, bad))] + argv[2:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "bash scripts/download_model.sh cifar10" in err[0]


class _Evil:
    def __reduce__(self):
        import os

        return (os.getcwd, ())


def test_unknown_globals_are_refused(tmp_path):
    path = tmp_path / "edm-evil.pkl"
    path.write_bytes(pickle.dumps({"ema": _Evil()}))
    with pytest.raises(ModelError, match="does not allow"):
        build_model({"model": "edm", "ckp_path": str(path)}, torch.device("cpu"))


# --------------------------------------------------------------------------- scripts/download_model.sh
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "download_model.sh"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _script(*args: str, env: dict | None = None):
    import os
    import subprocess

    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.mark.skipif(__import__("shutil").which("curl") is None, reason="needs curl")
def test_download_script_targets_resume_and_failures(tmp_path):
    r = _script("--help")
    assert r.returncode == 0 and all(t in r.stdout for t in ("cifar10", "ffhq", "afhqv2", "lsun", "imagenet", "sd14",
                                                             "sd15", "coco", "all"))
    assert _script("nonsense").returncode == 2 and _script().returncode == 2

    # every checkpoint / FID file the paper's configs name is fetched by some target, to that path
    r = _script("--dry-run", "--dir", str(tmp_path / "dry"), "all")
    assert r.returncode == 0, r.stderr
    for cfg_file in ("cifar10", "ffhq", "afhqv2", "latent_diff_LSUN", "latent_diff_imn", "stable_diff_v1-4",
                     "stable_diff_v1-5"):
        cfg = yaml.safe_load((CONFIGS / f"{cfg_file}.yml").read_text())
        for key in ("ckp_path", "ref_path"):
            if cfg.get(key):
                assert f"fetch {cfg[key]} <-" in r.stdout or f"-> {cfg[key]}" in r.stdout, (cfg_file, cfg[key])
    assert "-> captions_val2014.json" in r.stdout and "pretrained/clip-vit-large-patch14/vocab.json" in r.stdout

    # a local mirror (file:// URLs): resume a partial download, then load what arrived
    mirror, root = tmp_path / "mirror", tmp_path / "root"
    (mirror / "pretrained").mkdir(parents=True)
    (mirror / "fid-refs").mkdir()
    write_edm_pickle(mirror / "pretrained" / "edm-cifar10-32x32-uncond-vp.pkl")
    np.savez(mirror / "fid-refs" / "cifar10-32x32.npz", mu=np.zeros(4), sigma=np.eye(4))
    full = (mirror / "pretrained" / "edm-cifar10-32x32-uncond-vp.pkl").read_bytes()
    (root / "pretrained").mkdir(parents=True)
    (root / "pretrained" / "edm-cifar10-32x32-uncond-vp.pkl.part").write_bytes(full[:1000])
    env = {"LD3_MIRROR": mirror.as_uri()}
    r = _script("--dir", str(root), "cifar10", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (root / "pretrained" / "edm-cifar10-32x32-uncond-vp.pkl").read_bytes() == full
    assert not (root / "pretrained" / "edm-cifar10-32x32-uncond-vp.pkl.part").exists()
    model = build_model({"model": "edm", "ckp_path": str(root / "pretrained" / "edm-cifar10-32x32-uncond-vp.pkl")},
                        torch.device("cpu"))
    assert model.latent_shape == (3, 8, 8)
    r = _script("--dir", str(root), "cifar10", env=env)
    assert r.returncode == 0 and r.stdout.count("already there") == 2

    # a file the source does not have: named in the summary, exit status 1; wrong content is refused
    (root / "fid-refs" / "cifar10-32x32.npz").unlink()
    (mirror / "fid-refs" / "cifar10-32x32.npz").write_text("<html>not found</html>")
    r = _script("--dir", str(root), "cifar10", env=env)
    assert r.returncode == 1 and "FAILED fid-refs/cifar10-32x32.npz" in r.stdout and "not a zip file" in r.stdout
    assert not (root / "fid-refs" / "cifar10-32x32.npz").exists()


@pytest.mark.parametrize("name", ["cifar10", "ffhq", "afhqv2"])
def test_paper_configs_name_their_download(name, tmp_path, monkeypatch):
    cfg = yaml.safe_load((CONFIGS / f"{name}.yml").read_text())
    monkeypatch.chdir(tmp_path)
    if (CONFIGS.parent / cfg["ckp_path"]).exists():
        pytest.skip("checkpoint present")
    with pytest.raises(ModelError) as e:
        build_model(cfg, torch.device("cpu"))
    assert cfg["ckp_path"] in str(e.value) and f"bash scripts/download_model.sh {name}" in str(e.value)
