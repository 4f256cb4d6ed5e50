"""Benchmark: one training epoch of LeNet-300-100 on Fashion-MNIST, plain vs the library's MAP fit.

  (a) plain  a plain torch loop: Adam (fused) on the summed cross-entropy, no prior
  (c) map    ``bayes_sws.fit_map`` itself, one epoch: the library's own fit loop with
             AutoDelta and map_loss, a 17-component prior (zero component with
             π0 = 0.999, Gamma hyperpriors (250, 0.1), (5000, 2) for the zero one),
             λ = 0.05, Ullrich et al.'s learning rates

Both take the same shuffled minibatches of ``--batch-size`` over the 60,000 training
images, float32, ``--threads`` torch threads. (c) is timed by the fit's own clock
(``FitState.seconds`` / ``MAPResult.seconds``), which a 512-image test split keeps
free of evaluation time. The machine's speed drifts, so the two take turns for
``--rounds`` rounds; the ratio c/a is formed within each round and its median and
range are printed. Before timing, the library's loss on one batch is checked against
the same objective written in plain torch (E·N/B + λΩ − log p(π, μ, 1/σ²)).

Run:  PYTHONPATH=. .venv/bin/python benchmarks/bench_epoch.py --rounds 3 --json benchmarks/results/epoch.json
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import bayes_sws as sws

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ForeignLoad, loadavg, wait_until_idle, warn_if_loaded, write_json  # noqa: E402

PRIOR_WEIGHT = 0.05
RATES = sws.LearningRates(weights=5e-4, means=1e-4, precisions=3e-3, pi=3e-3)


def lenet_300_100(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, 10))


def map_model(seed: int) -> sws.SoftWeightSharingModel:
    prior = sws.SoftWeightSharingPrior(
        n_components=17, pi_zero=0.999, init_means=(-0.6, 0.6),
        hyperpriors=sws.Hyperpriors(precision_gamma=(250.0, 0.1), zero_precision_gamma=(5000.0, 2.0)))
    return sws.SoftWeightSharingModel(lenet_300_100(seed), prior=prior, likelihood=sws.Categorical(),
                                      prior_weight=PRIOR_WEIGHT)


def plain_epoch(data: sws.Dataset, batch_size: int, seed: int) -> float:
    network = lenet_300_100(seed)
    optimizer = torch.optim.Adam(network.parameters(), lr=RATES.weights, fused=True)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for index in sws.data.batches(data.train_x.shape[0], batch_size=batch_size, generator=generator):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(network(data.train_x[index]), data.train_y[index], reduction="sum")
        loss.backward()
        optimizer.step()
        loss.item()  # the library's loop reads each step's loss too
    return time.perf_counter() - started


def map_epoch(data: sws.Dataset, batch_size: int, seed: int) -> float:
    result = sws.fit_map(map_model(seed), data, epochs=1, batch_size=batch_size, learning_rates=RATES,
                         seed=seed, progress=False)
    return result.seconds


def check_objective(data: sws.Dataset, batch_size: int) -> float:
    """Relative difference between the library's loss and the plain-torch objective on one batch."""
    model = map_model(0)
    values = model.initial_values()
    guide = sws.map_guide(model) if hasattr(sws, "map_guide") else None
    x, y, n = data.train_x[:batch_size], data.train_y[:batch_size], data.train_x.shape[0]
    if guide is None:  # releases before the fit loop: AutoDelta in the global param store
        from pyro.infer.autoguide import AutoDelta, init_to_value
        guide = AutoDelta(model, init_loc_fn=init_to_value(values=values))
    with torch.no_grad():
        library = float(sws.inference.map_loss(model, guide, x, y, data_size=n))
        network = torch.func.functional_call(model.network, {k: values[k] for k in model.prior_sites}, (x,))
        mixture = model.mixtures(values)["mixture"]
        weights = torch.cat([values[k].reshape(-1) for k in model.prior_sites])
        plain = (n / batch_size * nn.functional.cross_entropy(network, y, reduction="sum")
                 - PRIOR_WEIGHT * sws.mixture_log_density(weights.double(), sws.GaussianMixture(
                     *(t.double() for t in mixture))).sum()
                 - model.prior.log_hyperprior(mixture))
    return abs(library - float(plain)) / abs(float(plain))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kernels", default="auto", choices=("auto", "torch", "compile", "native"))
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each measurement wait up to this long for idle CPUs")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sws.set_backend(args.kernels)
    full = sws.load_dataset("fashion-mnist")
    data = dataclasses.replace(full, test_x=full.test_x[:512], test_y=full.test_y[:512])
    print(f"bench_epoch: LeNet-300-100, Fashion-MNIST (60,000), batch {args.batch_size}, "
          f"threads {args.threads}, kernels {args.kernels}, torch {torch.__version__}, "
          f"bayes_sws {sws.__version__}; load average {loadavg()}")
    difference = check_objective(data, args.batch_size)
    print(f"library loss vs plain-torch objective on one batch: relative difference {difference:.1e}")
    if difference > 1e-5:
        print("error: the timed fit does not compute the objective", file=sys.stderr)
        return 1
    map_epoch(data, args.batch_size, seed=99)  # warm-up: builds the kernel, first-touch allocations
    records = []
    for round_ in range(1, args.rounds + 1):
        record = {"round": round_}
        for name, epoch in (("plain", plain_epoch), ("map", map_epoch)):
            wait_until_idle(args.wait_idle)
            with ForeignLoad() as load:
                record[name] = epoch(data, args.batch_size, seed=round_)
            record["foreign_cpu_load"] = max(record.get("foreign_cpu_load", 0.0), load.fraction)
        record["ratio"] = record["map"] / record["plain"]
        records.append(record)
        busy = record["foreign_cpu_load"]
        print(f"round {round_}: (a) plain {record['plain']:.2f} s, (c) map {record['map']:.2f} s, "
              f"c/a {record['ratio']:.2f}{'  * busy %.0f%%' % (100 * busy) if busy > 0.1 else ''}", flush=True)
    ratios = [r["ratio"] for r in records]
    median = {k: statistics.median(r[k] for r in records) for k in ("plain", "map")}
    print(f"median: (a) {median['plain']:.2f} s/epoch, (c) {median['map']:.2f} s/epoch; "
          f"c/a median {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f})")
    warn_if_loaded(records, "rounds")
    if args.json:
        write_json(args.json, "bench_epoch", config=vars(args), rounds=records, median=median,
                   objective_difference=difference)
    return 0


if __name__ == "__main__":
    sys.exit(main())
