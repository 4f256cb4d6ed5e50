"""The local reparameterisation trick against weight sampling: expected ELBO, gradient variance, time.

On one fixed minibatch and one fixed guide, the negative ELBO and its gradient are
evaluated ``--repeats`` times each way (``vi_loss(local_reparameterization=...)``),
each with ``--particles`` vectorised draws. Printed per way: the mean of the loss
estimates with its standard error, the variance of the gradient estimates averaged
over the coordinates of the weights' locations and (separately) scales, and the time
of one loss + backward. The gradient-variance ratio is weight sampling / local.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_local_reparam.py
    PYTHONPATH=. .venv/bin/python benchmarks/bench_local_reparam.py --spec models/fashion-lenet5.toml --batch 128
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from bayes_sws.data import load_dataset
from bayes_sws.experiment import build_model
from bayes_sws.fitting import library_scope
from bayes_sws.inference import vi_guide, vi_loss
from bayes_sws.spec import load_spec


def measure(model, guide, x, y, n, *, local: bool, repeats: int, particles: int, seed: int) -> dict:
    loss = vi_loss(num_particles=particles, local_reparameterization=local)
    weights = guide[0]
    locations = [p for name, p in weights.named_parameters() if name.startswith("locs.")]
    scales = [p for name, p in weights.named_parameters() if name.startswith("scales.")]
    values, location_grads, scale_grads, seconds = [], [], [], []
    with library_scope(), torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(repeats):
            guide.zero_grad(set_to_none=True)
            started = time.perf_counter()
            value = loss(model, guide, x, y, data_size=n)
            value.backward()
            seconds.append(time.perf_counter() - started)
            values.append(value.item())
            location_grads.append(torch.cat([p.grad.reshape(-1) for p in locations]))
            scale_grads.append(torch.cat([p.grad.reshape(-1) for p in scales]))
    values_t = torch.tensor(values)
    return {
        "loss_mean": values_t.mean().item(),
        "loss_standard_error": (values_t.std() / math.sqrt(repeats)).item(),
        "location_gradient_variance": torch.stack(location_grads).var(0).mean().item(),
        "scale_gradient_variance": torch.stack(scale_grads).var(0).mean().item(),
        "seconds_per_step": sorted(seconds)[len(seconds) // 2],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="models/digits.toml")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--particles", type=int, default=1)
    parser.add_argument("--init-scale", type=float, default=0.05, help="the guide's standard deviation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)

    spec = load_spec(arguments.spec)
    data = load_dataset(spec.data.dataset, path=spec.data.path, seed=spec.seed)
    model = build_model(spec, input_shape=data.input_shape, task=data.task, n_outputs=data.n_classes or 1)
    x, y, n = data.train_x[: arguments.batch], data.train_y[: arguments.batch], len(data.train_x)
    with library_scope():
        guide = vi_guide(model, init_scale=arguments.init_scale)
        guide(x, y, data_size=n)
    results = {way: measure(model, guide, x, y, n, local=way == "local", repeats=arguments.repeats,
                            particles=arguments.particles, seed=arguments.seed)
               for way in ("weight sampling", "local")}

    print(f"{spec.name}: {model.n_weights} weights, batch {arguments.batch} of N = {n}, guide sd "
          f"{arguments.init_scale}, {arguments.particles} particle(s), {arguments.repeats} repeats, "
          f"{arguments.threads} thread(s)")
    print(f"{'':16} {'-ELBO mean ± s.e.':>24} {'Var grad loc':>14} {'Var grad scale':>15} {'step':>9}")
    for way, r in results.items():
        print(f"{way:16} {r['loss_mean']:>14.2f} ± {r['loss_standard_error']:<7.2f} "
              f"{r['location_gradient_variance']:>14.4g} {r['scale_gradient_variance']:>15.4g} "
              f"{r['seconds_per_step'] * 1e3:>7.1f} ms")
    sampled, local = results["weight sampling"], results["local"]
    difference = sampled["loss_mean"] - local["loss_mean"]
    error = math.hypot(sampled["loss_standard_error"], local["loss_standard_error"])
    print(f"ELBO difference (sampling - local): {difference:.2f} ± {error:.2f} ({difference / error:+.1f} s.e.)")
    print(f"gradient variance ratio (sampling / local): locations "
          f"{sampled['location_gradient_variance'] / local['location_gradient_variance']:.1f}x, scales "
          f"{sampled['scale_gradient_variance'] / local['scale_gradient_variance']:.1f}x")
    if arguments.json:
        with open(arguments.json, "w") as handle:
            json.dump({"spec": spec.name, "arguments": vars(arguments), "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
