"""Time spent inside a callable (a network, a loss), forward and backward, as a plain wrapper.

``Timed(fn)`` counts calls and accumulates forward seconds; when its output takes part in a
backward pass, two gradient hooks record when the gradient of the output is complete (the
call's backward starts) and when the gradient of a view of the input that only the call uses is
complete (it ends), so the network's own backward time is measured too (autograd runs the nodes
of one call contiguously: they were created together). Hooks, not autograd functions written in
Python: they cost a few microseconds, which matters next to a small network. On CUDA the stamps
are CUDA events, read when the totals are asked for: timing never synchronises a call.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import Tensor


class _Clock:
    """Calls and seconds. On CUDA the times come from CUDA events, read when asked for (and every
    ``DRAIN`` calls), so timing adds no synchronisation per call; on the CPU from ``perf_counter``."""

    DRAIN = 512

    def __init__(self) -> None:
        self.calls = 0
        self._forward_s = 0.0
        self._backward_s = 0.0
        self._starts: list = []  # backward starts not yet ended: perf_counter values or CUDA events
        self._events: list[tuple[str, Any, Any]] = []  # ("forward" | "backward", start, end) CUDA events

    def _add(self, kind: str, start: Any, end: Any) -> None:
        if isinstance(start, float):
            if kind == "forward":
                self._forward_s += end - start
            else:
                self._backward_s += end - start
            return
        self._events.append((kind, start, end))
        if len(self._events) >= self.DRAIN:
            self._drain()

    def _drain(self) -> None:
        for kind, start, end in self._events:
            end.synchronize()
            s = start.elapsed_time(end) / 1000.0
            if kind == "forward":
                self._forward_s += s
            else:
                self._backward_s += s
        self._events.clear()

    def reset(self) -> None:
        """Zero the seconds (the call count stays)."""
        self._drain()
        self._forward_s = self._backward_s = 0.0

    @property
    def forward_s(self) -> float:
        self._drain()
        return self._forward_s

    @property
    def backward_s(self) -> float:
        self._drain()
        return self._backward_s

    @property
    def total_s(self) -> float:
        return self.forward_s + self.backward_s


def _now(x: Tensor) -> Any:
    """A time stamp: a recorded CUDA event for a CUDA tensor (no synchronisation), else perf_counter()."""
    if x.is_cuda:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(x.device))
        return ev
    return time.perf_counter()


class Timed:
    """Wrap ``fn(x, *rest)``: calls, forward and backward seconds (``clock``)."""

    def __init__(self, fn: Callable[..., Tensor], enabled: bool = True):
        self.fn, self.enabled, self.clock = fn, enabled, _Clock()

    def _backward_start(self, g: Tensor) -> None:
        self.clock._starts.append(_now(g))

    def _backward_end(self, g: Tensor) -> None:
        if self.clock._starts:
            self.clock._add("backward", self.clock._starts.pop(), _now(g))

    def __call__(self, x: Tensor, *rest: Any) -> Tensor:
        self.clock.calls += 1
        if not self.enabled:
            return self.fn(x, *rest)
        track = torch.is_grad_enabled() and x.requires_grad
        if track:
            x = x.view_as(x)  # used by this call only: its gradient is complete when the call's backward is
            x.register_hook(self._backward_end)
        t0 = _now(x)
        out = self.fn(x, *rest)
        self.clock._add("forward", t0, _now(out))
        if track and out.requires_grad:
            out.register_hook(self._backward_start)
        return out
