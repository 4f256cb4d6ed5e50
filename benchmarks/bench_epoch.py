"""Benchmark: seconds per training epoch of LeNet-300-100 on Fashion-MNIST, with and without the prior.

Three trainers, batch 128, float32, the same network (Linear 784-300-100-10, ReLU):

  (a) plain     torch Adam on the mean cross-entropy, no prior
  (b) torch-sws MAP soft weight-sharing written in plain torch: loss =
                (N/B)·Σ_batch CE + λ·Σ_layers −MixturePrior(mixture, event_shape=w.shape).log_prob(w)
                − SoftWeightSharingPrior.log_hyperprior(mixture); the mixture parameters are
                torch leaves (mixing logits → log_softmax, free means, log-precisions);
                Adam with the per-group learning rates of LearningRates()
  (c) pyro      bayes_sws.inference.fit_map on a SoftWeightSharingModel (AutoDelta +
                Trace_ELBO), 17 components, zero component with π0 = 0.999, Gamma
                hyperpriors (250, 0.1) and (5000, 2) for the zero component

each with every prior kernel backend (torch ops, torch.compile, the native C kernel).
(b) and (c) optimise the same objective (up to (c)'s unconstrained coordinates).
fit_map uses torch's fused Adam; (a) and (b) use it too unless --adam default.

The machine's speed drifts by up to 2× over seconds, so the trainers take turns:
--rounds R times (a), (b), (c) for each kernel backend. The table shows each
trainer's median over the rounds; c/a and c/b are formed within each round (from
neighbouring measurements) and their median is checked against the targets.
Then --interleaved-steps S: the three take turns step by step (same batches, (c) as
one step of fit_map's loop), which gives the most stable c/b; a step then starts with
caches the others used, which slows the smallest, (a), most, so c/a reads low there.

fit_map evaluates the test set once per epoch; that evaluation is timed on its own
(evaluate() on the fitted values) and subtracted from fit_map's loop time. With
--max-steps S, every trainer runs S steps after --warmup-steps untimed ones and the
epoch time is extrapolated as 469 × (seconds per step); for (c) fit_map then runs one
"epoch" over the first S·128 training examples (so its likelihood is scaled by that
smaller N, which does not change the work per step).

A per-step breakdown compares one map_loss(model, guide, x, y,
data_size=N) + backward against the plain-torch loss + backward with the same prior,
and splits Pyro's forward pass into reading the AutoDelta point, the model trace
replayed on it, and the log-probabilities.

Run:  cd /work/main && PYTHONPATH=. .venv/bin/python benchmarks/bench_epoch.py \
          --max-steps 200 --json benchmarks/results/epoch.json
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import math
import pstats
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ForeignLoad, fmt_seconds, loadavg, wait_until_idle, warn_if_loaded, write_json  # noqa: E402

import pyro  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pyro.infer.autoguide import AutoDelta, init_to_value  # noqa: E402
from torch import nn  # noqa: E402

from bayes_sws.kernels import set_backend  # noqa: E402
from bayes_sws.data import batches, load_fashion_mnist  # noqa: E402
from bayes_sws.inference import LearningRates, evaluate, fit_map, map_loss, parameter_group  # noqa: E402
from bayes_sws.model import Categorical, SoftWeightSharingModel  # noqa: E402
from bayes_sws.prior import GaussianMixture, Hyperpriors, MixturePrior, SoftWeightSharingPrior  # noqa: E402


def lenet_300_100() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 300), nn.ReLU(),
        nn.Linear(300, 100), nn.ReLU(),
        nn.Linear(100, 10),
    )


def sws_prior(components: int) -> SoftWeightSharingPrior:
    return SoftWeightSharingPrior(
        n_components=components,
        pi_zero=0.999,
        hyperpriors=Hyperpriors(precision_gamma=(250.0, 0.1), zero_precision_gamma=(5000.0, 2.0)),
    )


def minor_faults() -> int:
    """Minor page faults of this process so far (fresh pages mapped by the allocator)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


# --------------------------------------------------------------------------- (b): plain torch


class TorchSWS:
    """The soft weight-sharing MAP objective in plain torch (one shared mixture)."""

    def __init__(self, net: nn.Module, prior: SoftWeightSharingPrior, prior_weight: float, n: int):
        self.net, self.prior, self.prior_weight, self.n = net, prior, prior_weight, n
        self.prior_weights = [m.weight for m in net.modules() if isinstance(m, nn.Linear)]
        flat = torch.cat([w.detach().reshape(-1) for w in self.prior_weights])
        start = prior.initial_mixture(flat)
        self.pi_zero = prior.pi_zero
        # free components' mixing logits, free means, log-precisions of all components
        self.logits = start.log_weights[1:].clone().requires_grad_()
        self.free_means = start.means[1:].clone().requires_grad_()
        self.log_precisions = start.precisions.log().clone().requires_grad_()

    def mixture(self) -> GaussianMixture:
        like = self.free_means
        log_pi = torch.log_softmax(self.logits, 0)
        log_weights = torch.cat([like.new_tensor([math.log(self.pi_zero)]),
                                 math.log1p(-self.pi_zero) + log_pi])
        means = torch.cat([like.new_zeros(1), self.free_means])
        return GaussianMixture(log_weights, means, torch.exp(-0.5 * self.log_precisions))

    def prior_loss(self) -> torch.Tensor:
        """λ·Ω(w) − log p(π, μ, 1/σ²)."""
        mixture = self.mixture()
        omega = -sum(MixturePrior(mixture, event_shape=w.shape, validate_args=False).log_prob(w)
                     for w in self.prior_weights)
        return self.prior_weight * omega - self.prior.log_hyperprior(mixture)

    def loss(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        data = F.cross_entropy(self.net(xb), yb, reduction="sum") * (self.n / xb.shape[0])
        return data + self.prior_loss()

    def optimizer(self, rates: LearningRates, *, fused: bool) -> torch.optim.Optimizer:
        return torch.optim.Adam([
            {"params": list(self.net.parameters()), "lr": rates.weights},
            {"params": [self.free_means], "lr": rates.means},
            {"params": [self.log_precisions], "lr": rates.precisions},
            {"params": [self.logits], "lr": rates.pi},
        ], fused=fused)


# --------------------------------------------------------------------------- trainers


def index_stream(n: int, batch_size: int, seed: int, device):
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield from batches(n, batch_size=batch_size, generator=generator, device=device)


def torch_trainer(kind: str, args, device, n: int):
    """(a) or (b) on a fresh network: a function that takes one Adam step on a batch."""
    torch.manual_seed(args.seed)
    net = lenet_300_100().to(device)
    if kind == "plain":
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, fused=args.adam == "fused")

        def loss_fn(xb, yb):
            return F.cross_entropy(net(xb), yb)
    else:
        sws = TorchSWS(net, sws_prior(args.components), args.prior_weight, n)
        optimizer = sws.optimizer(LearningRates(), fused=args.adam == "fused")
        loss_fn = sws.loss

    def step(xb, yb) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(xb, yb)
        loss.backward()
        optimizer.step()
        return loss.item()  # fit_map does the same every step

    return step


def pyro_trainer(args, device, n: int, xb, yb):
    """(c) as one step of fit_map's loop: map_loss on an AutoDelta guide, backward, fused Adam."""
    model = make_model(args, device)
    pyro.clear_param_store()
    guide = AutoDelta(model, init_loc_fn=init_to_value(values=model.initial_values()))
    with pyro.validation_enabled(False):
        map_loss(model, guide, xb, yb, data_size=n)  # creates the guide's parameters
    groups: dict[str, list[torch.Tensor]] = {}
    for name, param in pyro.get_param_store().named_parameters():
        groups.setdefault(parameter_group(name), []).append(param)
    rates = LearningRates()
    optimizer = torch.optim.Adam([{"params": params, "lr": getattr(rates, group)}
                                  for group, params in groups.items()], fused=True)

    def step(xb, yb) -> float:
        optimizer.zero_grad(set_to_none=True)
        with pyro.validation_enabled(False):
            loss = map_loss(model, guide, xb, yb, data_size=n)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def train_torch(kind: str, data, args, device, steps: int) -> dict:
    """(a) or (b): ``warmup`` untimed steps then ``steps`` timed ones, fresh model."""
    x, y, n = data.train_x, data.train_y, data.train_x.shape[0]
    step = torch_trainer(kind, args, device, n)
    timer = Timer(device)
    stream = index_stream(n, args.batch_size, args.seed, device)
    for _ in range(args.warmup_steps):
        index = next(stream)
        step(x[index], y[index])
    faults = minor_faults()
    start = timer.now()
    for _ in range(steps):
        index = next(stream)
        step(x[index], y[index])
    seconds = timer.now() - start
    return {"seconds": seconds, "steps": steps, "per_step_s": seconds / steps,
            "minor_faults_per_step": (minor_faults() - faults) / steps}


def interleaved_steps(data, args, device, steps: int) -> dict[str, list[float]]:
    """Seconds of each step of (a), (b) and (c), the trainers taking turns step by step.

    The machine's speed drifts over seconds; stepping the three in turn (who goes
    first rotates) exposes them to the same drift, so their ratios are stable.
    """
    x, y, n = data.train_x, data.train_y, data.train_x.shape[0]
    stream = index_stream(n, args.batch_size, args.seed, device)
    first = next(stream)
    trainers = {"plain": torch_trainer("plain", args, device, n),
                "torch-sws": torch_trainer("torch-sws", args, device, n),
                "pyro": pyro_trainer(args, device, n, x[first], y[first])}
    timer = Timer(device)
    order = list(trainers)
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for k in range(args.warmup_steps + steps):
        index = next(stream)
        xb, yb = x[index], y[index]
        for name in order:
            start = timer.now()
            trainers[name](xb, yb)
            if k >= args.warmup_steps:
                times[name].append(timer.now() - start)
        order = order[1:] + order[:1]
    return times


def make_model(args, device) -> SoftWeightSharingModel:
    torch.manual_seed(args.seed)
    net = lenet_300_100().to(device)
    return SoftWeightSharingModel(net, prior=sws_prior(args.components), likelihood=Categorical(),
                                  prior_weight=args.prior_weight)


def train_pyro(data, args, device, steps: int, full_epochs: bool) -> dict:
    """(c): fit_map; a short untimed fit first warms up Pyro and any compiled kernels."""
    batch = args.batch_size
    if args.warmup_steps:
        warm = dataclasses.replace(data, train_x=data.train_x[: args.warmup_steps * batch],
                                   train_y=data.train_y[: args.warmup_steps * batch],
                                   test_x=data.test_x[:batch], test_y=data.test_y[:batch])
        fit_map(make_model(args, device), warm, epochs=1, batch_size=batch, progress=False,
                seed=args.seed)
    if full_epochs:
        subset, epochs = data, args.epochs
    else:
        subset = dataclasses.replace(data, train_x=data.train_x[: steps * batch],
                                     train_y=data.train_y[: steps * batch])
        epochs = 1
    model = make_model(args, device)
    timer = Timer(device)
    faults = minor_faults()
    start = timer.now()
    result = fit_map(model, subset, epochs=epochs, batch_size=batch, progress=False, seed=args.seed)
    wall = timer.now() - start
    faults = minor_faults() - faults
    # fit_map evaluated the test set once per epoch: time that on its own and subtract it.
    with pyro.validation_enabled(False):
        eval_times = []
        for _ in range(3):
            t0 = timer.now()
            evaluate(model, result.values, data.test_x, data.test_y)
            eval_times.append(timer.now() - t0)
    evaluation = statistics.median(eval_times)
    n_steps = epochs * math.ceil(subset.train_x.shape[0] / batch)
    train_seconds = result.seconds - epochs * evaluation
    return {"seconds": train_seconds, "steps": n_steps, "per_step_s": train_seconds / n_steps,
            "fit_map_loop_s": result.seconds, "fit_map_wall_s": wall,
            "setup_s": wall - result.seconds, "test_eval_s": evaluation,
            "test_evals_subtracted": epochs,
            "minor_faults_per_step": faults / n_steps,  # includes setup and test evaluation
            "final_test_accuracy": result.history[-1].get("accuracy")}


# --------------------------------------------------------------------------- breakdown


def breakdown(data, args, device) -> dict[str, float]:
    """Median seconds of the pieces of one step, on one fixed batch (no optimiser step)."""
    n = data.train_x.shape[0]
    xb, yb = data.train_x[: args.batch_size], data.train_y[: args.batch_size]
    timer = Timer(device)

    # plain torch
    torch.manual_seed(args.seed)
    net = lenet_300_100().to(device)
    sws = TorchSWS(net, sws_prior(args.components), args.prior_weight, n)
    torch_params = list(net.parameters()) + [sws.logits, sws.free_means, sws.log_precisions]

    def zero(params):
        for p in params:
            p.grad = None

    # pyro
    model = make_model(args, device)
    pyro.clear_param_store()
    guide = AutoDelta(model, init_loc_fn=init_to_value(values=model.initial_values()))
    with pyro.validation_enabled(False):
        map_loss(model, guide, xb, yb, data_size=n)
    pyro_params = [p for _, p in pyro.get_param_store().named_parameters()]
    adam = torch.optim.Adam(pyro_params, lr=1e-6, fused=True)

    def pyro_loss():
        return map_loss(model, guide, xb, yb, data_size=n)

    site_names = [name for name, _ in guide.prototype_trace.iter_stochastic_nodes()]

    def point():  # as map_loss reads it
        trace = pyro.poutine.Trace()
        for name in site_names:
            trace.add_node(name, type="sample", value=pyro.param(f"{guide._pyro_name}.{name}"),
                           is_observed=False, infer={})
        return trace

    def model_trace():
        return pyro.poutine.trace(pyro.poutine.replay(model, trace=point())).get_trace(xb, yb, data_size=n)

    pieces = {
        "network: forward + mean CE + backward (no prior)":
            (lambda: F.cross_entropy(net(xb), yb).backward(), lambda: zero(torch_params)),
        "prior: λΩ(w) − log hyperprior + backward (3 layers)":
            (lambda: sws.prior_loss().backward(), lambda: zero(torch_params)),
        "torch-sws: loss + backward  [(b) minus Adam]":
            (lambda: sws.loss(xb, yb).backward(), lambda: zero(torch_params)),
        "pyro: map_loss + backward  [(c) minus Adam]":
            (lambda: pyro_loss().backward(), lambda: zero(pyro_params)),
        "pyro: map_loss only (forward)":
            (lambda: pyro_loss(), lambda: None),
        "pyro:   the AutoDelta point (pyro.param)":
            (point, lambda: None),
        "pyro:   + model trace replayed on it (incl. network forward)":
            (model_trace, lambda: None),
        "pyro:   + compute_log_prob (incl. fused prior)":
            (lambda: model_trace().compute_log_prob(), lambda: None),
        "adam step (pyro's parameters)":
            (lambda: adam.step(), lambda: None),
    }
    # gradients for the adam row
    zero(pyro_params)
    with pyro.validation_enabled(False):
        pyro_value = pyro_loss()
        pyro_value.backward()
    torch_value = sws.loss(xb, yb)
    results = {"_loss_torch_sws": float(torch_value.detach()), "_loss_pyro": float(pyro_value.detach())}
    with pyro.validation_enabled(False):
        for name, (fn, reset) in pieces.items():
            times = []
            for rep in range(args.breakdown_reps + 2):
                reset()
                t0 = timer.now()
                fn()
                dt = timer.now() - t0
                if rep >= 2:
                    times.append(dt)
            results[name] = statistics.median(times)
    return results


def profile_pyro_step(data, args, device, steps: int = 20) -> tuple[str, str]:
    """cProfile and torch.profiler over ``steps`` Pyro steps (loss + backward + Adam)."""
    n = data.train_x.shape[0]
    model = make_model(args, device)
    pyro.clear_param_store()
    guide = AutoDelta(model, init_loc_fn=init_to_value(values=model.initial_values()))
    stream = index_stream(n, args.batch_size, args.seed, device)
    with pyro.validation_enabled(False):
        map_loss(model, guide, data.train_x[:2], data.train_y[:2], data_size=n)
        params = [p for _, p in pyro.get_param_store().named_parameters()]
        adam = torch.optim.Adam(params, lr=1e-4, fused=True)

        def step():
            index = next(stream)
            adam.zero_grad(set_to_none=True)
            loss = map_loss(model, guide, data.train_x[index], data.train_y[index], data_size=n)
            loss.backward()
            adam.step()
            loss.item()

        for _ in range(3):
            step()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(steps):
            step()
        profiler.disable()
        buffer = io.StringIO()
        stats = pstats.Stats(profiler, stream=buffer)
        stats.sort_stats("tottime").print_stats(18)
        python_table = buffer.getvalue()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        torch_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return python_table, torch_table


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=1, help="full epochs per trainer")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="time this many steps instead and extrapolate to a full epoch")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--components", "-J", type=int, default=17)
    parser.add_argument("--prior-weight", type=float, default=0.05, help="λ (τ)")
    parser.add_argument("--kernels", nargs="+", choices=("torch", "compile", "native"),
                        default=["torch", "compile", "native"],
                        help="prior kernel backends to time in turn (bayes_sws.kernels; native: CPU only)")
    parser.add_argument("--trainers", nargs="+", choices=("plain", "torch-sws", "pyro"),
                        default=["plain", "torch-sws", "pyro"])
    parser.add_argument("--rounds", type=int, default=3,
                        help="measure every trainer this many times, taking turns (the machine's "
                             "speed drifts); tables show medians, ratios pair trainers of one round")
    parser.add_argument("--interleaved-steps", type=int, default=200,
                        help="then time (a), (b), (c) taking turns step by step for this many steps "
                             "each (0: skip)")
    parser.add_argument("--adam", choices=("fused", "default"), default="fused",
                        help="Adam implementation of (a) and (b): fused, as fit_map uses for (c), "
                             "or torch's default (a loop over parameters on CPU)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-step breakdown")
    parser.add_argument("--breakdown-reps", type=int, default=20)
    parser.add_argument("--profile", action="store_true",
                        help="print cProfile and torch.profiler tables of Pyro steps")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each trainer wait up to this long for other processes "
                             "to leave the CPUs idle (the machine may be shared)")
    parser.add_argument("--compile-cache", action="store_true",
                        help="let inductor use its on-disk caches (default: cold compile)")
    parser.add_argument("--data-dir", default=None,
                        help="Fashion-MNIST IDX folder (default: load_fashion_mnist()'s, "
                             "/usr/share/datasets/fashion-mnist)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = parser.parse_args(argv)

    if not args.compile_cache:
        import torch._inductor.config as inductor_config

        inductor_config.force_disable_caches = True
        warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")

    t0 = time.perf_counter()
    data = (load_fashion_mnist(args.data_dir) if args.data_dir else load_fashion_mnist()).to(device)
    load_seconds = time.perf_counter() - t0
    n = data.train_x.shape[0]
    steps_per_epoch = math.ceil(n / args.batch_size)
    full_epochs = args.max_steps is None
    steps = args.epochs * steps_per_epoch if full_epochs else args.max_steps
    n_weights = sum(p.numel() for name, p in lenet_300_100().named_parameters() if "weight" in name)

    print(f"bench_epoch: LeNet-300-100 on Fashion-MNIST ({n} train, {data.test_x.shape[0]} test, "
          f"loaded in {load_seconds:.1f} s), batch {args.batch_size} ({steps_per_epoch} steps/epoch), "
          f"{n_weights} weights under the prior, J={args.components}, λ={args.prior_weight}")
    print(f"device={args.device}, threads={args.threads}, torch {torch.__version__}, "
          f"pyro {pyro.__version__}, Adam for (a) and (b): {args.adam}, load average at start: {loadavg()}")
    print(f"timing {'%d full epoch(s)' % args.epochs if full_epochs else '%d steps, extrapolated to %d steps/epoch' % (steps, steps_per_epoch)}"
          f", after {args.warmup_steps} warm-up steps; (c) minus its per-epoch test evaluation")
    print()

    modes = [m for m in args.kernels if not (m == "native" and device.type != "cpu")]
    rows: list[dict] = []
    compile_seconds = None
    for mode in modes:
        set_backend(mode)
        if mode == "compile":
            # compile for every layer shape, grad and value kernels, and time it
            timer = Timer(device)
            start = timer.now()
            mixture = sws_prior(args.components).initial_mixture(torch.zeros(2, device=device))
            mixture = GaussianMixture(*(t.clone().requires_grad_() for t in mixture))
            for module in lenet_300_100().to(device).modules():
                if isinstance(module, nn.Linear):
                    w = module.weight
                    MixturePrior(mixture, event_shape=w.shape).log_prob(w).backward()
                    with torch.no_grad():
                        MixturePrior(mixture, event_shape=w.shape).log_prob(w)
            compile_seconds = timer.now() - start
            print(f"compiled kernels: compile time {compile_seconds:.1f} s (all layer shapes, "
                  f"value and grad kernels)")
        for round_ in range(1, args.rounds + 1):
            for trainer in args.trainers:
                if args.wait_idle > 0 and device.type == "cpu":
                    wait_until_idle(args.wait_idle)
                with ForeignLoad() as load:
                    if trainer == "pyro":
                        record = train_pyro(data, args, device, steps, full_epochs)
                    else:
                        record = train_torch(trainer, data, args, device, steps)
                record.update(trainer=trainer, kernels=mode, round=round_,
                              per_epoch_s=record["per_step_s"] * steps_per_epoch,
                              foreign_cpu_load=load.fraction)
                rows.append(record)
                extra = ""
                if trainer == "pyro":
                    extra = (f"  (fit_map loop {record['fit_map_loop_s']:.2f} s − "
                             f"{record['test_evals_subtracted']}×test eval {record['test_eval_s']:.2f} s;"
                             f" setup {record['setup_s']:.2f} s)")
                print(f"  round {round_}  {trainer:<10} {mode:<9} {record['steps']:>5} steps "
                      f"{record['seconds']:>8.2f} s  {fmt_seconds(record['per_step_s']):>9}/step  "
                      f"{record['per_epoch_s']:>7.2f} s/epoch {record['minor_faults_per_step']:>7.0f} faults/step"
                      f"{'  * busy %.0f%%' % (100 * load.fraction) if load.fraction > 0.1 else ''}"
                      f"{extra}", flush=True)
    print()

    # ---- table and ratios: medians over rounds; ratios within a round, then their median
    def per_step(trainer: str, mode: str) -> dict[int, float]:
        return {r["round"]: r["per_step_s"] for r in rows if (r["trainer"], r["kernels"]) == (trainer, mode)}

    ratios = []
    for mode in modes:
        pyro_steps, plain_steps, torch_steps = (per_step(t, mode) for t in ("pyro", "plain", "torch-sws"))
        ratio = {"kernels": mode}
        for key, other in (("c_over_a", plain_steps), ("c_over_b", torch_steps)):
            by_round = [pyro_steps[k] / other[k] for k in pyro_steps if k in other]
            ratio[key] = statistics.median(by_round) if by_round else None
            ratio[key + "_by_round"] = by_round
        ratio["target_c_over_a_le_2"] = None if ratio["c_over_a"] is None else ratio["c_over_a"] <= 2.0
        ratio["target_c_over_b_le_1.3"] = None if ratio["c_over_b"] is None else ratio["c_over_b"] <= 1.3
        ratios.append(ratio)
    header = f"{'trainer':<12} {'kernels':<9} {'s/epoch':>8} {'ms/step':>8} {'(range)':>13}"
    print(f"per-step time, median of {args.rounds} round(s) (range over rounds)")
    print(header)
    print("-" * len(header))
    for mode in modes:
        for trainer in args.trainers:
            times = list(per_step(trainer, mode).values())
            if times:
                middle = statistics.median(times)
                print(f"{trainer:<12} {mode:<9} {middle * steps_per_epoch:>8.2f} {middle * 1e3:>8.1f} "
                      f"{'(%.1f–%.1f)' % (min(times) * 1e3, max(times) * 1e3):>13}")
    print()
    print("ratios per round (c/a: pyro / plain, c/b: pyro / torch-sws, same kernels, same round), median:")
    for ratio in ratios:
        for key, limit, name in (("c_over_a", 2.0, "(c) <= 2.0 x (a)"), ("c_over_b", 1.3, "(c) <= 1.3 x (b)")):
            if ratio[key] is not None:
                rounds = ", ".join(f"{v:.2f}" for v in ratio[key + "_by_round"])
                print(f"target {name} [{ratio['kernels']}]: median {ratio[key]:.2f} (rounds: {rounds}) -> "
                      f"{'PASS' if ratio[key] <= limit else 'FAIL'}")
    print()

    # ---- the same three, interleaved step by step
    interleaved: dict[str, dict] = {}
    if args.interleaved_steps and set(args.trainers) == {"plain", "torch-sws", "pyro"}:
        print(f"interleaved: (a), (b), (c) take turns step by step, {args.interleaved_steps} steps each; "
              f"median ms/step and ratios of the medians")
        header = f"{'kernels':<9} {'(a)':>7} {'(b)':>7} {'(c)':>7} {'c/a':>6} {'c/b':>6}"
        print(header)
        print("-" * len(header))
        for mode in modes:
            set_backend(mode)
            times = interleaved_steps(data, args, device, args.interleaved_steps)
            middle = {name: statistics.median(values) for name, values in times.items()}
            c_over_a, c_over_b = middle["pyro"] / middle["plain"], middle["pyro"] / middle["torch-sws"]
            interleaved[mode] = {"median_step_s": middle, "c_over_a": c_over_a, "c_over_b": c_over_b,
                                 "step_s": times}
            print(f"{mode:<9} {middle['plain'] * 1e3:>7.2f} {middle['torch-sws'] * 1e3:>7.2f} "
                  f"{middle['pyro'] * 1e3:>7.2f} {c_over_a:>6.2f} {c_over_b:>6.2f}")
        for mode, result in interleaved.items():
            for key, limit, name in (("c_over_a", 2.0, "(c) <= 2.0 x (a)"), ("c_over_b", 1.3, "(c) <= 1.3 x (b)")):
                print(f"target {name} [{mode}, interleaved]: {result[key]:.2f} -> "
                      f"{'PASS' if result[key] <= limit else 'FAIL'}")
        print()

    # ---- breakdown
    pieces: dict[str, dict[str, float]] = {}
    if not args.no_breakdown:
        for mode in modes:
            set_backend(mode)  # compiled graphs are cached: no recompilation
            pieces[mode] = breakdown(data, args, device)
        print(f"per-step breakdown on one batch, median of {args.breakdown_reps} (no optimiser "
              f"step unless stated)")
        header = f"{'piece':<62}" + "".join(f"{m:>11}" for m in modes)
        print(header)
        print("-" * len(header))
        for name in pieces[modes[0]]:
            if name.startswith("_"):
                continue
            print(f"{name:<62}" + "".join(f"{fmt_seconds(pieces[m][name]):>11}" for m in modes))
        for m in modes:
            p = pieces[m]
            torch_key = "torch-sws: loss + backward  [(b) minus Adam]"
            pyro_key = "pyro: map_loss + backward  [(c) minus Adam]"
            print(f"[{m}] Pyro adds {fmt_seconds(p[pyro_key] - p[torch_key])} per step over the "
                  f"plain-torch loss ({p[pyro_key] / p[torch_key]:.2f}x)")
        p = pieces[modes[0]]
        print(f"same objective check at the start: torch-sws loss {p['_loss_torch_sws']:.6g}, "
              f"pyro loss {p['_loss_pyro']:.6g} (relative difference "
              f"{abs(p['_loss_pyro'] - p['_loss_torch_sws']) / abs(p['_loss_torch_sws']):.1e})")
        print()

    profile_tables = None
    if args.profile:
        python_table, torch_table = profile_pyro_step(data, args, device)
        profile_tables = {"cprofile": python_table, "torch_profiler": torch_table}
        print(f"cProfile of 20 Pyro steps (kernels: {modes[-1]}), top by own time:")
        print(python_table)
        print(f"torch.profiler of 20 Pyro steps (kernels: {modes[-1]}), top ops by self CPU time:")
        print(torch_table)

    warn_if_loaded(rows, "trainer run(s)")
    if args.json:
        write_json(args.json, "bench_epoch", config=vars(args), steps_per_epoch=steps_per_epoch,
                   compile_seconds=compile_seconds, rows=rows, ratios=ratios,
                   interleaved={mode: {k: v for k, v in r.items() if k != "step_s"} for mode, r in interleaved.items()},
                   breakdown=pieces,
                   profile=profile_tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
