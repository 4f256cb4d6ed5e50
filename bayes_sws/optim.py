"""Optimisers for the fit loop: Adam with a learning rate per parameter group, full-batch L-BFGS and CG.

Adam takes minibatch steps. ``"lbfgs"`` and ``"cg"`` are scipy's L-BFGS-B and
Polak–Ribière conjugate gradients on the whole training set, which suit small
problems such as the sunspots net (docs/objective.md §4).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import scipy.optimize
import torch

from .spec import OPTIMIZERS, LearningRates

__all__ = ["LearningRates", "OPTIMIZERS", "ScipyMinimizer", "make_optimizer"]


class ScipyMinimizer(torch.optim.Optimizer):
    """Full-batch minimisation by :func:`scipy.optimize.minimize`, used like ``torch.optim.LBFGS``.

    ``optimizer.step(closure)`` flattens every parameter into one float64 vector,
    runs up to ``max_iter`` iterations of ``method`` from there (each step starts
    afresh), writes the point it ends at back into the parameters and returns the
    loss at that point. The closure re-evaluates the loss and its gradient; the
    parameters' ``grad`` afterwards belongs to the last point scipy tried, which need
    not be the one returned.

    A trial point whose loss or gradient is not finite (a step that overflowed a
    log-precision, say) is reported to scipy with a zero gradient and a loss above
    every finite one seen in the step, so the line search takes it for too long a
    step and interpolates back. Reporting ``inf`` instead breaks the interpolation:
    L-BFGS-B then stalls at the start, and torch's strong-Wolfe search (in
    ``torch.optim.LBFGS``) computes NaN step lengths.

    Parameters
    ----------
    params : iterable of Tensor
    method : {"CG", "L-BFGS-B"}
        Polak–Ribière nonlinear conjugate gradients, or limited-memory BFGS.
    max_iter : int
        Iterations per :meth:`step`.
    tolerance_grad : float
        Stop when the gradient's largest entry falls below this (L-BFGS-B also
        stops once the loss's relative decrease falls below scipy's ``ftol``).

    Examples
    --------
    >>> optimizer = ScipyMinimizer(model.parameters(), method="CG", max_iter=20)
    >>> loss = optimizer.step(closure)
    """

    def __init__(self, params, *, method: str, max_iter: int = 20, tolerance_grad: float = 1e-9) -> None:
        super().__init__(params, {"method": method, "max_iter": max_iter, "tolerance_grad": tolerance_grad})

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _write(self, point: np.ndarray) -> None:
        offset = 0
        for p in self._params():
            p.copy_(torch.from_numpy(point[offset: offset + p.numel()]).view_as(p))
            offset += p.numel()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        settings = self.param_groups[0]
        params = self._params()
        highest = -math.inf

        def loss_and_grad(point: np.ndarray) -> tuple[float, np.ndarray]:
            nonlocal highest
            self._write(point)
            with torch.enable_grad():
                loss = float(closure().detach())
            grad = torch.cat([
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params
            ]).to("cpu", torch.float64).numpy()
            if math.isfinite(loss) and np.isfinite(grad).all():
                highest = max(highest, loss)
                return loss, grad
            return (highest + abs(highest) + 1.0 if math.isfinite(highest) else math.inf), np.zeros_like(grad)

        start = torch.cat([p.reshape(-1) for p in params]).to("cpu", torch.float64).numpy()
        result = scipy.optimize.minimize(
            loss_and_grad, start, jac=True, method=settings["method"],
            options={"maxiter": settings["max_iter"], "gtol": settings["tolerance_grad"]},
        )
        self._write(result.x)
        return torch.tensor(result.fun, dtype=torch.float64)


class _FusedAdam(torch.optim.Adam):
    """torch's fused Adam, each step one call of its fused kernel a group.

    ``Adam.step`` spends some 40 µs a group on bookkeeping (grouping tensors by device
    and dtype, profiler hooks, state look-ups): on LeNet-300-100's four groups as
    long as the fused update of its 266,000 weights. Once every parameter with a
    gradient has its state (torch's own step creates it), a step gathers each group's
    tensors and calls the same kernel with the same arguments, so the parameters and
    state are bitwise those ``Adam.step`` gives. Anything else (a closure, AMSGrad, a
    tensor learning rate, mixed devices or dtypes in a group) takes ``Adam.step``.

    The step counters, a 0-dim tensor a parameter in torch's state, are kept as views of
    one tensor, so that a step counts them with one ``add_`` (``_foreach_add_`` over
    LeNet-300-100's nine took some 60 µs a step, a few ``add_`` each on the CPU).
    The counters are this optimiser's own: a state loaded from another optimiser still
    in use (``load_state_dict(other.state_dict())``) shares its moments with it, as in
    torch, but not its step counters, which are copied; a state loaded from a file
    shares nothing.
    """

    _counters: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        gathered = self._gathered() if closure is None else None
        if gathered is None:
            adam_step = torch.optim.Adam.step
            if getattr(adam_step, "hooked", False):  # torch's hook runner, which already wraps this step
                adam_step = adam_step.__wrapped__
            return adam_step(self, closure)
        stepping = [p for params, *_ in gathered for p in params]
        if stepping:  # none where no parameter has a gradient
            torch._foreach_add_(self._step_counters(stepping), 1)
        for group, (params, grads, exp_avgs, exp_avg_sqs) in zip(self.param_groups, gathered):
            if not params:
                continue
            steps = [self.state[p]["step"] for p in params]
            torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=group["lr"],
                               beta1=group["betas"][0], beta2=group["betas"][1],
                               weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                               grad_scale=None, found_inf=None)
        return None

    def _step_counters(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """These parameters' step counters as one tensor, their ``state["step"]`` its views, in a list.

        Made again (the counters' values copied) where the parameters taking the step
        change, or a counter was replaced (``load_state_dict``); counters on different
        devices or of different dtypes are not joined: the list then holds each.
        """
        steps = [self.state[p]["step"] for p in params]
        counters = self._counters
        if counters is not None and len(steps) == counters.numel() \
                and all(s._base is counters and s.storage_offset() == i for i, s in enumerate(steps)):
            return [counters]
        if len({(s.device, s.dtype) for s in steps}) > 1:
            self._counters = None
            return steps
        self._counters = torch.stack(steps)
        for p, view in zip(params, self._counters.unbind()):
            self.state[p]["step"] = view
        return [self._counters]

    def _gathered(self) -> list[tuple[list[torch.Tensor], ...]] | None:
        """Each group's (params, grads, exp_avgs, exp_avg_sqs) where the direct call applies, else ``None``."""
        gathered = []
        for group in self.param_groups:
            if group["amsgrad"] or group["capturable"] or group["differentiable"] or not group["fused"] \
                    or group.get("decoupled_weight_decay") or isinstance(group["lr"], torch.Tensor) \
                    or isinstance(group["betas"][0], torch.Tensor) or isinstance(group["betas"][1], torch.Tensor):
                return None
            params = [p for p in group["params"] if p.grad is not None]
            states = [self.state.get(p) for p in params]
            if not all(states) or len({(p.device, p.dtype) for p in params}) > 1 \
                    or any(p.grad.is_sparse for p in params):
                return None
            gathered.append((params, [p.grad for p in params], [state["exp_avg"] for state in states],
                             [state["exp_avg_sq"] for state in states]))
        return gathered


def make_optimizer(name: str, groups: dict[str, list[torch.Tensor]], learning_rates: LearningRates,
                   *, iterations: int) -> torch.optim.Optimizer:
    """Adam with a learning rate per group, or a full-batch scipy method doing ``iterations`` per step.

    Parameters
    ----------
    name : {"adam", "lbfgs", "cg"}
    groups : dict
        Learning-rate group (a field of :class:`LearningRates`, or its ``mixture``) → parameters.
    learning_rates : LearningRates
        Adam's rates; the full-batch methods need none.
    iterations : int
        Iterations per ``step`` of the full-batch methods.
    """
    if name == "adam":
        # fused: one kernel per group for the whole update (CPU and CUDA)
        return _FusedAdam(
            [{"params": params, "lr": getattr(learning_rates, group)} for group, params in groups.items()],
            fused=True,
        )
    methods = {"lbfgs": "L-BFGS-B", "cg": "CG"}
    if name not in methods:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return ScipyMinimizer([p for params in groups.values() for p in params], method=methods[name],
                          max_iter=iterations)
