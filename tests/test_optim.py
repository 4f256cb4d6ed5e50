"""The full-batch optimisers behind optimizer = "cg" and "lbfgs" (optim.ScipyMinimizer)."""

import pytest
import torch

from bayes_sws.optim import LearningRates, make_optimizer

F64 = torch.float64
NAMES = ["cg", "lbfgs"]


def minimise(objective, x, name, *, iterations):
    """Run one optimiser step of ``iterations`` on ``objective(x)`` as fit_map does; return the loss."""
    optimizer = make_optimizer(name, {"weights": [x]}, LearningRates(), iterations=iterations)

    def closure():
        optimizer.zero_grad()
        loss = objective(x)
        loss.backward()
        return loss

    return optimizer.step(closure)


# L-BFGS-B also stops once the loss falls by less than a relative 2.2e-9 (scipy's ftol).
@pytest.mark.parametrize(("name", "atol"), [("cg", 1e-8), ("lbfgs", 1e-5)])
def test_solves_a_10_dim_quadratic(name, atol):
    g = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=F64))
    a = q @ torch.diag(torch.linspace(1.0, 20.0, 10, dtype=F64)) @ q.T
    b = torch.randn(10, generator=g, dtype=F64)
    x = torch.zeros(10, dtype=F64, requires_grad=True)
    minimise(lambda x: 0.5 * x @ a @ x - b @ x, x, name, iterations=100)
    torch.testing.assert_close(x.detach(), torch.linalg.solve(a, b), rtol=0, atol=atol)


@pytest.mark.parametrize("name", NAMES)
def test_finds_the_rosenbrock_minimum_from_the_classic_start(name):
    x = torch.tensor([-1.2, 1.0], dtype=F64, requires_grad=True)
    loss = minimise(lambda x: (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2, x, name, iterations=200)
    torch.testing.assert_close(x.detach(), torch.ones(2, dtype=F64), rtol=0, atol=1e-4)
    assert float(loss) < 1e-8


@pytest.mark.parametrize("name", NAMES)
def test_reports_the_loss_at_the_point_it_leaves_the_parameters(name):
    """A line search may pass a lower point before meeting the Wolfe conditions elsewhere."""
    def objective(x):
        return (-10 * torch.exp(-(x - 0.7) ** 2 / (2 * 0.15 ** 2)) + 0.1 * (x - 5) ** 2 - 2.5).sum()

    x = torch.zeros(1, dtype=F64, requires_grad=True)
    reported = minimise(objective, x, name, iterations=1)
    assert float(reported) == pytest.approx(float(objective(x.detach())), rel=1e-12)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_backtracks_from_trial_points_where_the_loss_is_nan(name, dtype):
    """The first trial step from 0 lands past 0.7, where the loss is NaN, as an overflowed
    log-precision makes it. Torch's L-BFGS fails here (an IndexError after NaN step
    lengths), and so do both scipy methods when handed the NaN or an infinite loss."""
    def objective(x):
        loss = 2 * ((x - 0.5) ** 2).sum()
        return torch.where(x.max() > 0.7, torch.full_like(loss, float("nan")), loss)

    x = torch.zeros(1, dtype=dtype, requires_grad=True)
    loss = minimise(objective, x, name, iterations=50)
    torch.testing.assert_close(x.detach(), torch.full_like(x, 0.5), rtol=0, atol=1e-3)
    assert float(loss) < 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_leaves_the_parameters_at_the_start_when_no_step_lowers_the_loss(name):
    """With the gradient's sign flipped every step goes uphill and the line search fails."""
    x = torch.tensor([1.0, -2.0], dtype=F64, requires_grad=True)
    optimizer = make_optimizer(name, {"weights": [x]}, LearningRates(), iterations=5)

    def closure():
        optimizer.zero_grad()
        loss = (x ** 2).sum()
        loss.backward()
        x.grad.neg_()
        return loss

    loss = optimizer.step(closure)
    assert x.detach().tolist() == [1.0, -2.0] and float(loss) == 5.0
