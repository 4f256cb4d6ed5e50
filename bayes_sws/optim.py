"""Optimisers for the fit loop: Adam with a learning rate per parameter group, L-BFGS, nonlinear CG.

Adam takes minibatch steps; L-BFGS and conjugate gradients take full-batch
iterations, which suit the small full-batch problems (such as the sunspots net)
where they beat plain gradient steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["LearningRates", "NonlinearCG", "OPTIMIZERS", "make_optimizer"]

OPTIMIZERS = ("adam", "lbfgs", "cg")


@dataclass(frozen=True)
class LearningRates:
    """Learning rate of each parameter group (Adam); ``weights`` also covers pass-through parameters.

    The defaults follow Ullrich et al.'s public code.
    """

    weights: float = 5e-4
    means: float = 1e-4
    precisions: float = 3e-3
    pi: float = 3e-3

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"learning rate for {name} must be positive, got {value}")


class NonlinearCG(torch.optim.Optimizer):
    """Polak–Ribière (PR+) nonlinear conjugate gradients with a Wolfe line search.

    Use like ``torch.optim.LBFGS``: ``optimizer.step(closure)`` runs up to
    ``max_iter`` iterations, the closure re-evaluating the loss and its gradient.
    The line search interpolates along the direction (secant steps on the
    directional derivative, quadratic backtracking on the loss) until the strong
    Wolfe conditions hold, so on a quadratic it is an exact line search and CG
    converges in at most n iterations.

    Parameters
    ----------
    params : iterable of Tensor
    lr : float
        First trial step length; later iterations start from the previous step
        scaled by the ratio of directional derivatives.
    max_iter : int
        Iterations per :meth:`step`.
    armijo : float
        Sufficient-decrease constant c1.
    curvature : float
        Strong Wolfe curvature constant c2 (small: close to an exact line search).
    max_evaluations : int
        Loss evaluations allowed per line search.
    tolerance_grad : float
        Stop when the gradient's largest entry falls below this.
    """

    def __init__(self, params, *, lr: float = 1e-3, max_iter: int = 20, armijo: float = 1e-4,
                 curvature: float = 0.1, max_evaluations: int = 25, tolerance_grad: float = 1e-9) -> None:
        super().__init__(params, {"lr": lr, "max_iter": max_iter, "armijo": armijo, "curvature": curvature,
                                  "max_evaluations": max_evaluations, "tolerance_grad": tolerance_grad})

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _flat_grad(self) -> torch.Tensor:
        return torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
            for p in self._params()
        ])

    def _move(self, step: float, direction: torch.Tensor) -> None:
        offset = 0
        with torch.no_grad():
            for p in self._params():
                p.add_(direction[offset: offset + p.numel()].view_as(p), alpha=step)
                offset += p.numel()

    def _line_search(self, evaluate_, loss: float, slope: float, direction: torch.Tensor,
                     step: float) -> tuple[float, float, torch.Tensor] | None:
        """Move along ``direction`` to a strong-Wolfe point; return (step, loss, grad) or None."""
        group = self.param_groups[0]
        position, best = 0.0, None
        for _ in range(group["max_evaluations"]):
            self._move(step - position, direction)
            position = step
            new_loss = float(evaluate_())
            grad = self._flat_grad()
            new_slope = float(grad @ direction)
            sufficient = math.isfinite(new_loss) and new_loss <= loss + group["armijo"] * step * slope
            if sufficient and (best is None or new_loss < best[1]):
                best = (step, new_loss, grad)
            if sufficient and abs(new_slope) <= group["curvature"] * abs(slope):
                return step, new_loss, grad
            if not sufficient:
                curvature = new_loss - loss - slope * step if math.isfinite(new_loss) else math.inf
                quadratic = -slope * step * step / (2.0 * curvature) if curvature > 0 else 0.5 * step
                step = min(max(quadratic, 0.1 * step), 0.5 * step)
            elif new_slope > slope:
                step = min(step * slope / (slope - new_slope), 10.0 * step)
            else:
                step *= 10.0
        if best is None:
            self._move(-position, direction)
            return None
        self._move(best[0] - position, direction)
        return best

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        group = self.param_groups[0]
        state = self.state["cg"]
        evaluate_ = torch.enable_grad()(closure)
        loss = float(evaluate_())
        grad = self._flat_grad()
        direction, previous_grad = state.get("direction"), state.get("grad")
        step_length, previous_slope = state.get("step", group["lr"]), state.get("slope")
        for _ in range(group["max_iter"]):
            if grad.abs().max() <= group["tolerance_grad"]:
                break
            if direction is None or previous_grad is None:
                direction = -grad
            else:
                beta = max(0.0, float(grad @ (grad - previous_grad) / (previous_grad @ previous_grad)))
                direction = -grad + beta * direction
            slope = float(grad @ direction)
            if slope >= 0:
                direction, slope = -grad, -float(grad @ grad)
            if previous_slope is not None:
                step_length = step_length * previous_slope / slope
            found = self._line_search(evaluate_, loss, slope, direction, step_length)
            if found is None:
                direction = None
                break
            step_length, loss, new_grad = found
            previous_grad, grad, previous_slope = grad, new_grad, slope
        state.update(direction=direction, grad=previous_grad, step=step_length, slope=previous_slope)
        return torch.tensor(loss, dtype=torch.float64)


def make_optimizer(name: str, groups: dict[str, list[torch.Tensor]], learning_rates: LearningRates,
                   *, iterations: int) -> torch.optim.Optimizer:
    """The optimiser ``name`` over parameter groups keyed by learning-rate group (see :class:`LearningRates`)."""
    if name == "adam":
        # fused: one kernel per parameter for the whole update (CPU and CUDA)
        return torch.optim.Adam(
            [{"params": params, "lr": getattr(learning_rates, group)} for group, params in groups.items()],
            fused=True,
        )
    params = [p for params in groups.values() for p in params]
    if name == "lbfgs":
        return torch.optim.LBFGS(params, lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")
    if name == "cg":
        return NonlinearCG(params, lr=learning_rates.weights, max_iter=iterations)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
