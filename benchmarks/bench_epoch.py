"""Benchmark: one training epoch of LeNet-300-100 on Fashion-MNIST, plain, plain-torch SWS, the library's MAP and VI fits.

  (a) plain  a plain torch loop: fused Adam on the summed cross-entropy, no prior
  (b) sws    the MAP objective E·N/B + λΩ − log p(π, μ, 1/σ²) written as a plain torch
             loop: the network's own forward, the mixture sites as raw unconstrained
             tensors (AutoDelta's coordinates), the prior's fused kernel called once
             per weight tensor, torch's fused Adam over the same four learning-rate groups.
             No Pyro, but autograd through the mixture sites and hyperpriors, where (c)
             carries their gradients in closed form
  (c) map    ``bayes_sws.fit_map`` itself, one epoch: the library's own fit loop with
             AutoDelta and map_loss
  (d) vi     ``bayes_sws.fit_vi`` itself, one epoch from the network's initial weights,
             with the specification's ``[inference.vi]`` settings (S particles, guide,
             initial scale, learning rates): the fit loop with vi_guide and vi_loss
  (e) map-no-prior  (c) at λ = 0: the same loop and hyperpriors without the prior's pass
             over the weights, so that (c) − (e) is what that pass costs inside an epoch

``--methods`` picks which run (plain always: it is the baseline); by default a, b and c.

The model, its prior (17 components, π0 = 0.999 fixed, Gamma hyperpriors), λ and the
learning rates are those of ``models/fashion-lenet-300-100.toml`` (``--spec``); all three
take the same shuffled minibatches of ``--batch-size`` over the 60,000 training images,
float32, ``--threads`` torch threads. (c) is timed by the fit's own clock
(``FitState.seconds``), which a 512-image test split keeps free of evaluation time, and
so is (d); with ``--clock cpu`` (one thread) every trainer is timed by this thread's CPU
time, for (c) around ``fit`` and for (d) around ``fit_vi`` (their end-of-epoch evaluation
on the 512 images included, and for (d) the guide's set-up), which other
processes on a shared machine move far less than the wall clock. The
machine's speed drifts, so the trainers take turns for ``--rounds`` rounds; the ratios
b/a, c/a, d/a and e/a are formed within each round and their medians and ranges are printed.
Before timing, the library's MAP loss and (b)'s on one batch are checked against the
objective in float64, and with (d) the library's VI loss against
``Trace_ELBO(vectorize_particles=True).differentiable_loss`` on the same draws. After the
rounds, ``--breakdown-steps`` steps of (c) are taken apart: each piece of the library's
step timed alone (median per step), the rest by difference.

Run:  PYTHONPATH=. .venv/bin/python benchmarks/bench_epoch.py --rounds 3 --batch-size 128 256
      (on a loaded machine: --threads 1 --clock cpu)
      PYTHONPATH=. .venv/bin/python benchmarks/bench_epoch.py --methods plain map vi --batch-size 256 \
          --breakdown-steps 0 --threads 1 --clock cpu
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyro
import torch
from pyro.infer import Trace_ELBO
from torch import nn
from torch.distributions import constraints, transform_to

import bayes_sws as sws
from bayes_sws import fitting, inference, kernels
from bayes_sws.experiment import build_model
from bayes_sws.local_reparam import weight_posterior
from bayes_sws.model import _mixture_sites

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ForeignLoad, loadavg, wait_until_idle, warn_if_loaded, write_json  # noqa: E402

SPEC = Path(__file__).resolve().parent.parent / "models" / "fashion-lenet-300-100.toml"
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
SITE_SUPPORTS = {"means": constraints.real, "precisions": constraints.positive, "pi": constraints.simplex,
                 "pi_zero": constraints.unit_interval}


def spec_model(spec: sws.Spec, seed: int) -> sws.SoftWeightSharingModel:
    """The specification's model, its network initialised from ``seed``."""
    return build_model(dataclasses.replace(spec, seed=seed), input_shape=(1, 28, 28), task="classification",
                       n_outputs=10)


def plain_epoch(spec: sws.Spec, data: sws.Dataset, batch_size: int, seed: int, clock: Callable[[], float]) -> float:
    network = spec_model(spec, seed).network
    optimizer = torch.optim.Adam(network.parameters(), lr=spec.inference.learning_rates.weights, fused=True)
    generator = torch.Generator().manual_seed(seed)
    started = clock()
    for index in sws.data.batches(data.train_x.shape[0], batch_size=batch_size, generator=generator):
        optimizer.zero_grad(set_to_none=True)
        x, y = data.train_x.index_select(0, index), data.train_y.index_select(0, index)  # the fit loop's gather
        loss = nn.functional.cross_entropy(network(x), y, reduction="sum")
        loss.backward()
        optimizer.step()
        loss.item()  # the library's loop reads each step's loss too
    return clock() - started


class PlainSWS:
    """The MAP objective of a model as a plain torch function of its network and raw mixture tensors."""

    def __init__(self, model: sws.SoftWeightSharingModel) -> None:
        self.model = model
        (self.group,) = model.groups
        values = model.initial_values()
        prefix = f"{self.group}."
        self.unconstrained = {
            key[len(prefix):]: transform_to(SITE_SUPPORTS[key[len(prefix):]]).inv(value).clone().requires_grad_()
            for key, value in values.items() if key.startswith(prefix)
        }
        like = values[model.prior_sites[0]]
        self.hyperpriors = model.prior._site_priors(like)
        parameters = dict(model.network.named_parameters())
        self.weights = [parameters[name] for name in model.prior_sites]

    def loss(self, x: torch.Tensor, y: torch.Tensor, data_size: int) -> torch.Tensor:
        sites = {suffix: transform_to(SITE_SUPPORTS[suffix])(u) for suffix, u in self.unconstrained.items()}
        mixture = self.model.prior.assemble(sites, like=self.weights[0])
        likelihood = nn.functional.cross_entropy(self.model.network(x), y, reduction="sum")
        prior = sum(sws.mixture_log_prob_sum(w, mixture, event_dim=w.dim()) for w in self.weights)
        hyper = sum(self.hyperpriors[suffix].log_prob(value) for suffix, value in sites.items())
        return data_size / x.shape[0] * likelihood - self.model.prior_weight * prior - hyper

    def optimizer(self, rates: sws.LearningRates) -> torch.optim.Optimizer:
        groups = [{"params": list(self.model.network.parameters()), "lr": rates.weights}]
        groups += [{"params": [u], "lr": getattr(rates, fitting.parameter_group(suffix))}
                   for suffix, u in self.unconstrained.items()]
        return torch.optim.Adam(groups, fused=True)


def sws_epoch(spec: sws.Spec, data: sws.Dataset, batch_size: int, seed: int, clock: Callable[[], float]) -> float:
    plain = PlainSWS(spec_model(spec, seed))
    optimizer = plain.optimizer(spec.inference.learning_rates)
    generator = torch.Generator().manual_seed(seed)
    n = data.train_x.shape[0]
    started = clock()
    for index in sws.data.batches(n, batch_size=batch_size, generator=generator):
        optimizer.zero_grad(set_to_none=True)
        loss = plain.loss(data.train_x.index_select(0, index), data.train_y.index_select(0, index), n)
        loss.backward()
        optimizer.step()
        loss.item()
    return clock() - started


def map_epoch(spec: sws.Spec, data: sws.Dataset, batch_size: int, seed: int, clock: Callable[[], float]) -> float:
    """One epoch of the library's fit loop (``fit_map`` is ``start_fit`` then ``fit``): the fit's own clock."""
    model = spec_model(spec, seed)
    with fitting.library_scope():
        state = fitting.start_fit(model, sws.map_guide(model), data, loss=inference.map_loss, batch_size=batch_size,
                                  learning_rates=spec.inference.learning_rates, seed=seed)
    started = clock()
    fitting.fit(state, data, epochs=1, progress=False)
    return state.seconds if clock is time.perf_counter else clock() - started


def vi_epoch(spec: sws.Spec, data: sws.Dataset, batch_size: int, seed: int, clock: Callable[[], float]) -> float:
    """One epoch of ``fit_vi`` from the network's initial weights: the fit's own clock, or the CPU clock around the call."""
    model = spec_model(spec, seed)
    vi = spec.inference.vi
    started = clock()
    state = sws.fit_vi(model, data, epochs=1, batch_size=batch_size, learning_rates=vi.learning_rates,
                       num_particles=vi.num_particles, init_scale=vi.init_scale, mixture_guide=vi.mixture_guide,
                       local_reparameterization=vi.local_reparameterization, seed=seed, progress=False)
    return state.seconds if clock is time.perf_counter else clock() - started


def check_vi_loss(spec: sws.Spec, data: sws.Dataset, batch_size: int) -> float:
    """Relative difference of the timed VI loss (local reparameterisation as specified) from ``Trace_ELBO``'s.

    On one batch, the same draws.
    """
    model = spec_model(spec, 0)
    vi = spec.inference.vi
    x, y, n = data.train_x[:batch_size], data.train_y[:batch_size], data.train_x.shape[0]
    elbo = Trace_ELBO(num_particles=vi.num_particles, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad(), fitting.library_scope():
        guide = sws.vi_guide(model, init_scale=vi.init_scale, mixture_guide=vi.mixture_guide)
        guide(x, y, data_size=n)
        # with local reparameterisation Trace_ELBO's model takes the weights' posterior as vi_loss's does
        posterior = {name: guide[0]._get_loc_and_scale(name) for name in model.prior_sites}
        local = weight_posterior(posterior) if vi.local_reparameterization else contextlib.nullcontext()
        losses = []
        for loss, context in ((sws.vi_loss(num_particles=vi.num_particles,
                                           local_reparameterization=vi.local_reparameterization),
                               contextlib.nullcontext()), (elbo.differentiable_loss, local)):
            with torch.random.fork_rng(), context:
                torch.manual_seed(0)
                losses.append(float(loss(model, guide, x, y, data_size=n)))
    return abs(losses[0] - losses[1]) / abs(losses[1])


def check_objective(spec: sws.Spec, data: sws.Dataset, batch_size: int) -> dict[str, float]:
    """Relative differences of the library's loss and (b)'s from the objective in float64, on one batch."""
    model = spec_model(spec, 0)
    values = model.initial_values()
    x, y, n = data.train_x[:batch_size], data.train_y[:batch_size], data.train_x.shape[0]
    with torch.no_grad(), fitting.library_scope():
        guide = sws.map_guide(model)
        library = float(inference.map_loss(model, guide, x, y, data_size=n))
        plain = float(PlainSWS(model).loss(x, y, n))
        network = torch.func.functional_call(model.network, {k: values[k] for k in model.prior_sites}, (x,))
        mixture = model.mixtures(values)[next(iter(model.groups))]
        weights = torch.cat([values[k].reshape(-1) for k in model.prior_sites])
        exact = float(n / batch_size * nn.functional.cross_entropy(network.double(), y, reduction="sum")
                      - model.prior_weight * sws.mixture_log_density(weights.double(), sws.GaussianMixture(
                          *(t.double() for t in mixture))).sum()
                      - model.prior.log_hyperprior(mixture))
    return {"map": abs(library - exact) / abs(exact), "sws": abs(plain - exact) / abs(exact)}


def step_breakdown(spec: sws.Spec, data: sws.Dataset, batch_size: int, steps: int,
                   clock: Callable[[], float]) -> dict[str, float]:
    """Milliseconds per step of the library's MAP step, piece by piece (medians over ``steps``).

    Pieces timed alone: the network (forward, likelihood, backward), the prior's kernel
    (value and gradients over every weight of every group), the whole prior term
    (``group_log_joint``: mixture sites, hyperpriors, kernel, backward), the finite
    check and the optimiser. By difference: the rest of ``map_loss`` and the loop's own
    bookkeeping. Every step times each piece in turn, so a change of the machine's
    speed touches all of them alike. The network and mixture stay at their starting
    point (broad early-training components), where the kernel costs most.
    """
    model = spec_model(spec, 0)
    x, y, n = data.train_x, data.train_y, data.train_x.shape[0]
    generator = torch.Generator().manual_seed(0)
    indices = [torch.randperm(n, generator=generator)[:batch_size] for _ in range(steps)]
    batches = [(x.index_select(0, index), y.index_select(0, index)) for index in indices]  # the fit loop's gather
    with fitting.library_scope():
        guide = sws.map_guide(model)
        state = fitting.start_fit(model, guide, data, loss=inference.map_loss, batch_size=batch_size,
                                  learning_rates=spec.inference.learning_rates, seed=0)
        parameters = [p for group in state.optimizer.param_groups for p in group["params"]]
        coordinates = inference._point_coordinates(model, guide, (x[:1], y[:1]), {"data_size": n})
        if coordinates is None:
            raise SystemExit("error: the fit loop's MAP loss does not take SoftWeightSharingModel.log_joint here")
        weights = {name: coordinates[name] for name in model.prior_sites}
        groups = {group: ([weights[name] for name in names], _mixture_sites(coordinates, group))
                  for group, names in model.groups.items()}
        mixtures = {g: sws.GaussianMixture(*(t.detach().contiguous() for t in m))
                    for g, m in model.mixtures(state.values).items()}
        value = inference.map_loss(model, guide, *batches[0], data_size=n).detach()

        def zero() -> None:
            for parameter in parameters:
                parameter.grad = None

        def network(i: int) -> None:
            zero()
            outputs = model.outputs(weights, batches[i][0])
            (-(n / batch_size) * model.likelihood.log_prob_sum(outputs, batches[i][1])).backward()

        def kernel(i: int) -> None:
            for group, (tensors, _) in groups.items():
                mixture = mixtures[group]
                summary = tensors[0].new_empty(1 + 3 * mixture.means.numel())
                kernels.backend(tensors[0], mixture.means.numel()).value_and_grads(
                    [t.detach().view(-1) for t in tensors], tuple(mixture),
                    [torch.empty_like(t).view(-1) for t in tensors], summary)

        def prior(i: int) -> None:
            zero()
            sum(-model.prior.group_log_joint(tensors, sites, prior_weight=model.prior_weight)
                for tensors, sites in groups.values()).backward()

        def loss(i: int) -> None:
            zero()
            inference.map_loss(model, guide, *batches[i], data_size=n).backward()

        pieces = {"network fwd+bwd": network, "prior kernel": kernel, "prior term": prior,
                  "map_loss fwd+bwd": loss,
                  "finite check": lambda i: fitting._checked_loss(state, value, parameters),
                  "optimiser (fused Adam)": lambda i: state.optimizer.step(),
                  "step": lambda i: fitting._take_step(state, indices[i], x, y, n)}
        times: dict[str, list[float]] = {name: [] for name in pieces}
        for i in range(steps):
            for name, piece in pieces.items():
                started = clock()
                piece(i)
                times[name].append(clock() - started)
    ms = {name: 1e3 * statistics.median(t[steps // 10:]) for name, t in times.items()}
    step, loss_ms, prior_ms = ms.pop("step"), ms.pop("map_loss fwd+bwd"), ms.pop("prior term")
    ms["prior besides the kernel (by difference)"] = prior_ms - ms["prior kernel"]
    ms["rest of map_loss (by difference)"] = loss_ms - ms["network fwd+bwd"] - prior_ms
    ms["batch gather and loop bookkeeping (by difference)"] = \
        step - loss_ms - ms["finite check"] - ms["optimiser (fused Adam)"]
    ms["step"] = step
    return ms


def map_epoch_without_prior(spec: sws.Spec, data: sws.Dataset, batch_size: int, seed: int,
                            clock: Callable[[], float]) -> float:
    """:func:`map_epoch` at λ = 0 (the hyperpriors stay)."""
    return map_epoch(dataclasses.replace(spec, prior=dataclasses.replace(spec.prior, weight=0.0)), data, batch_size,
                     seed, clock)


TRAINERS = {"plain": ("a", plain_epoch), "sws": ("b", sws_epoch), "map": ("c", map_epoch), "vi": ("d", vi_epoch),
            "map-no-prior": ("e", map_epoch_without_prior)}


def run_batch_size(spec: sws.Spec, data: sws.Dataset, batch_size: int, args: argparse.Namespace) -> dict:
    differences = check_objective(spec, data, batch_size)
    print(f"batch {batch_size}: loss vs the float64 objective on one batch, relative difference: "
          f"(c) map {differences['map']:.1e}, (b) sws {differences['sws']:.1e}")
    if "vi" in args.methods:
        differences["vi"] = check_vi_loss(spec, data, batch_size)
        print(f"  (d) vi loss vs Trace_ELBO's on the same draws, relative difference: {differences['vi']:.1e}")
    if max(differences.values()) > 1e-5:
        raise SystemExit("error: a timed loop does not compute the objective")
    clock = CLOCKS[args.clock]
    trainers = {name: TRAINERS[name] for name in TRAINERS if name in args.methods}
    warm_up = next(TRAINERS[name][1] for name in ("map", "vi", "sws", "plain") if name in trainers)
    warm_up(spec, data, batch_size, seed=99, clock=clock)  # builds the kernel, first-touch allocations
    ratios = [f"{letter}/a" for name, (letter, _) in trainers.items() if name != "plain"]
    records = []
    for round_ in range(1, args.rounds + 1):
        record = {"round": round_, "load_average": loadavg()}
        for name, (_, epoch) in trainers.items():
            wait_until_idle(args.wait_idle)
            with ForeignLoad() as load:
                record[name] = epoch(spec, data, batch_size, seed=round_, clock=clock)
            record["foreign_cpu_load"] = max(record.get("foreign_cpu_load", 0.0), load.fraction)
        for name, (letter, _) in trainers.items():
            if name != "plain":
                record[f"{letter}/a"] = record[name] / record["plain"]
        records.append(record)
        busy = record["foreign_cpu_load"]
        print(f"  round {round_}: " + ", ".join(f"({letter}) {name} {record[name]:.2f} s"
                                               for name, (letter, _) in trainers.items())
              + "; " + ", ".join(f"{ratio} {record[ratio]:.2f}" for ratio in ratios)
              + f"; load average {record['load_average']}{'  * busy %.0f%%' % (100 * busy) if busy > 0.1 else ''}",
              flush=True)
    keys = [*trainers, *ratios]
    median = {k: statistics.median(r[k] for r in records) for k in keys}
    spread = {k: (min(r[k] for r in records), max(r[k] for r in records)) for k in keys}
    print("  median s/epoch: " + ", ".join(f"({letter}) {median[name]:.2f} ({spread[name][0]:.2f}-{spread[name][1]:.2f})"
                                           for name, (letter, _) in trainers.items()))
    print("  " + "; ".join(f"{ratio} median {median[ratio]:.2f} (range {spread[ratio][0]:.2f}-{spread[ratio][1]:.2f})"
                           for ratio in ratios))
    warn_if_loaded(records, "rounds")
    result = {"objective_difference": differences, "rounds": records, "median": median, "spread": spread}
    if args.breakdown_steps and "map" in trainers:
        breakdown = step_breakdown(spec, data, batch_size, args.breakdown_steps, clock)
        steps = -(-data.train_x.shape[0] // batch_size)
        print(f"  (c) per step, {args.breakdown_steps} steps, load average {loadavg()} "
              f"(plain (a): {1e3 * median['plain'] / steps:.2f} ms a step):")
        for piece, value in breakdown.items():
            print(f"    {piece:34s} {value:7.3f} ms")
        result["breakdown_ms"] = breakdown
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default=str(SPEC))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=tuple(TRAINERS), default=["plain", "sws", "map"],
                        help="trainers to time (plain is always timed: the ratios' baseline)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[128])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kernels", default="auto", choices=("auto", "torch", "compile", "native"))
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="cpu: this process's CPU time (needs --threads 1), less moved by other processes")
    parser.add_argument("--breakdown-steps", type=int, default=200, help="0 skips the per-step breakdown")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each measurement wait up to this long for idle CPUs")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    args.methods = ["plain", *(m for m in args.methods if m != "plain")]
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread: pass --threads 1")
    torch.set_num_threads(args.threads)
    sws.set_backend(args.kernels)
    spec = sws.load_spec(args.spec)
    full = sws.load_dataset(spec.data.dataset)
    data = dataclasses.replace(full, test_x=full.test_x[:512], test_y=full.test_y[:512], valid_x=None, valid_y=None)
    print(f"bench_epoch: LeNet-300-100 ({Path(args.spec).name}), Fashion-MNIST ({full.train_x.shape[0]:,}), "
          f"threads {args.threads}, {args.clock} clock, kernels {args.kernels}, torch {torch.__version__}, pyro {pyro.__version__}, "
          f"bayes_sws {sws.__version__}; load average {loadavg()}")
    results = {batch_size: run_batch_size(spec, data, batch_size, args) for batch_size in args.batch_size}
    if args.json:
        write_json(args.json, "bench_epoch", config=vars(args), results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
