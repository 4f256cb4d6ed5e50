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


# CG's line search stops ("precision loss") once the float64 loss cannot fall: at an error e
# with ½λ_min‖e‖² ≈ ε|f*|, ‖e‖ ≈ √(2ε|f*|/λ_min) = 2.7e-8 here (f* = −1.68, λ_min = 1); the
# error it stops at (1.1e-8 to 1.2e-8 seen) depends on the loss's round-off, so the machine.
# L-BFGS-B also stops once the loss falls by less than a relative 2.2e-9 (scipy's ftol).
@pytest.mark.parametrize(("name", "atol"), [("cg", 3e-8), ("lbfgs", 1e-5)])
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


def test_the_fit_loops_adam_steps_bitwise_as_torchs_fused_adam_and_saves_the_same_state(monkeypatch):
    from bayes_sws.optim import _FusedAdam

    torch_steps = []
    torch_step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step",
                        lambda self, *a, **k: torch_steps.append(type(self)) or torch_step(self, *a, **k))

    def groups(seed):
        g = torch.Generator().manual_seed(seed)
        weights = [torch.randn(30, 7, generator=g, requires_grad=True), torch.randn(7, generator=g, requires_grad=True)]
        mixture = [torch.randn(5, generator=g, requires_grad=True), torch.randn(4, generator=g, requires_grad=True)]
        return [{"params": weights, "lr": 1e-3}, {"params": [mixture[0]], "lr": 3e-2, "weight_decay": 0.1},
                {"params": [mixture[1]], "lr": 1e-4, "maximize": True}]

    ours, theirs = _FusedAdam(groups(0), fused=True), torch.optim.Adam(groups(0), fused=True)
    g = torch.Generator().manual_seed(1)
    for step in range(9):
        gradients = None
        for optimizer in (ours, theirs):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            gradients = gradients or [torch.randn(p.shape, generator=g) for p in params]
            for i, (p, grad) in enumerate(zip(params, gradients)):
                # a parameter without a gradient at step 3, none with one at step 4, only the first at step 5
                p.grad = None if (step == 3 and i == 1) or step == 4 or (step == 5 and i > 0) else grad.clone()
            if step == 6:  # a counter of another dtype, set by hand, is not joined to the others
                optimizer.state[params[2]]["step"] = torch.tensor(7.0, dtype=torch.float64)
            optimizer.step()
    assert torch_steps.count(_FusedAdam) == 1  # the first step creates the state; the others take the direct call
    for group_ours, group_theirs in zip(ours.param_groups, theirs.param_groups):
        for a, b in zip(group_ours["params"], group_theirs["params"]):
            assert torch.equal(a, b)
    saved = ours.state_dict()
    reference = theirs.state_dict()
    for key in reference["state"]:
        for name, value in reference["state"][key].items():
            assert torch.equal(saved["state"][key][name], value) and saved["state"][key][name].dtype == value.dtype


def test_the_fit_loops_adam_continues_bitwise_from_a_saved_and_loaded_state():
    """The shared step counters survive torch.save, torch.load (weights_only) and load_state_dict into one optimiser."""
    import io

    from bayes_sws.optim import _FusedAdam

    def parameters():
        g = torch.Generator().manual_seed(3)
        return [torch.randn(6, 5, generator=g, requires_grad=True), torch.randn(4, generator=g, requires_grad=True)]

    def step(optimizer, seed):
        g = torch.Generator().manual_seed(seed)
        for p in (p for group in optimizer.param_groups for p in group["params"]):
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()

    ours_params, theirs_params = parameters(), parameters()
    ours = _FusedAdam([{"params": ours_params[:1], "lr": 1e-2}, {"params": ours_params[1:], "lr": 1e-3}], fused=True)
    theirs = torch.optim.Adam([{"params": theirs_params[:1], "lr": 1e-2}, {"params": theirs_params[1:], "lr": 1e-3}],
                              fused=True)
    for seed in range(3):
        step(ours, seed), step(theirs, seed)
    buffer, saved = io.BytesIO(), [p.detach().clone() for p in ours_params]
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    for seed in range(3, 5):  # steps the loaded state must undo
        step(ours, 100 + seed)
    ours.load_state_dict(torch.load(buffer, weights_only=True))
    for a, b in zip(ours_params, saved):
        a.detach().copy_(b)
    for seed in range(3, 6):
        step(ours, seed), step(theirs, seed)
    for a, b in zip(ours_params, theirs_params):
        assert torch.equal(a, b)
    for a, b in zip(ours.state_dict()["state"].values(), theirs.state_dict()["state"].values()):
        assert all(torch.equal(a[name], b[name]) for name in b)
        assert float(a["step"]) == 6.0


def test_the_fit_loops_adam_runs_step_hooks_once_a_step_also_where_torchs_adam_has_its_own():
    from bayes_sws.optim import _FusedAdam

    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])  # torch wraps Adam.step in the hook runner
    x = torch.nn.Parameter(torch.zeros(3))
    optimizer = _FusedAdam([x], fused=True)
    calls = []
    optimizer.register_step_pre_hook(lambda *args: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *args: calls.append("post"))
    for _ in range(3):
        x.grad = torch.ones(3)
        optimizer.step()
    assert calls == ["pre", "post"] * 3
