"""Time spent inside a callable (a network, a loss), forward and backward, as a plain wrapper.

``Timed(fn)`` counts calls and accumulates forward seconds; when its output takes part in a
backward pass, two identity autograd functions placed around the call record when the gradient
reaches the output and when it leaves through the input, so the network's own backward time is
measured too (autograd runs the nodes of one call contiguously: they were created together).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import Tensor


def _sync(x: Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


class _Clock:
    def __init__(self) -> None:
        self.calls = 0
        self.forward_s = 0.0
        self.backward_s = 0.0
        self._starts: list[float] = []

    @property
    def total_s(self) -> float:
        return self.forward_s + self.backward_s


class _BackwardStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, clock: _Clock) -> Tensor:  # type: ignore[override]
        ctx.clock = clock
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        _sync(g)
        ctx.clock._starts.append(time.perf_counter())
        return g, None


class _BackwardEnd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, clock: _Clock) -> Tensor:  # type: ignore[override]
        ctx.clock = clock
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        _sync(g)
        clock = ctx.clock
        if clock._starts:
            clock.backward_s += time.perf_counter() - clock._starts.pop()
        return g, None


class Timed:
    """Wrap ``fn(x, *rest)``: calls, forward and backward seconds (``clock``)."""

    def __init__(self, fn: Callable[..., Tensor], enabled: bool = True):
        self.fn, self.enabled, self.clock = fn, enabled, _Clock()

    def __call__(self, x: Tensor, *rest: Any) -> Tensor:
        self.clock.calls += 1
        if not self.enabled:
            return self.fn(x, *rest)
        track = torch.is_grad_enabled() and x.requires_grad
        if track:
            x = _BackwardEnd.apply(x, self.clock)
        _sync(x)
        t0 = time.perf_counter()
        out = self.fn(x, *rest)
        _sync(out)
        self.clock.forward_s += time.perf_counter() - t0
        if track and out.requires_grad:
            out = _BackwardStart.apply(out, self.clock)
        return out
