"""Time spent inside a callable (a network, a loss), forward and backward, as a plain wrapper.

``Timed(fn)`` counts calls and accumulates forward seconds; when its output takes part in a
backward pass, two gradient hooks record when the gradient of the output is complete (the
call's backward starts) and when the gradient of a view of the input that only the call uses is
complete (it ends), so the network's own backward time is measured too (autograd runs the nodes
of one call contiguously: they were created together). Hooks, not autograd functions written in
Python: they cost a few microseconds, which matters next to a small network.
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


class Timed:
    """Wrap ``fn(x, *rest)``: calls, forward and backward seconds (``clock``)."""

    def __init__(self, fn: Callable[..., Tensor], enabled: bool = True):
        self.fn, self.enabled, self.clock = fn, enabled, _Clock()

    def _backward_start(self, g: Tensor) -> None:
        _sync(g)
        self.clock._starts.append(time.perf_counter())

    def _backward_end(self, g: Tensor) -> None:
        _sync(g)
        if self.clock._starts:
            self.clock.backward_s += time.perf_counter() - self.clock._starts.pop()

    def __call__(self, x: Tensor, *rest: Any) -> Tensor:
        self.clock.calls += 1
        if not self.enabled:
            return self.fn(x, *rest)
        track = torch.is_grad_enabled() and x.requires_grad
        if track:
            x = x.view_as(x)  # used by this call only: its gradient is complete when the call's backward is
            x.register_hook(self._backward_end)
        _sync(x)
        t0 = time.perf_counter()
        out = self.fn(x, *rest)
        _sync(out)
        self.clock.forward_s += time.perf_counter() - t0
        if track and out.requires_grad:
            out.register_hook(self._backward_start)
        return out
