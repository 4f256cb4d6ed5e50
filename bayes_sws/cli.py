"""The ``bayes-sws`` command: a thin shell over the Python API.

    bayes-sws fit models/digits.toml [--method map|vi|nuts] [--out DIR] [--set key=value ...]
                                     [--device cpu|cuda] [--resume] [--force] [--quiet]
    bayes-sws check models/digits.toml [--set key=value ...]
    bayes-sws diagnose RUN_DIR [--draws S] [--seed N] [--quiet]
    bayes-sws compress models/fashion-lenet-300-100.toml|RUN_DIR [--method sws|dc|prune] [--out DIR]
                       [--sweep 0.02,0.05,0.1] [--set key=value ...] [--device cpu|cuda]
    bayes-sws evaluate runs/compressed/model.sws [--device cpu|cuda]
    torchrun --nproc_per_node 2 -m bayes_sws.cli fit models/digits.toml   # data-parallel

Errors in the user's input print one line on stderr and exit with status 2; Ctrl-C
(or SIGTERM) prints one line and exits with status 130, at any
moment, start-up included: the library is imported inside :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .spec import METHODS  # the spec module imports neither torch nor Pyro

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bayes-sws", description="Soft weight-sharing for neural networks.")
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("fit", help="fit a model specification and save its artefacts")
    check = commands.add_parser("check", help="validate a model specification and print it")
    for command in (fit, check):
        command.add_argument("spec", help="a model specification (.toml), e.g. models/digits.toml")
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                             help="override a setting, e.g. --set prior.weight=0.01 (repeatable)")
    fit.add_argument("--method", choices=METHODS,
                     help="the same as --set inference.method=METHOD: vi and nuts start from the spec's MAP fit")
    fit.add_argument("--out", help="output directory (default: runs/<model name>)")
    fit.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    fit.add_argument("--resume", action="store_true",
                     help="continue the unfinished run whose state is in OUT.partial/")
    fit.add_argument("--force", action="store_true",
                     help="replace an existing run in OUT (or discard an unfinished one)")
    diagnose = commands.add_parser("diagnose", help="posterior diagnostics and predictive uncertainty of a fitted run")
    diagnose.add_argument("run_dir", help="a directory written by `bayes-sws fit` (holding checkpoint.pt)")
    diagnose.add_argument("--draws", type=int, default=100, help="posterior draws of a variational fit (default 100)")
    diagnose.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    diagnose.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_compression_commands(commands)
    return parser


def _add_compression_commands(commands: argparse._SubParsersAction) -> None:
    compress = commands.add_parser("compress", help="compress a network and write the compressed file")
    compress.add_argument("target", help="a model specification (.toml), or a run directory holding checkpoint.pt "
                                         "(its network is the pretrained starting point)")
    compress.add_argument("--method", choices=("sws", "dc", "prune"), help="default: the spec's compression.method")
    compress.add_argument("--out", help="output directory (default: runs/<model name>-<method>)")
    compress.add_argument("--sweep", metavar="TAU,TAU,...",
                          help="soft weight-sharing at each prior weight τ; keep the one chosen on the validation split")
    compress.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a setting (repeatable)")
    compress.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    compress.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate = commands.add_parser("evaluate", help="load a compressed file and report its accuracy")
    evaluate.add_argument("file", help="a compressed file written by bayes-sws compress")
    evaluate.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")


def _compress_command(arguments: argparse.Namespace) -> str:
    from .compression import compress, save_compression, sweep_prior_weight
    from .errors import BayesSWSError
    from .experiment import load_checkpoint
    from .spec import apply_overrides, load_spec, parse_spec

    target = Path(arguments.target)
    network_state = None
    if target.is_dir():
        fitted = load_checkpoint(target / "checkpoint.pt")
        spec = parse_spec(apply_overrides(fitted.spec.to_dict(), arguments.overrides))
        network_state = {k: v.detach().clone() for k, v in fitted.network.state_dict().items()}
    else:
        spec = load_spec(target, overrides=arguments.overrides)
    method = arguments.method or spec.compression.method
    extra = {}
    if arguments.sweep:
        if method != "sws":
            raise BayesSWSError("--sweep picks soft weight-sharing's prior weight: use it with --method sws")
        try:
            weights = [float(t) for t in arguments.sweep.split(",")]
        except ValueError:
            raise BayesSWSError(f"--sweep takes comma-separated numbers, got {arguments.sweep!r}") from None
        if not all(w > 0 for w in weights):
            raise BayesSWSError(f"--sweep prior weights must be positive, got {arguments.sweep!r}")
        result, table = sweep_prior_weight(spec, weights, network_state=network_state, device=arguments.device,
                                           progress=not arguments.quiet)
        extra["sweep"] = table
    else:
        result = compress(spec, method=method, network_state=network_state, device=arguments.device,
                          progress=not arguments.quiet)
    out = Path(arguments.out or Path("runs") / f"{spec.name}-{method}")
    report = save_compression(result, out_dir=out, extra=extra)
    split = "valid" if "valid_accuracy_after" in report else "test"
    return (f"{spec.name} {method}: {split} accuracy {report[f'{split}_accuracy_before']:.4f} -> "
            f"{report[f'{split}_accuracy_after']:.4f}, {100 * report['nonzero_fraction']:.2f}% non-zero, "
            f"Han (Huffman) {report['han_huffman_rate']:.1f}x, file {report['file_bytes']} bytes "
            f"({report['file_rate']:.1f}x); results in {out}/")


def _evaluate_command(arguments: argparse.Namespace) -> str:
    from .codec import read_compressed
    from .compression import accuracy, load_compressed_data

    quantised = read_compressed(arguments.file)
    data = load_compressed_data(quantised, device=arguments.device)
    network = quantised.to_network(device=data.test_x.device)
    scores = {"test_accuracy": accuracy(network, data.test_x, data.test_y)}
    if data.valid_x is not None and len(data.valid_x):
        scores["valid_accuracy"] = accuracy(network, data.valid_x, data.valid_y)
    return f"{arguments.file}: " + ", ".join(f"{k}={v:.4f}" for k, v in scores.items())


def _summary(metrics: dict) -> str:
    scores = {k: v for k, v in metrics.items() if k.startswith("test_") and isinstance(v, float)}
    point = "" if metrics["method"] == "map" else f" (at the {metrics['metrics_at']}; predictive: bayes-sws diagnose)"
    return ", ".join(f"{k}={v:.4g}" for k, v in scores.items()) + f"{point}, {metrics['seconds']:.1f} s"


def _fit(arguments: argparse.Namespace) -> int:
    from .distributed import is_main_process, launched
    from .experiment import run
    from .spec import load_spec
    from .storage import partial_dir

    method = [f"inference.method={arguments.method!r}"] if arguments.method else []
    spec = load_spec(arguments.spec, overrides=[*arguments.overrides, *method])
    out = Path(arguments.out or Path("runs") / spec.name)
    arguments.staging = partial_dir(out)  # named by main on Ctrl-C
    with launched(arguments.device) as device:
        replacing = out.is_dir() and any(out.iterdir()) and arguments.force
        metrics = run(spec, out_dir=out, device=device, progress=not arguments.quiet,
                      resume=arguments.resume, force=arguments.force)
        if is_main_process():
            note = " (replaced the earlier run, --force)" if replacing else ""
            print(f"{spec.name}: {_summary(metrics)}; results in {out}/{note}")
    return 0


def _diagnose(arguments: argparse.Namespace) -> int:
    from .diagnose import diagnose  # imports arviz: only this command pays for it

    results = diagnose(arguments.run_dir, draws=arguments.draws, seed=arguments.seed, progress=not arguments.quiet)
    scores = {k: v for k, v in results.items() if isinstance(v, float) and k != "seconds"}
    scores.update({f"ood_auroc_{k}": v for k, v in results.get("ood_auroc", {}).items()})
    summary = ", ".join(f"{k}={v:.4g}" for k, v in scores.items())
    print(f"{results['model']} ({results['method']}, {results['chains']}x{results['draws']} draws): {summary}; "
          f"diagnostics in {arguments.run_dir}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    from .errors import BayesSWSError, interrupts_as_keyboard

    arguments = None
    try:
        with interrupts_as_keyboard():
            arguments = _parser().parse_args(argv)
            try:
                if arguments.command == "check":
                    from .spec import load_spec

                    print(json.dumps(load_spec(arguments.spec, overrides=arguments.overrides).to_dict(), indent=2))
                    return 0
                if arguments.command == "diagnose":
                    return _diagnose(arguments)
                if arguments.command in ("compress", "evaluate"):
                    command = _compress_command if arguments.command == "compress" else _evaluate_command
                    print(command(arguments))
                    return 0
                return _fit(arguments)
            except BayesSWSError as error:
                print(f"bayes-sws: error: {error}", file=sys.stderr)
                return 2
            except MemoryError:
                print("bayes-sws: error: out of memory: make the model, the batch or the data smaller",
                      file=sys.stderr)
                return 2
    except KeyboardInterrupt:
        staging = getattr(arguments, "staging", None)
        hint = (f" (the unfinished fit's state is in {staging}/; continue it with --resume)"
                if staging is not None and (staging / "state.pt").is_file() else "")
        print(f"bayes-sws: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
