"""The local reparameterisation trick: the likelihood from sampled pre-activations, not sampled weights.

Under a mean-field Normal posterior q(w) = Π N(w | m, s²), a Linear layer's
pre-activation a = x·w + b given its input x is Gaussian with mean x·m + b and
variance x²·s² (+ s_b² for a bias under the prior); a Conv2d layer's has mean
conv(x, m) + b and variance conv(x², s²) (+ s_b²). Sampling ``a`` directly, with
independent noise per example, gives the likelihood term a lower-variance estimate
(Kingma, Salimans & Welling 2015).

What is sampled where, in the ELBO of :func:`~bayes_sws.inference.vi_loss` with
``local_reparameterization=True`` (:class:`~bayes_sws.inference.NegativeELBO`):

* the **prior and entropy terms** (λ·log p(w | π, μ, σ), log p(π, μ, σ), −log q) use
  weights w drawn from the guide, exactly as ``Trace_ELBO`` does: the mixture prior
  needs w itself;
* the **likelihood term** log p(y | x, w) uses pre-activations drawn layer by layer
  from the Gaussians above (given the previous layer's sampled activations), with
  fresh noise per example and particle; the weight draws of the first point do not
  enter the network.

For networks of Linear layers this leaves the expected ELBO exactly unchanged: each
example's joint distribution of pre-activations is the same as under weight
sampling (the rows of w are independent under q). For Conv2d layers each output
position gets its own noise, while under weight sampling positions of one example
share a kernel draw: each pre-activation's marginal is right, their correlation
within an example is dropped, so the expected ELBO of a conv net is close to, not
equal to, the weight-sampling one.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from pyro.infer.autoguide import AutoGuideList, AutoNormal
from torch import nn
from torch.distributions import constraints

__all__ = [
    "WeightPosterior",
    "active_weight_posterior",
    "check_local_layers",
    "local_outputs",
    "mean_field_part",
    "weight_posterior",
]

WeightPosterior = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Site name → (location m, scale s) of its mean-field Normal posterior, both ``site_shape``."""

_ACTIVE: contextvars.ContextVar[WeightPosterior | None] = contextvars.ContextVar(
    "bayes_sws_weight_posterior", default=None)
_LOCAL_LAYERS = (nn.Linear, nn.Conv2d)


@contextlib.contextmanager
def weight_posterior(posterior: WeightPosterior) -> Iterator[None]:
    """Within, the model computes its outputs by :func:`local_outputs` from this posterior."""
    token = _ACTIVE.set(posterior)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_weight_posterior() -> WeightPosterior | None:
    """The posterior set by :func:`weight_posterior`, or ``None`` outside it."""
    return _ACTIVE.get()


def _layers(network: nn.Module, sites: list[str]) -> dict[nn.Module, tuple[str, str | None]]:
    """Each module holding a prior site → (its weight site, its bias site or ``None``)."""
    chosen = set(sites)
    layers: dict[nn.Module, tuple[str, str | None]] = {}
    for prefix, module in network.named_modules():
        dot = f"{prefix}." if prefix else ""
        weight, bias = f"{dot}weight", f"{dot}bias"
        if weight in chosen or bias in chosen:
            layers[module] = (weight, bias if bias in chosen else None)
    return layers


def check_local_layers(network: nn.Module, sites: list[str]) -> None:
    """Refuse prior sites the trick cannot handle: layers other than Linear and zero-padded Conv2d.

    Raises
    ------
    ValueError
        Naming the first such layer.
    """
    for module, (weight, _) in _layers(network, sites).items():
        if not isinstance(module, _LOCAL_LAYERS) or weight not in sites:
            raise ValueError(f"local reparameterisation handles Linear and Conv2d weights only, "
                             f"not {type(module).__name__} at {weight!r}")
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            raise ValueError(f"local reparameterisation needs zero padding; {weight!r} pads with "
                             f"{module.padding_mode!r}")


def _variance(module: nn.Module, inputs: torch.Tensor, weight_variance: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return F.linear(inputs.square(), weight_variance)
    return F.conv2d(inputs.square(), weight_variance, None, module.stride, module.padding,
                    module.dilation, module.groups)


def local_outputs(network: nn.Module, posterior: WeightPosterior, x: torch.Tensor, *,
                  particles: torch.Size) -> torch.Tensor:
    """The network on ``x`` with every prior layer's pre-activations sampled from q.

    Parameters
    ----------
    network : nn.Module
        Its Linear / Conv2d layers hold the sites in ``posterior`` (checked by
        :func:`check_local_layers`); other parameters are its own.
    posterior : WeightPosterior
    x : Tensor of shape ``(B, *input_shape)``
    particles : torch.Size
        Independent draws wanted, e.g. ``(S,)`` for S vectorised ELBO particles or ``()``.

    Returns
    -------
    Tensor of shape ``(*particles, B, *output_shape)``: the examples are repeated
    once per particle (one batched forward pass) and every pre-activation gets its own noise.
    """
    count = particles.numel()
    batch = x.shape[0]
    repeated = x.expand(count, *x.shape).reshape(count * batch, *x.shape[1:])
    handles = []

    def add_noise(sites: tuple[str, str | None]):
        weight, bias = sites

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            variance = _variance(module, inputs[0], posterior[weight][1].square())
            if bias is not None:
                scale = posterior[bias][1].square()
                variance = variance + (scale if isinstance(module, nn.Linear) else scale[:, None, None])
            # clamped: an input row of zeros (after a ReLU) has zero variance, and sqrt'(0) is infinite
            return output + variance.clamp_min(torch.finfo(variance.dtype).tiny).sqrt() * torch.randn_like(output)

        return hook

    try:
        for module, sites in _layers(network, list(posterior)).items():
            handles.append(module.register_forward_hook(add_noise(sites)))
        means = {name: location for name, (location, _) in posterior.items()}
        outputs = torch.func.functional_call(network, means, (repeated,))
    finally:
        for handle in handles:
            handle.remove()
    return outputs.reshape(*particles, batch, *outputs.shape[1:])


def mean_field_part(guide: AutoGuideList | AutoNormal, sites: list[str]) -> AutoNormal | None:
    """The ``AutoNormal`` (the guide itself, or a part of a guide list) over exactly ``sites``, all of real support.

    Such a part draws each site as loc + scale·ε, ε ~ N(0, I): the weights' mean-field
    Normal posterior, whose locations and scales the trick uses. ``None`` if there is none.
    """
    parts = list(guide) if isinstance(guide, AutoGuideList) else [guide]
    for part in parts:
        if isinstance(part, AutoNormal) and part.prototype_trace is not None and set(part._event_dims) == set(sites) \
                and all(_is_real(site["fn"].support) and not site["cond_indep_stack"]
                        for _, site in part.prototype_trace.iter_stochastic_nodes()):
            return part
    return None


def _is_real(support: constraints.Constraint) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real
