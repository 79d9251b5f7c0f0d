"""The optimizers of LD3's time parameters, for one tensor each: RMSprop and SGD (the paper's rounds),
Adam (our full-batch trainer, ``ld3.full_batch``).

They perform torch.optim's single-tensor updates, operation for operation in its order (so a run is
the same to the last bit), without torch.optim itself: its first use imports ``torch._dynamo`` and with
it sympy and triton, about 150 MB of resident memory and a second of start-up that a job of a few
thousand small steps does not need (``tests/test_overhead_paths.py`` compares them with torch.optim,
bit for bit). Their ``state_dict`` is torch.optim's, so resume files of either load in both.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _One:
    _TORCH_GROUP: dict = {}  # torch.optim's other group keys (their values here), so that it loads our state

    def __init__(self, param: Tensor, **group):
        self.param = param
        self.param_groups = [dict(group)]  # as torch.optim: the learning rate is param_groups[0]["lr"]
        self.state: dict[str, Tensor] = {}

    def zero_grad(self) -> None:
        self.param.grad = None

    def state_dict(self) -> dict:
        return {"state": {0: {k: v.clone() for k, v in self.state.items()}} if self.state else {},
                "param_groups": [dict(self._TORCH_GROUP, **self.param_groups[0], params=[0])]}

    def load_state_dict(self, d: dict) -> None:
        group = {k: v for k, v in d["param_groups"][0].items() if k != "params"}
        self.param_groups = [dict(self.param_groups[0], **{k: v for k, v in group.items() if k in self.param_groups[0]})]
        state = d.get("state", {})
        state = state.get(0, state.get("0", {})) if state else {}
        self.state = {k: v.to(self.param.device).clone() if torch.is_tensor(v) else v for k, v in state.items()}


class RMSprop(_One):
    """``torch.optim.RMSprop([param], lr, alpha, eps, weight_decay, momentum)`` (not centered)."""

    _TORCH_GROUP = {"centered": False, "capturable": False, "foreach": None, "maximize": False,
                    "differentiable": False}

    def __init__(self, param: Tensor, lr: float, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
                 momentum: float = 0.0):
        super().__init__(param, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum)

    @torch.no_grad()
    def step(self) -> None:
        p, g = self.param, self.param_groups[0]
        if p.grad is None:
            return
        if not self.state:
            self.state = {"step": torch.tensor(0.0), "square_avg": torch.zeros_like(p)}
            if g["momentum"] > 0:
                self.state["momentum_buffer"] = torch.zeros_like(p)
        self.state["step"] += 1
        grad = p.grad
        if g["weight_decay"] != 0:
            grad = grad.add(p, alpha=g["weight_decay"])
        sq = self.state["square_avg"]
        sq.mul_(g["alpha"]).addcmul_(grad, grad, value=1 - g["alpha"])
        avg = sq.sqrt().add_(g["eps"])
        if g["momentum"] > 0:
            buf = self.state["momentum_buffer"]
            buf.mul_(g["momentum"]).addcdiv_(grad, avg)
            p.add_(buf, alpha=-g["lr"])
        else:
            p.addcdiv_(grad, avg, value=-g["lr"])


class SGD(_One):
    """``torch.optim.SGD([param], lr)`` (no momentum, no weight decay: what LD3 uses)."""

    _TORCH_GROUP = {"momentum": 0, "dampening": 0, "weight_decay": 0, "nesterov": False, "maximize": False,
                    "foreach": None, "differentiable": False, "fused": None}

    def __init__(self, param: Tensor, lr: float):
        super().__init__(param, lr=lr)

    @torch.no_grad()
    def step(self) -> None:
        if self.param.grad is not None:
            self.param.add_(self.param.grad, alpha=-self.param_groups[0]["lr"])


class Adam(_One):
    """``torch.optim.Adam([param], lr, betas, eps)`` (no weight decay, no amsgrad), its single-tensor update."""

    _TORCH_GROUP = {"weight_decay": 0, "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                    "differentiable": False, "fused": None, "decoupled_weight_decay": False}

    def __init__(self, param: Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(param, lr=lr, betas=tuple(betas), eps=eps)

    @torch.no_grad()
    def step(self) -> None:
        p, g = self.param, self.param_groups[0]
        if p.grad is None:
            return
        if not self.state:
            self.state = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        beta1, beta2 = g["betas"]
        self.state["step"] += 1
        grad, m, v = p.grad, self.state["exp_avg"], self.state["exp_avg_sq"]
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = float(self.state["step"])
        step_size = g["lr"] / (1 - beta1**step)
        denom = (v.sqrt() / (1 - beta2**step) ** 0.5).add_(g["eps"])
        p.addcdiv_(m, denom, value=-step_size)


__all__ = ["RMSprop", "SGD", "Adam"]
