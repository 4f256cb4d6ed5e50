"""Cost of guarded training: the fit loop's finite-loss-and-gradient check per step.

Times epochs of the digits model (models/digits.toml) with the loop as shipped
(loss and largest |gradient| fetched together, one device sync per step) and with
the check replaced by a bare ``loss.item()`` (what the loop synced before), taking
turns so that load on a shared machine hits both alike.

    PYTHONPATH=. python benchmarks/bench_guard.py --rounds 5 --epochs 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bayes_sws import fitting
from bayes_sws.data import load_dataset
from bayes_sws.experiment import build_model
from bayes_sws.inference import fit_map
from bayes_sws.spec import load_spec


def unchecked(state, loss, parameters):
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    spec = load_spec("models/digits.toml")
    data = load_dataset("digits", seed=0)
    checked = fitting._checked_loss
    times = {"checked": [], "unchecked": []}
    variants = [("checked", checked), ("unchecked", unchecked)]
    for round_ in range(arguments.rounds):
        for name, check in variants if round_ % 2 else variants[::-1]:  # alternate who goes first
            fitting._checked_loss = check
            model = build_model(spec, input_shape=data.input_shape, task=data.task, n_outputs=10)
            started = time.perf_counter()
            state = fit_map(model, data, epochs=arguments.epochs, batch_size=spec.inference.batch_size,
                            learning_rates=spec.inference.learning_rates, progress=False)
            times[name].append((time.perf_counter() - started) / state.step)
    fitting._checked_loss = checked
    for name, values in times.items():
        print(f"{name:>9}: median {statistics.median(values) * 1e3:.3f} ms/step over {len(values)} rounds "
              f"(min {min(values) * 1e3:.3f})")
    ratio = statistics.median(times["checked"]) / statistics.median(times["unchecked"]) - 1
    print(f"check overhead in whole steps: {ratio * 100:+.1f} % per step (noisy on a shared machine)")
    parameters = [p for group in state.optimizer.param_groups for p in group["params"]]
    loss = torch.tensor(1.0)
    for _ in range(100):
        checked(state, loss, parameters)
    started = time.perf_counter()
    for _ in range(2000):
        checked(state, loss, parameters)
    isolated = (time.perf_counter() - started) / 2000
    print(f"the check alone: {isolated * 1e6:.0f} µs per step on the digits model's {len(parameters)} "
          f"parameter tensors ({isolated / statistics.median(times['unchecked']) * 100:.2f} % of a step)")


if __name__ == "__main__":
    main()
