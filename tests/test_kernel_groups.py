"""mixture_log_prob_sum over a sequence of weight tensors (one mixture group): one pass, per-tensor gradients."""

from __future__ import annotations

import pytest
import torch

from bayes_sws import kernels
from bayes_sws.prior import GaussianMixture, mixture_log_prob_sum

F64 = torch.float64


def _mixture(generator, batch=(), j=4, dtype=F64) -> GaussianMixture:
    return GaussianMixture(torch.log_softmax(torch.randn(*batch, j, generator=generator, dtype=dtype), -1),
                           0.5 * torch.randn(*batch, j, generator=generator, dtype=dtype),
                           0.1 + torch.rand(*batch, j, generator=generator, dtype=dtype))


def _grads(fn, tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    value = fn(leaves)
    cotangent = torch.linspace(0.5, 1.5, value.numel(), dtype=value.dtype).reshape(value.shape)
    return value.detach(), torch.autograd.grad((cotangent * value).sum(), leaves)


def _group_and_singles(weights, mixture, event_dims, chunk_size=None):
    """(value, grads) of the sequence call and of the sum of single-tensor calls, leaves: weights then mixture."""
    count = len(weights)

    def group(leaves):
        return mixture_log_prob_sum(leaves[:count], GaussianMixture(*leaves[count:]), event_dim=event_dims,
                                    chunk_size=chunk_size)

    def singles(leaves):
        mixture = GaussianMixture(*leaves[count:])
        return sum(mixture_log_prob_sum(t, mixture, event_dim=k, chunk_size=chunk_size)
                   for t, k in zip(leaves[:count], event_dims))

    return _grads(group, [*weights, *mixture]), _grads(singles, [*weights, *mixture])


CASES = {
    # name: (weight shapes, event_dims, mixture batch)
    "layer_and_bias": ([(30, 20), (30,)], (2, 1), ()),
    "three_layers_one_event_dim": ([(5, 40), (5, 3), (5, 1)], (1, 1, 1), ()),
    "vi_particles": ([(3, 1, 30, 20), (3, 1, 30)], (2, 1), (3, 1)),
    "one_weights_many_mixtures": ([(30, 20), (7,)], (2, 1), (2,)),
    "an_empty_tensor_among_them": ([(40,), (0,), (9,)], (1, 1, 1), ()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_group_call_equals_the_sum_of_single_calls_with_each_tensors_gradient_in_its_shape(case, kernel_backend):
    shapes, event_dims, mixture_batch = CASES[case]
    g = torch.Generator().manual_seed(41)
    weights = [0.7 * torch.randn(shape, generator=g, dtype=F64) for shape in shapes]
    mixture = _mixture(g, mixture_batch)
    (value, grads), (expected_value, expected_grads) = _group_and_singles(weights, mixture, event_dims, chunk_size=16)
    torch.testing.assert_close(value, expected_value, rtol=1e-12, atol=1e-12)
    for grad, expected, leaf in zip(grads, expected_grads, [*weights, *mixture]):
        assert grad.shape == leaf.shape
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        without_grad = mixture_log_prob_sum(weights, mixture, event_dim=event_dims)
    torch.testing.assert_close(without_grad, expected_value, rtol=1e-12, atol=1e-12)


def test_one_event_dim_for_all_tensors_is_the_same_as_one_per_tensor(kernel_backend):
    g = torch.Generator().manual_seed(42)
    weights = [torch.randn(4, 9, generator=g, dtype=F64), torch.randn(4, 2, generator=g, dtype=F64)]
    mixture = _mixture(g)
    shared = mixture_log_prob_sum(weights, mixture, event_dim=1)
    assert shared.shape == (4,)
    torch.testing.assert_close(shared, mixture_log_prob_sum(weights, mixture, event_dim=[1, 1]), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_native_threads_split_the_group_across_tensor_boundaries_and_agree_with_single_calls(dtype):
    if not kernels.native_available():
        pytest.skip("no C compiler here")
    g = torch.Generator().manual_seed(43)
    # 4 threads of about 11_000 weights each: their ranges start and end inside the tensors
    weights = [(0.3 * torch.randn(shape, generator=g, dtype=F64)).to(dtype) for shape in [(150, 200), (5,), (14_001,)]]
    mixture = _mixture(g, j=7, dtype=dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        with kernels.use_backend("native"):
            (value, grads), (expected_value, expected_grads) = _group_and_singles(weights, mixture, (2, 1, 1))
    finally:
        torch.set_num_threads(threads)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(value, expected_value, rtol=tolerance, atol=0)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=tolerance, atol=tolerance * float(expected.abs().max()))


def test_a_group_in_float64_promotes_float32_tensors_and_returns_their_gradients_in_float32():
    g = torch.Generator().manual_seed(44)
    weights = [torch.randn(20, generator=g).requires_grad_(), torch.randn(3, generator=g, dtype=F64).requires_grad_()]
    value = mixture_log_prob_sum(weights, _mixture(g))
    value.backward()
    assert value.dtype == F64
    assert [w.grad.dtype for w in weights] == [torch.float32, F64]


def test_tensors_of_broadcastable_batch_shapes_sum_as_their_single_calls_broadcast():
    g = torch.Generator().manual_seed(45)
    mixture = _mixture(g)
    draws, single = torch.randn(3, 1, 5, generator=g).requires_grad_(), torch.randn(4, generator=g).requires_grad_()
    value = mixture_log_prob_sum([draws, single], mixture, event_dim=1)
    expected = mixture_log_prob_sum(draws, mixture) + mixture_log_prob_sum(single, mixture)
    assert value.shape == (3, 1)
    torch.testing.assert_close(value, expected)
    value.sum().backward()
    assert single.grad.shape == single.shape and draws.grad.shape == draws.shape
    alone = single.detach().clone().requires_grad_()
    mixture_log_prob_sum(alone, mixture).backward()
    torch.testing.assert_close(single.grad, 3 * alone.grad)  # the broadcast sum counts it once per draw


@pytest.mark.parametrize(("weights", "event_dim", "message"), [
    ([], 1, "non-empty sequence of tensors"),
    ([torch.zeros(2, 3), torch.zeros(3, 3)], 1, r"batch shapes do not broadcast: \(2,\), \(3,\)"),
    ([torch.zeros(2, 3), torch.zeros(3)], (1, 2), r"event_dim must lie in \[0, 1\]"),
    ([torch.zeros(3), torch.zeros(3)], (1,), "gives 1 dimension counts for 2 weight tensors"),
    ([torch.zeros(3), torch.zeros(3, device="meta")], 1, "on one device, got cpu, meta"),
])
def test_a_malformed_group_is_a_value_error_naming_the_problem(weights, event_dim, message):
    mixture = GaussianMixture(torch.zeros(1), torch.zeros(1), torch.ones(1))
    with pytest.raises(ValueError, match=message):
        mixture_log_prob_sum(weights, mixture, event_dim=event_dim)


@pytest.mark.parametrize("case", ["layer_and_bias", "vi_particles"])
def test_a_second_backward_pass_through_a_retained_graph_gives_the_same_gradients(case, kernel_backend):
    shapes, event_dims, mixture_batch = CASES[case]
    g = torch.Generator().manual_seed(43)
    leaves = [(0.7 * torch.randn(shape, generator=g, dtype=F64)).requires_grad_() for shape in shapes]
    mixture = [t.requires_grad_() for t in _mixture(g, mixture_batch)]
    value = mixture_log_prob_sum(leaves, GaussianMixture(*mixture), event_dim=event_dims).sum()
    (-3.0 * value).backward(retain_graph=True)
    first = [t.grad.clone() for t in (*leaves, *mixture)]
    for t in (*leaves, *mixture):
        t.grad.mul_(7.0)                      # what an optimiser may do to .grad between the passes
    (0.5 * value).backward()
    for t, before in zip((*leaves, *mixture), first):
        torch.testing.assert_close(t.grad, 7.0 * before - before / 6.0, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- the native group function
from bayes_sws.prior import Hyperpriors, SoftWeightSharingPrior, _GroupLogJoint  # noqa: E402

EVERY_HYPERPRIOR = Hyperpriors(dirichlet=2.5, means_scale=0.7, precision_gamma=(3.0, 0.5),
                               zero_precision_gamma=(40.0, 2.0), zero_proportion_beta=(5.0, 2.0))
GROUP_PRIORS = {
    "learned_pi_zero_every_hyperprior": dict(n_components=4, hyperpriors=EVERY_HYPERPRIOR),
    "learned_pi_zero_flat": dict(n_components=4),
    "fixed_pi_zero": dict(n_components=3, pi_zero=0.9, hyperpriors=Hyperpriors(precision_gamma=(2.0, 1.0))),
    "no_zero_component": dict(n_components=3, zero_component=False,
                              hyperpriors=Hyperpriors(dirichlet=0.8, means_scale=2.0)),
    "one_free_component": dict(n_components=2, hyperpriors=EVERY_HYPERPRIOR),
    "one_component": dict(n_components=1, zero_component=False),
}


def _group_coordinates(prior, dtype, generator, *, pi_zero=None):
    """Each site's coordinates in the shape AutoDelta gives them (π0's is a scalar)."""
    shapes = {"means": (prior.n_components - int(prior.zero_component),), "precisions": (prior.n_components,),
              "pi": (prior.n_free_proportions,) if prior.n_free_proportions > 1 else None,
              "pi_zero": () if prior.learns_pi_zero else None}
    coordinates = {suffix: torch.randn(shape, generator=generator, dtype=F64).to(dtype)
                   for suffix, shape in shapes.items() if shape is not None and (suffix != "means" or shape[0])}
    coordinates["precisions"] = coordinates["precisions"] + 3.0  # σ about 0.2: weights near several components
    if pi_zero is not None and "pi_zero" in coordinates:
        coordinates["pi_zero"] = torch.tensor(pi_zero, dtype=dtype)
    return coordinates


def _group_value_and_grads(prior, weights, coordinates, prior_weight, backend):
    leaves = [t.detach().clone().requires_grad_() for t in (*weights, *coordinates.values())]
    with kernels.use_backend(backend):
        value = prior.group_log_joint(leaves[:len(weights)], dict(zip(coordinates, leaves[len(weights):])),
                                      prior_weight=prior_weight)
        grads = torch.autograd.grad(2.5 * value, leaves, allow_unused=True)
    return value.detach(), grads


@pytest.mark.skipif(not kernels.native_available(), reason="the native kernel cannot be built here")
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("prior_weight", [0.37, 0.0])
@pytest.mark.parametrize("pi_zero", [None, 40.0, -120.0], ids=["pi_zero_random", "pi_zero_near_1", "pi_zero_near_0"])
@pytest.mark.parametrize("case", list(GROUP_PRIORS))
def test_the_native_group_function_equals_the_closed_form_torch_path_value_and_every_gradient(
        case, pi_zero, prior_weight, dtype):
    """One C call (mixture from coordinates, hyperpriors, kernel, coordinate gradients) against prior.py's torch."""
    prior = SoftWeightSharingPrior(**GROUP_PRIORS[case])
    g = torch.Generator().manual_seed(7)
    weights = [(0.3 * torch.randn(shape, generator=g, dtype=F64)).to(dtype) for shape in ((40, 30), (30,), (10, 40))]
    coordinates = _group_coordinates(prior, dtype, g, pi_zero=pi_zero)
    assert kernels.group_backend(weights[0], prior.n_components) is not None
    assert prior._point_plan(weights[0]).shapes == tuple(c.shape for c in coordinates.values())  # the fast path
    value, grads = _group_value_and_grads(prior, weights, coordinates, prior_weight, "native")
    expected_value, expected_grads = _group_value_and_grads(prior, weights, coordinates, prior_weight, "torch")
    tolerance = 1e-12 if dtype == F64 else 2e-6
    torch.testing.assert_close(value, expected_value, rtol=tolerance, atol=tolerance * expected_value.abs().item())
    for got, expected in zip(grads, expected_grads):
        if expected is None:  # λ = 0: the weights take no gradient
            assert got is None or not got.any()
            continue
        assert got.dtype == dtype and got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=tolerance * max(expected.abs().max().item(), 1.0))


def test_the_group_function_is_only_chosen_where_the_native_kernel_is_in_force(monkeypatch):
    w = torch.zeros(10)
    with kernels.use_backend("torch"):
        assert kernels.group_backend(w, 3) is None
    if kernels.native_available():
        with kernels.use_backend("native"):
            native = kernels.group_backend(w, 3)
            assert native is not None and native.has_groups(w)
            monkeypatch.setattr(native, "_groups", {})  # a library built from an earlier kernel source
            assert kernels.group_backend(w, 3) is None


@pytest.mark.skipif(not kernels.native_available(), reason="the native kernel cannot be built here")
def test_a_native_library_without_the_group_function_falls_back_to_the_torch_path_with_equal_results(monkeypatch):
    prior = SoftWeightSharingPrior(n_components=4, hyperpriors=EVERY_HYPERPRIOR)
    g = torch.Generator().manual_seed(3)
    weights = [0.3 * torch.randn(20, 10, generator=g, dtype=F64)]
    coordinates = _group_coordinates(prior, F64, g)
    expected_value, expected_grads = _group_value_and_grads(prior, weights, coordinates, 0.5, "native")
    with kernels.use_backend("native"):
        monkeypatch.setattr(kernels.backend(weights[0], 4), "_groups", {})
    value, grads = _group_value_and_grads(prior, weights, coordinates, 0.5, "native")
    torch.testing.assert_close(value, expected_value, rtol=1e-12, atol=0)
    for got, expected in zip(grads, expected_grads):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_a_prior_that_has_evaluated_its_group_pickles_and_deep_copies_and_its_copies_evaluate_alike():
    import copy
    import pickle

    prior = SoftWeightSharingPrior(n_components=4, hyperpriors=EVERY_HYPERPRIOR)
    g = torch.Generator().manual_seed(5)
    weights = [0.3 * torch.randn(20, 10, generator=g, dtype=F64)]
    coordinates = _group_coordinates(prior, F64, g)
    expected_value, expected_grads = _group_value_and_grads(prior, weights, coordinates, 0.5, "auto")
    for duplicate in (pickle.loads(pickle.dumps(prior)), copy.deepcopy(prior)):
        del prior  # the copy must not lean on the original's cached plan
        value, grads = _group_value_and_grads(duplicate, weights, coordinates, 0.5, "auto")
        torch.testing.assert_close(value, expected_value, rtol=0, atol=0)
        for got, expected in zip(grads, expected_grads):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
        prior = duplicate


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_weights_that_need_no_gradient_get_none_and_the_coordinates_the_same_gradients(backend):
    if backend == "native" and not kernels.native_available():
        pytest.skip("the native kernel cannot be built here")
    prior = SoftWeightSharingPrior(n_components=4, hyperpriors=EVERY_HYPERPRIOR)
    g = torch.Generator().manual_seed(6)
    weights = [0.3 * torch.randn(20, 10, generator=g, dtype=F64), 0.3 * torch.randn(10, generator=g, dtype=F64)]
    coordinates = _group_coordinates(prior, F64, g)
    plan = prior._point_plan(weights[0])
    tensors = (*(coordinates[s] for s in plan.suffixes), *weights)
    with kernels.use_backend(backend):
        value, grad_weights, grad_coordinates, sign = _GroupLogJoint._evaluate(plan, 0.5, tensors, False)
        expected_value, expected_weights, expected_coordinates, expected_sign = \
            _GroupLogJoint._evaluate(plan, 0.5, tensors, True)
    assert grad_weights is None and len(expected_weights) == len(weights)
    assert sign == expected_sign == (-1 if backend == "native" else 1)
    torch.testing.assert_close(value, expected_value, rtol=0, atol=0)
    for got, expected in zip(grad_coordinates, expected_coordinates):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_a_loss_of_minus_the_group_term_gets_exactly_minus_its_gradients(backend, dtype):
    """The native node writes its gradients negated and hands them on as they are to an upstream −1 (the MAP loss)."""
    if backend == "native" and not kernels.native_available():
        pytest.skip("the native kernel cannot be built here")
    prior = SoftWeightSharingPrior(n_components=4, hyperpriors=EVERY_HYPERPRIOR)
    g = torch.Generator().manual_seed(11)
    weights = [(0.3 * torch.randn(shape, generator=g, dtype=F64)).to(dtype) for shape in ((20, 10), (10,))]
    coordinates = _group_coordinates(prior, dtype, g)

    def gradients(upstream: float) -> list[torch.Tensor]:
        leaves = [t.detach().clone().requires_grad_() for t in (*weights, *coordinates.values())]
        with kernels.use_backend(backend):
            value = prior.group_log_joint(leaves[:len(weights)], dict(zip(coordinates, leaves[len(weights):])),
                                          prior_weight=0.37)
        (upstream * value).backward()
        return [leaf.grad for leaf in leaves]

    for loss_gradient, value_gradient in zip(gradients(-1.0), gradients(1.0)):
        assert torch.equal(loss_gradient, -value_gradient)
    _, expected = _group_value_and_grads(prior, weights, coordinates, 0.37, "torch")
    for got, reference in zip(gradients(-1.0), expected):
        torch.testing.assert_close(got, -reference / 2.5, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)
