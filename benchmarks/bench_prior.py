"""Benchmark: the mixture prior alone, value + gradient, against the straightforward forms.

For every weight count N it times one evaluation of Σ_i log p(w_i) under a J-component
Gaussian mixture together with its gradient with respect to the weights AND every
mixture parameter (log-weights, means, scales, all leaf tensors), and measures the
peak extra memory of that call. Methods:

  fused     MixturePrior(mixture, event_shape=(N,)).log_prob(w) + backward, torch kernels
  compiled  the same with set_backend("compile") (torch.compile'd chunk kernel)
  native    the same with set_backend("native") (the C kernel; CPU only, torch on CUDA)
  baseline  pyro MixtureSameFamily(Categorical(logits), Normal(mu, sigma))
            .expand((N,)).to_event(1).log_prob(w) + autograd backward
  reference bayes_sws.prior.mixture_log_density(w, mixture).sum() + autograd backward

Timing: the median over --reps calls after warm-up. Memory: on CPU every (method, N)
runs in a fresh subprocess, which warms the code paths up on a small tensor, resets
the peak-RSS mark (/proc/self/clear_refs) and reads VmHWM − VmRSS around its first
full-size call; on CUDA, torch.cuda.max_memory_allocated minus memory_allocated
before the call. The weights and mixture parameters exist before the call, so the
gradient buffers and everything the call allocates count as extra.

`--skipping` instead compares the native kernel dense (every weight-component pair, as
before skipping existed: `kernels.use_skipping(False)`) with its exact component
skipping, on Ullrich-like late-training mixtures and a broad early-training one.

Run:  cd /work/main && PYTHONPATH=. .venv/bin/python benchmarks/bench_prior.py \
          --sizes 1e5 1e6 1e7 --json benchmarks/results/prior.json
      PYTHONPATH=. .venv/bin/python benchmarks/bench_prior.py --skipping --reps 15
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ForeignLoad, fmt_bytes, fmt_seconds, loadavg, wait_until_idle, warn_if_loaded, write_json  # noqa: E402

METHODS = ("fused", "compiled", "native", "baseline", "reference")
# The library's own paths, each a kernel backend of bayes_sws.kernels.
FUSED_BACKENDS = {"fused": "torch", "compiled": "compile", "native": "native"}
DESCRIPTIONS = {
    "fused": "MixturePrior.log_prob + backward (fused, eager kernels)",
    "compiled": "MixturePrior.log_prob + backward (fused, set_backend('compile'))",
    "native": "MixturePrior.log_prob + backward (fused, set_backend('native'): C kernel, CPU)",
    "baseline": "pyro MixtureSameFamily.expand((N,)).to_event(1).log_prob + autograd",
    "reference": "mixture_log_density(w, mixture).sum() + autograd",
}
# Rough peak bytes of the autograd forms per (weight, component) pair; used only to
# skip sizes that would not fit (measured: baseline ≈ 30 B, reference ≈ 20 B per pair).
_AUTOGRAD_BYTES_PER_PAIR = 40


# --------------------------------------------------------------------------- helpers


def parse_size(text: str) -> int:
    value = float(text)
    if not value >= 1 or value != math.floor(value):
        raise argparse.ArgumentTypeError(f"size must be a positive integer, got {text}")
    return int(value)


def _proc_status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {
        key: int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024
        for key in ("VmRSS", "VmHWM")
    }


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _available_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return free
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M).group(1)) * 1024


# --------------------------------------------------------------------------- one measurement


def measure(method: str, n: int, args: argparse.Namespace) -> dict:
    """Time and measure one (method, N) in the current process; returns a result record."""
    import pyro
    import pyro.distributions as dist
    import torch

    from bayes_sws.kernels import set_backend
    from bayes_sws.prior import GaussianMixture, MixturePrior, mixture_log_density

    torch.set_num_threads(args.threads)
    pyro.enable_validation(args.validate)
    if not args.compile_cache:
        import torch._inductor.config as inductor_config

        inductor_config.force_disable_caches = True
        warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    generator = torch.Generator().manual_seed(args.seed)
    j = args.components
    # A trained-looking mixture: a narrow zero component holding most weights,
    # the others spread over the weights' range.
    log_weights = torch.cat([torch.tensor([math.log(0.9)]),
                             torch.full((j - 1,), math.log(0.1 / max(j - 1, 1)))])[:j]
    log_weights = log_weights - torch.logsumexp(log_weights, 0)
    means = torch.cat([torch.zeros(1), torch.linspace(-0.3, 0.3, max(j - 1, 1))])[:j]
    scales = torch.cat([torch.tensor([0.01]), torch.full((max(j - 1, 1),), 0.03)])[:j]
    params = [t.to(device).requires_grad_() for t in (log_weights, means, scales)]
    mixture = GaussianMixture(*params)

    def make_weights(size: int) -> torch.Tensor:
        w = torch.randn(size, generator=generator) * 0.1
        return w.to(device).requires_grad_()

    def loss_fn(w: torch.Tensor) -> torch.Tensor:
        size = w.shape[0]
        if method in FUSED_BACKENDS:
            return MixturePrior(mixture, event_shape=(size,), validate_args=args.validate).log_prob(w)
        if method == "baseline":
            d = dist.MixtureSameFamily(
                dist.Categorical(logits=mixture.log_proportions, validate_args=args.validate),
                dist.Normal(mixture.means, mixture.scales, validate_args=args.validate),
                validate_args=args.validate,
            )
            return d.expand((size,)).to_event(1).log_prob(w)
        if method == "reference":
            return mixture_log_density(w, mixture).sum()
        raise ValueError(method)

    faults: list[int] = []

    def call(w: torch.Tensor) -> float:
        w.grad = None
        for p in params:
            p.grad = None
        sync()
        faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        value = loss_fn(w)
        value.backward()
        sync()
        elapsed = time.perf_counter() - start
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0)
        return elapsed

    record: dict = {"method": method, "n": n, "device": args.device}
    set_backend(FUSED_BACKENDS.get(method, "torch"))

    # Warm-up on a small tensor: loads code pages, and for "compiled" compiles the
    # kernels (dynamic shapes: one graph for every chunk length).
    warm = make_weights(min(n, 1 << 12))
    record["first_call_s"] = call(warm)  # includes compilation for "compiled"
    record["second_call_small_s"] = call(warm)
    del warm

    w = make_weights(n)
    sync()
    if cuda:
        torch.cuda.empty_cache()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        record["first_full_call_s"] = call(w)
        record["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - held
        record["memory_method"] = "torch.cuda.max_memory_allocated - memory_allocated before"
    else:
        reset = _reset_peak_rss()
        before = _proc_status()
        record["first_full_call_s"] = call(w)
        after = _proc_status()
        record["peak_extra_bytes"] = after["VmHWM"] - (before["VmRSS"] if reset else before["VmHWM"])
        record["memory_method"] = (
            "VmHWM after - VmRSS before, peak reset via /proc/self/clear_refs"
            if reset else "VmHWM growth (could not reset the peak: a lower bound)"
        )
    for _ in range(args.warmup):
        call(w)
    times: list[float] = []
    faults.clear()
    while len(times) < args.reps and (len(times) < 3 or sum(times) < args.max_seconds):
        times.append(call(w))
    # minor page faults per timed call: fresh pages the allocator had to map (glibc returns
    # large freed blocks to the OS, so chunk-sized temporaries can fault on every call)
    record["minor_faults_per_call"] = statistics.median(faults)
    record["times_s"] = times
    record["median_s"] = statistics.median(times)
    record["value"] = float(loss_fn(w).detach()) if n <= 10**6 else None
    return record


def run_isolated(method: str, n: int, args: argparse.Namespace) -> dict:
    """Run :func:`measure` in a fresh interpreter (CPU memory needs a fresh peak-RSS mark)."""
    command = [sys.executable, os.path.abspath(__file__), "--_worker", method, str(n),
               "--device", args.device, "--threads", str(args.threads),
               "--components", str(args.components), "--reps", str(args.reps),
               "--warmup", str(args.warmup), "--max-seconds", str(args.max_seconds),
               "--seed", str(args.seed)]
    command += ["--validate"] if args.validate else []
    command += ["--compile-cache"] if args.compile_cache else []
    env = dict(os.environ)
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # compile in the measured process
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"method": method, "n": n, "error": f"rc={proc.returncode}: " + " | ".join(tail),
                "process_wall_s": wall}
    record = json.loads(lines[-1])
    record["process_wall_s"] = wall
    return record


# --------------------------------------------------------------------------- correctness


def check_agreement(n: int, args: argparse.Namespace) -> list[str]:
    """Value and gradients of fused and baseline against the float64 reference."""
    import pyro.distributions as dist
    import torch

    from bayes_sws.kernels import set_backend
    from bayes_sws.prior import GaussianMixture, MixturePrior, mixture_log_density

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    j = args.components
    base = GaussianMixture(torch.log_softmax(torch.randn(j), 0), torch.linspace(-0.3, 0.3, j),
                           torch.full((j,), 0.03))
    w0 = torch.randn(n) * 0.1

    def grads(kind: str, dtype):
        w = w0.to(device, dtype).clone().requires_grad_()
        params = [t.to(device, dtype).clone().requires_grad_() for t in base]
        mixture = GaussianMixture(*params)
        if kind in FUSED_BACKENDS:
            set_backend(FUSED_BACKENDS[kind])
            value = MixturePrior(mixture, event_shape=(n,)).log_prob(w)
        elif kind == "baseline":
            value = dist.MixtureSameFamily(dist.Categorical(logits=params[0]),
                                           dist.Normal(params[1], params[2])
                                           ).expand((n,)).to_event(1).log_prob(w)
        else:
            value = mixture_log_density(w, mixture).sum()
        value.backward()
        return [value.detach().double().cpu()] + [t.grad.double().cpu() for t in (w, *params)]

    reference = grads("reference", torch.float64)
    # Categorical(logits) normalises: d/dlogits = d/dlog_pi − π·Σ_j d/dlog_pi_j.
    pi = base.log_proportions.double().exp()
    projected = list(reference)
    projected[2] = reference[2] - pi * reference[2].sum()
    lines = []
    for kind in ("fused", "native", "baseline"):
        got = grads(kind, torch.float32)
        if kind == "baseline":
            reference = projected
        errors = [float((g - r).abs().max() / r.abs().max().clamp_min(1e-30))
                  for g, r in zip(got, reference)]
        names = ("value", "dw", "dlogits" if kind == "baseline" else "dlog_pi", "dmu", "dsigma")
        lines.append(f"  {kind:<9} vs float64 reference, max|err|/max|ref|: "
                     + ", ".join(f"{a}={e:.1e}" for a, e in zip(names, errors)))
    return lines


# --------------------------------------------------------------------------- skipping


def skipping_mixtures(j: int, seed: int) -> dict:
    """name -> (mixture, weights-generator) for the skipping comparison, float32.

    late: Ullrich et al.'s mixture late in training: π0 = 0.999 at a zero component of
    σ0 = 0.005, the other J − 1 at means ±0.05…±0.6 with σ drawn from [0.01, 0.05]
    (late σ=x: all of them x); weights drawn from the mixture (99.9 % near zero), in
    random order. early: equal proportions, means over [−0.3, 0.3], σ in [0.05, 0.15],
    weights N(0, 0.15²).
    """
    import torch

    from bayes_sws.prior import GaussianMixture

    generator = torch.Generator().manual_seed(seed)
    half = (j - 1) // 2
    means = torch.cat([torch.zeros(1), torch.linspace(-0.6, -0.05, half), torch.linspace(0.05, 0.6, j - 1 - half)])
    proportions = torch.cat([torch.tensor([0.999]), torch.full((j - 1,), 0.001 / (j - 1))])

    def late(others: torch.Tensor) -> GaussianMixture:
        return GaussianMixture(proportions.log(), means, torch.cat([torch.tensor([0.005]), others]))

    def drawn(mixture: GaussianMixture, n: int) -> torch.Tensor:
        component = torch.multinomial(mixture.log_proportions.exp(), n, replacement=True, generator=generator)
        return mixture.means[component] + mixture.scales[component] * torch.randn(n, generator=generator)

    cases = {"late": late(0.01 + 0.04 * torch.rand(j - 1, generator=generator))}
    for sigma in (0.01, 0.02, 0.05):
        cases[f"late σ={sigma}"] = late(torch.full((j - 1,), sigma))
    early = GaussianMixture(torch.full((j,), -math.log(j)), torch.linspace(-0.3, 0.3, j),
                            0.05 + 0.1 * torch.rand(j, generator=generator))
    result = {name: (mixture, lambda n, m=mixture: drawn(m, n)) for name, mixture in cases.items()}
    result["early"] = (early, lambda n: 0.15 * torch.randn(n, generator=generator))
    return result


def compare_skipping(args: argparse.Namespace) -> list[dict]:
    """Dense native kernel (every pair: today's kernel) against skipping, per mixture and N.

    Two timings, each the median over --reps interleaved rounds (dense, skipping, dense, ...):
    the kernel alone (value and every gradient into preallocated buffers) and the whole
    MixturePrior.log_prob + backward.
    """
    import pyro
    import torch

    from bayes_sws import kernels
    from bayes_sws.prior import GaussianMixture, MixturePrior

    pyro.enable_validation(args.validate)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    native = kernels._native()
    if native is None:
        print("skipping comparison: the native kernel is unavailable here")
        return []
    dense_native = native
    if args.dense_kernel:
        dense_native = kernels._Native(ctypes.CDLL(str(Path(args.dense_kernel).resolve())))
        print(f"kernel dense: {args.dense_kernel}, every pair (the call columns use this library's kernel)")
    records = []
    print(f"{'case':<14} {'N':>8} {'kernel dense':>13} {'skipping':>10} {'speed-up':>9} "
          f"{'call dense':>11} {'skipping':>10} {'speed-up':>9}")
    for name, (mixture, draw) in skipping_mixtures(args.components, args.seed).items():
        for n in sorted(set(args.sizes)):
            weights = draw(n)
            grad = torch.empty_like(weights)
            summary = torch.empty(1 + 3 * args.components)
            leaves = [t.clone().requires_grad_() for t in mixture]
            w = weights.clone().requires_grad_()

            def kernel(dense: bool) -> None:
                (dense_native if dense else native).value_and_grads([weights], list(mixture), [grad], summary)

            def call(dense: bool) -> None:
                w.grad = None
                for leaf in leaves:
                    leaf.grad = None
                MixturePrior(GaussianMixture(*leaves), event_shape=(n,)).log_prob(w).backward()

            times = {(what, dense): [] for what in ("kernel", "call") for dense in (True, False)}
            if args.wait_idle > 0:
                wait_until_idle(args.wait_idle)
            with kernels.use_backend("native"), ForeignLoad() as load:
                for _ in range(args.reps + 1):  # the first round warms up
                    for what, function in (("kernel", kernel), ("call", call)):
                        for dense in (True, False):
                            with kernels.use_skipping(not dense):
                                start = clock()
                                function(dense)
                                times[what, dense].append(clock() - start)
            median = {key: statistics.median(values[1:]) for key, values in times.items()}
            record = {"case": name, "n": n, "foreign_cpu_load": load.fraction,
                      **{f"{what}_{'dense' if dense else 'skipping'}_s": value
                         for (what, dense), value in median.items()}}
            records.append(record)
            print(f"{name:<14} {n:>8.0e} {fmt_seconds(median['kernel', True]):>13} "
                  f"{fmt_seconds(median['kernel', False]):>10} "
                  f"{median['kernel', True] / median['kernel', False]:>8.2f}x "
                  f"{fmt_seconds(median['call', True]):>11} {fmt_seconds(median['call', False]):>10} "
                  f"{median['call', True] / median['call', False]:>8.2f}x"
                  f"{'  * busy %.0f%%' % (100 * load.fraction) if load.fraction > 0.1 else ''}", flush=True)
    return records


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=None,
                        help="weight counts N (e.g. 1e5 1e6 1e7 1e8)")
    parser.add_argument("--components", "-J", type=int, default=17, help="mixture components J")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled-kernel method")
    parser.add_argument("--baseline-max-size", type=parse_size, default=None,
                        help="largest N for baseline/reference (default: whatever is estimated "
                             "to fit in available memory)")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per measurement")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed full-size calls after the memory-measuring one")
    parser.add_argument("--max-seconds", type=float, default=20.0,
                        help="stop timing after this many seconds (at least 3 calls)")
    parser.add_argument("--validate", action="store_true",
                        help="keep distribution argument/sample validation on (default off)")
    parser.add_argument("--compile-cache", action="store_true",
                        help="let inductor use its on-disk caches (default: cold compile)")
    parser.add_argument("--in-process", action="store_true",
                        help="CPU: measure in this process (faster; memory figures unreliable)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each measurement wait up to this long for other processes "
                             "to leave the CPUs idle (the machine may be shared)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skipping", action="store_true",
                        help="instead: the native kernel dense (every pair) against component skipping, "
                             "on late- and early-training mixtures (sizes default to 1e6)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="--skipping: time with this process's CPU time instead of the wall clock "
                             "(robust on a loaded machine; with --threads 1 it is the work done)")
    parser.add_argument("--dense-kernel", metavar="LIBRARY.so",
                        help="--skipping: time the dense kernel columns with this build of a kernel source "
                             "(e.g. an earlier commit's sws_kernel.c) instead of this library's")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--_worker", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._worker:
        method, n = args._worker
        print(json.dumps(measure(method, int(n), args)), flush=True)
        return 0

    if args.dense_kernel and not (args.skipping and Path(args.dense_kernel).is_file()):
        parser.error(f"--dense-kernel takes an existing shared library, with --skipping: {args.dense_kernel}")
    if args.skipping:
        args.sizes = args.sizes or [10**6]
        print(f"bench_prior --skipping: J={args.components}, float32, cpu, threads={args.threads}, "
              f"median of {args.reps} interleaved rounds, {'CPU' if args.cpu_time else 'wall'} time")
        print(f"load average at start: {loadavg()}")
        records = compare_skipping(args)
        print(f"load average at end: {loadavg()}")
        late = next((r for r in records if r["case"] == "late" and r["n"] == 10**6), None)
        if late:
            for what in ("kernel", "call"):
                ratio = late[f"{what}_dense_s"] / late[f"{what}_skipping_s"]
                print(f"target: late-training prior at N=1e6, {what}, >= 3x faster than the dense "
                      f"native kernel: {ratio:.2f}x -> {'PASS' if ratio >= 3 else 'FAIL'}")
        warn_if_loaded(records, "measurement(s)")
        if args.json:
            write_json(args.json, "bench_prior_skipping", config=vars(args), results=records)
        return 0
    args.sizes = args.sizes or [10**5, 10**6, 10**7]

    import pyro
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods if not (m == "compiled" and args.no_compile)]
    sizes = sorted(set(args.sizes))
    available = _available_bytes(args.device)
    isolated = args.device == "cpu" and not args.in_process

    device_name = (torch.cuda.get_device_name() if args.device == "cuda"
                   else platform.processor() or platform.machine())
    print(f"bench_prior: J={args.components}, float32, device={args.device} ({device_name}), "
          f"threads={args.threads}, torch {torch.__version__}, pyro {pyro.__version__}")
    print(f"load average at start: {loadavg()}")
    print(f"validation {'on' if args.validate else 'off'}, "
          f"compile cache {'warm' if args.compile_cache else 'disabled (cold compile)'}, "
          f"memory {'per-(method, N) subprocess' if isolated else 'in-process'}")
    for m in methods:
        print(f"  {m:<9} {DESCRIPTIONS[m]}")
    print()
    print("agreement at N=1e4:")
    for line in check_agreement(10**4, args):
        print(line)
    print()

    results: list[dict] = []
    notes: list[str] = []
    header = (f"{'N':>10} {'method':<10} {'median':>10} {'min':>10} {'1st call':>10} "
              f"{'reps':>4} {'peak extra':>11} {'/(4N B)':>8} {'faults':>8}")
    print("(1st call: first call on a small tensor, includes compilation for 'compiled'; "
          "faults: minor page faults per timed call; * = other processes used this share of "
          "the CPUs during the measurement: timings inflated)")
    print(header)
    print("-" * len(header))
    for n in sizes:
        for method in methods:
            autograd_form = method in ("baseline", "reference")
            estimate = _AUTOGRAD_BYTES_PER_PAIR * n * args.components
            if autograd_form and (
                (args.baseline_max_size is not None and n > args.baseline_max_size)
                or (args.baseline_max_size is None and estimate > 0.7 * available)
            ):
                reason = ("N > --baseline-max-size" if args.baseline_max_size is not None
                          else f"estimated peak {fmt_bytes(estimate)} > 70% of "
                               f"available {fmt_bytes(available)}")
                record = {"method": method, "n": n, "skipped": reason}
                notes.append(f"{method} skipped at N={n:.0e}: {reason}")
                results.append(record)
                print(f"{n:>10.0e} {method:<10} {'skipped: ' + reason}")
                continue
            if args.wait_idle > 0 and args.device == "cpu":
                wait_until_idle(args.wait_idle)
            with ForeignLoad() as load:
                if isolated:
                    record = run_isolated(method, n, args)
                else:
                    try:
                        record = measure(method, n, args)
                    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError included
                        record = {"method": method, "n": n,
                                  "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
                    finally:
                        if args.device == "cuda":
                            torch.cuda.empty_cache()
            busy = record["foreign_cpu_load"] = load.fraction
            results.append(record)
            if "error" in record:
                notes.append(f"{method} failed at N={n:.0e}: {record['error']}")
                print(f"{n:>10.0e} {method:<10} FAILED {record['error'][:100]}")
                continue
            extra = record["peak_extra_bytes"]
            print(f"{n:>10.0e} {method:<10} {fmt_seconds(record['median_s']):>10} "
                  f"{fmt_seconds(min(record['times_s'])):>10} "
                  f"{fmt_seconds(record['first_call_s']):>10} {len(record['times_s']):>4} "
                  f"{fmt_bytes(extra):>11} {extra / (4 * n):>8.2f} "
                  f"{record['minor_faults_per_call']:>8.0f}"
                  f"{'  * busy %.0f%%' % (100 * busy) if busy > 0.1 else ''}", flush=True)
        print()

    # ---- ratios
    by = {(r["method"], r["n"]): r for r in results if "median_s" in r}
    print("ratios (time: baseline / method, reference / method; memory: peak extra / (4·N·4 B))")
    header = (f"{'N':>10} {'method':<10} {'base/x':>8} {'ref/x':>8} {'mem/(16N)':>10} "
              f"{'extra B/weight':>15}")
    print(header)
    print("-" * len(header))
    ratios = []
    for n in sizes:
        for method in FUSED_BACKENDS:
            r = by.get((method, n))
            if r is None:
                continue
            base, ref = by.get(("baseline", n)), by.get(("reference", n))
            row = {
                "n": n, "method": method,
                "baseline_over_method": base["median_s"] / r["median_s"] if base else None,
                "reference_over_method": ref["median_s"] / r["median_s"] if ref else None,
                "peak_extra_over_16n": r["peak_extra_bytes"] / (16 * n),
                "peak_extra_bytes_per_weight": r["peak_extra_bytes"] / n,
            }
            ratios.append(row)

            def f(x):
                return f"{x:.1f}x" if x is not None else "-"

            print(f"{n:>10.0e} {method:<10} {f(row['baseline_over_method']):>8} "
                  f"{f(row['reference_over_method']):>8} {row['peak_extra_over_16n']:>10.2f} "
                  f"{row['peak_extra_bytes_per_weight']:>15.1f}")
    print()

    # ---- targets
    targets = []
    for method in FUSED_BACKENDS:
        speed = next((r for r in ratios if r["n"] == 10**6 and r["method"] == method), None)
        if speed and speed["baseline_over_method"] is not None:
            targets.append({"target": f"{method} >= 5x faster than baseline at N=1e6",
                            "value": speed["baseline_over_method"],
                            "pass": speed["baseline_over_method"] >= 5})
        memory = next((r for r in ratios if r["n"] == 10**7 and r["method"] == method), None)
        if memory:
            targets.append({"target": f"{method} peak extra memory < 4·N·4 B at N=1e7",
                            "value": memory["peak_extra_over_16n"], "pass": memory["peak_extra_over_16n"] < 1})
    for t in targets:
        print(f"target: {t['target']}: {t['value']:.2f} -> {'PASS' if t['pass'] else 'FAIL'}")
    for note in notes:
        print(f"note: {note}")
    warn_if_loaded(results, "measurement(s)")
    if args.json:
        write_json(args.json, "bench_prior", config=vars(args), device_name=device_name,
                   results=results, ratios=ratios, targets=targets, notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
