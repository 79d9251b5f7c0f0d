"""NVIDIA EDM network pickles (``edm-*.pkl``), loaded without the EDM repository.

EDM saves its networks with ``torch_utils.persistence``: each network object is pickled as a
call ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` where ``meta`` holds the full
source code of the Python module that defined the class (``module_src``), the class name and
the object's ``__dict__`` (``state``: parameters, buffers, child modules, init arguments).
Unpickling executes that source in a fresh module, creates the object without calling
``__init__`` and restores its state. The file (``pickle.dump`` of a dict) looks like::

    {'ema': EDMPrecond(...), 'loss_fn': EDMLoss(...), 'augment_pipe': AugmentPipe(...) or None,
     'dataset_kwargs': {...}}

This module reads that format with its own unpickler:

- every global the pickle names goes through an allow-list (tensor/storage rebuild helpers,
  ``torch.nn`` module classes, numpy scalars/arrays, a few builtins); anything else is refused;
- ``torch_utils.persistence._reconstruct_persistent_obj`` maps to ``_reconstruct`` below, which
  executes the embedded source in a private module (``_ld3_edm_<hash>``, one per distinct
  source) and rebuilds the object as NVIDIA's code does;
- the embedded sources import ``torch_utils.persistence``, ``torch_utils.misc`` and ``dnnlib``;
  small compatible stand-ins written here are placed in ``sys.modules`` under those names only
  while a file is being read (whatever was there before is put back afterwards);
- objects whose module source cannot run (e.g. an augmentation pipeline needing a helper the
  stand-ins lack) become inert placeholders: only the ``ema`` network has to be usable.

Security: the embedded module source is Python code and it is executed. The allow-list only
stops the pickle stream itself from calling arbitrary functions; it cannot make the embedded
code safe. Load only pickles from a source you trust (the NVIDIA downloads of
``scripts/download_model.sh``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import io
import logging
import pickle
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("ld3")

PERSISTENCE_VERSION = 6  # the only version NVIDIA's torch_utils.persistence writes


class EDMPickleError(Exception):
    """The file is not an EDM network pickle this loader can read."""


# --------------------------------------------------------------------------- download hints
EDM_FILES = {
    "cifar10": "edm-cifar10-32x32-uncond-vp.pkl",
    "ffhq": "edm-ffhq-64x64-uncond-vp.pkl",
    "afhqv2": "edm-afhqv2-64x64-uncond-vp.pkl",
}


def download_name(path: str | Path) -> str:
    """The ``scripts/download_model.sh`` target that fetches ``path`` (best guess from its name)."""
    name = Path(str(path)).name.lower()
    for key in EDM_FILES:
        if key in name:
            return key
    return "cifar10"


def download_hint(path: str | Path) -> str:
    return f"bash scripts/download_model.sh {download_name(path)}"


# --------------------------------------------------------------------------- stand-ins
class EasyDict(dict):
    """dict with attribute access (what ``dnnlib.EasyDict`` is)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]


def _persistent_class(orig_class: type) -> type:
    """Stand-in for ``persistence.persistent_class``: marks the class, adds init_args/kwargs.

    Objects are rebuilt with ``cls.__new__`` + ``__setstate__``, so no wrapper subclass is
    needed; ``_init_args``/``_init_kwargs`` come back from the pickled state.
    """
    if not isinstance(orig_class, type):
        raise TypeError("persistent_class expects a class")
    orig_class._ld3_persistent = True
    if "init_args" not in orig_class.__dict__:
        orig_class.init_args = property(lambda self: copy.deepcopy(getattr(self, "_init_args", None)))
        orig_class.init_kwargs = property(lambda self: EasyDict(copy.deepcopy(getattr(self, "_init_kwargs", None) or {})))
    return orig_class


def _is_persistent(obj: Any) -> bool:
    return bool(getattr(obj if isinstance(obj, type) else type(obj), "_ld3_persistent", False))


def _import_hook(hook):
    return hook


def _constant(value, shape=None, dtype=None, device=None, memory_format=None):
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if shape is not None:
        t, _ = torch.broadcast_tensors(t, torch.empty(shape))
    return t.contiguous(memory_format=memory_format or torch.contiguous_format)


def _const_like(ref, value, shape=None, dtype=None, device=None):
    return _constant(value, shape=shape, dtype=dtype or ref.dtype, device=device or ref.device)


def _assert_shape(tensor, ref_shape):
    if tensor.ndim != len(ref_shape):
        raise AssertionError(f"Wrong number of dimensions: got {tensor.ndim}, expected {len(ref_shape)}")
    for idx, (size, ref) in enumerate(zip(tensor.shape, ref_shape)):
        if ref is not None and int(size) != int(ref):
            raise AssertionError(f"Wrong size for dimension {idx}: got {size}, expected {ref}")


@contextlib.contextmanager
def _suppress_tracer_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        yield


def _named_params_and_buffers(module):
    return list(module.named_parameters()) + list(module.named_buffers())


def _params_and_buffers(module):
    return list(module.parameters()) + list(module.buffers())


@torch.no_grad()
def _copy_params_and_buffers(src_module, dst_module, require_all=False):
    src = dict(_named_params_and_buffers(src_module))
    for name, tensor in _named_params_and_buffers(dst_module):
        if name in src:
            tensor.copy_(src[name])
        elif require_all:
            raise AssertionError(name)


def _shim_modules() -> dict[str, types.ModuleType]:
    """Fresh stand-ins for the helper modules the embedded sources import."""
    dnnlib = types.ModuleType("dnnlib")
    util = types.ModuleType("dnnlib.util")
    util.EasyDict = dnnlib.EasyDict = EasyDict
    dnnlib.util = util
    tu = types.ModuleType("torch_utils")
    persistence = types.ModuleType("torch_utils.persistence")
    persistence.persistent_class = _persistent_class
    persistence.is_persistent = _is_persistent
    persistence.import_hook = _import_hook
    persistence._reconstruct_persistent_obj = None  # set per load
    misc = types.ModuleType("torch_utils.misc")
    for name, fn in (("constant", _constant), ("const_like", _const_like), ("assert_shape", _assert_shape),
                     ("suppress_tracer_warnings", _suppress_tracer_warnings),
                     ("named_params_and_buffers", _named_params_and_buffers),
                     ("params_and_buffers", _params_and_buffers),
                     ("copy_params_and_buffers", _copy_params_and_buffers),
                     ("nan_to_num", torch.nan_to_num)):
        setattr(misc, name, fn)
    tu.persistence, tu.misc = persistence, misc
    for m in (dnnlib, util, tu, persistence, misc):
        m.__ld3_shim__ = True
    return {"dnnlib": dnnlib, "dnnlib.util": util, "torch_utils": tu, "torch_utils.persistence": persistence,
            "torch_utils.misc": misc}


@contextlib.contextmanager
def _shims_installed(shims: dict[str, types.ModuleType]):
    """Put the stand-ins in ``sys.modules`` for the duration of a load, then restore."""
    saved = {name: sys.modules.get(name) for name in shims}
    sys.modules.update(shims)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


# --------------------------------------------------------------------------- the unpickler
class Placeholder:
    """An object of an embedded module that could not be executed (kept inert)."""

    def __init__(self, class_name: str, reason: str, state: dict | None = None):
        self.class_name, self.reason, self.state = class_name, reason, state

    def __repr__(self) -> str:
        return f"<unavailable {self.class_name}: {self.reason}>"


_MODULE_CACHE: dict[str, types.ModuleType] = {}


def _module_from_source(src: str) -> types.ModuleType:
    """Execute ``src`` in a fresh private module (cached by the source's hash)."""
    key = hashlib.sha256(src.encode("utf-8")).hexdigest()
    mod = _MODULE_CACHE.get(key)
    if mod is None:
        name = f"_ld3_edm_{key[:16]}"
        mod = types.ModuleType(name)
        mod.__file__ = f"<{name}: module source embedded in an EDM pickle>"
        sys.modules[name] = mod  # so classes defined there can be found by their __module__
        try:
            exec(compile(src, mod.__file__, "exec"), mod.__dict__)  # noqa: S102 - the format requires it
        except BaseException:
            sys.modules.pop(name, None)
            raise
        _MODULE_CACHE[key] = mod
    return mod


def _reconstruct(meta: dict) -> Any:
    """Our ``_reconstruct_persistent_obj``: rebuild one persistent object from its meta dict."""
    if not isinstance(meta, dict):
        raise EDMPickleError("persistent object without its meta dict")
    meta = EasyDict(meta)
    if meta.get("version") != PERSISTENCE_VERSION or meta.get("type") != "class":
        raise EDMPickleError(f"persistence version {meta.get('version')!r} / type {meta.get('type')!r} is not "
                             f"supported (expected version {PERSISTENCE_VERSION}, type 'class')")
    src, class_name = meta.get("module_src"), meta.get("class_name")
    if not isinstance(src, str) or not isinstance(class_name, str):
        raise EDMPickleError("persistent object without module_src / class_name")
    state = EasyDict(meta.get("state") or {})
    try:
        module = _module_from_source(src)
    except Exception as e:  # noqa: BLE001 - reported on the object, fatal only if it is the network
        return Placeholder(class_name, f"its module source failed to run ({type(e).__name__}: {e})", state)
    cls = module.__dict__.get(class_name)
    if not isinstance(cls, type):
        return Placeholder(class_name, "class not found in its module source", state)
    obj = cls.__new__(cls)
    setstate = getattr(obj, "__setstate__", None)
    if callable(setstate):
        setstate(state)
    else:
        obj.__dict__.update(state)
    return obj


def _storage_from_bytes(b: bytes):
    """``torch.storage._load_from_bytes`` without running arbitrary pickled code."""
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)


_TORCH_REBUILD = {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                  "_rebuild_parameter_with_state", "_rebuild_device_tensor_from_numpy",
                  "_rebuild_device_tensor_from_cpu_tensor", "_rebuild_meta_tensor_no_storage",
                  "_rebuild_wrapper_subclass", "_rebuild_nested_tensor"}
_BUILTINS = {"set", "frozenset", "slice", "complex", "range", "object", "bytearray", "bytes", "tuple", "list",
             "dict", "int", "float", "bool", "str"}
_NUMPY = {"_reconstruct", "scalar", "ndarray", "dtype"}


class _EDMUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:  # noqa: C901 - one allow-list
        if module == "torch_utils.persistence" and name == "_reconstruct_persistent_obj":
            return _reconstruct
        if module in ("dnnlib", "dnnlib.util") and name == "EasyDict":
            return EasyDict
        if module in ("collections",) and name in ("OrderedDict", "defaultdict"):
            return getattr(importlib.import_module(module), name)
        if module in ("builtins", "__builtin__") and name in _BUILTINS:
            return getattr(importlib.import_module("builtins"), name)
        if module == "copyreg" and name == "_reconstructor":
            import copyreg

            return copyreg._reconstructor
        if module == "torch.storage" and name == "_load_from_bytes":
            return _storage_from_bytes
        if module == "torch._utils" and name in _TORCH_REBUILD:
            return getattr(importlib.import_module(module), name)
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return getattr(importlib.import_module(module), name)
        if module == "torch":
            obj = getattr(torch, name, None)
            if isinstance(obj, torch.dtype) or (isinstance(obj, type) and (
                    name in ("Size", "device", "Tensor") or name.endswith("Storage"))):
                return obj
        if module == "torch.nn.parameter" and name in ("Parameter", "Buffer"):
            return getattr(importlib.import_module(module), name)
        if module.startswith("torch.nn.modules."):
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) and issubclass(obj, nn.Module):
                return obj
        if module.split(".")[0] == "numpy" and name in _NUMPY:
            import numpy as np

            if name in ("ndarray", "dtype"):
                return getattr(np, name)
            try:
                from numpy._core import multiarray
            except ImportError:  # numpy < 2
                from numpy.core import multiarray
            return getattr(multiarray, name)
        if module == "numpy.dtypes" or (module == "numpy" and name.endswith("DType")):
            import numpy as np

            obj = getattr(np.dtypes, name, None)
            if isinstance(obj, type):
                return obj
        raise pickle.UnpicklingError(f"the pickle refers to {module}.{name}, which this loader does not allow")


def load_edm_pickle(path: str | Path) -> Any:
    """Unpickle an EDM network pickle (see the module docstring); returns the stored object."""
    path = Path(path)
    shims = _shim_modules()
    shims["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct
    with open(path, "rb") as f, _shims_installed(shims):
        try:
            return _EDMUnpickler(f).load()
        except EDMPickleError:
            raise
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, KeyError, TypeError,
                ValueError, RuntimeError) as e:
            raise EDMPickleError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


# --------------------------------------------------------------------------- the Model
def load_edm_model(path: str | Path | None, device: torch.device | str = "cpu"):
    """``Model`` of the ``ema`` network of an EDM pickle: D(x, sigma, class_labels) on the VE schedule."""
    from ld3.models.base import edm_model
    from ld3.models.base import ModelError

    if path in (None, ""):
        raise ModelError("ckp_path is not set: point it at an EDM pickle, e.g. pretrained/edm-cifar10-32x32-uncond-vp.pkl "
                         f"(fetch it with `{download_hint('cifar10')}`)")
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise ModelError(f"EDM checkpoint {path} not found: download it with `{download_hint(p)}` "
                         "(or set ckp_path to an existing edm-*.pkl)")
    try:
        data = load_edm_pickle(p)
    except EDMPickleError as e:
        raise ModelError(f"{p} is not a readable EDM network pickle ({e}); download the original with "
                         f"`{download_hint(p)}`") from None
    except OSError as e:
        raise ModelError(f"cannot read {p} ({e.strerror or e}); download it again with `{download_hint(p)}`") from None
    net = data.get("ema") if isinstance(data, dict) else data
    if isinstance(net, Placeholder):
        raise ModelError(f"{p}: the network class {net.class_name} cannot be rebuilt ({net.reason})")
    if not isinstance(net, nn.Module):
        what = f"a dict with keys {sorted(data)[:6]}" if isinstance(data, dict) else type(data).__name__
        raise ModelError(f"{p} holds {what}, not an EDM network under 'ema'; download the original with "
                         f"`{download_hint(p)}`")
    try:
        res, ch = int(net.img_resolution), int(net.img_channels)
        label_dim = int(getattr(net, "label_dim", 0) or 0)
    except (AttributeError, TypeError, ValueError):
        raise ModelError(f"{p}: the 'ema' network lacks img_resolution / img_channels; "
                         "it is not an EDM preconditioned network") from None
    net.eval().requires_grad_(False)
    shape = (ch, res, res)
    log.info("EDM network %s (%s, %dx%d, %d channels, %s)", p.name, type(net).__name__, res, res, ch,
             f"{label_dim} classes" if label_dim else "unconditional")
    model = edm_model(f"edm:{p.stem}", net, shape, label_dim=label_dim,
                      info={"ckp_path": str(p), "img_shape": shape, "label_dim": label_dim,
                            "network_class": type(net).__name__})
    return model
