"""The ``bayes-sws`` command: a thin shell over the Python API.

    bayes-sws fit models/digits.toml [--method map|vi|nuts] [--out DIR] [--set key=value ...]
                                     [--device cpu|cuda] [--resume] [--force] [--quiet]
    bayes-sws check models/digits.toml [--set key=value ...]
    bayes-sws diagnose RUN_DIR [--draws S] [--seed N] [--quiet]
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
    return parser


def _summary(metrics: dict) -> str:
    scores = {k: v for k, v in metrics.items() if k.startswith("test_") and isinstance(v, float)}
    return ", ".join(f"{k}={v:.4g}" for k, v in scores.items()) + f", {metrics['seconds']:.1f} s"


def _fit(arguments: argparse.Namespace) -> int:
    from .distributed import is_main_process, launched
    from .experiment import run
    from .spec import load_spec

    method = [f"inference.method={arguments.method!r}"] if arguments.method else []
    spec = load_spec(arguments.spec, overrides=[*arguments.overrides, *method])
    out = Path(arguments.out or Path("runs") / spec.name)
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
                return _fit(arguments)
            except BayesSWSError as error:
                print(f"bayes-sws: error: {error}", file=sys.stderr)
                return 2
            except MemoryError:
                print("bayes-sws: error: out of memory: make the model, the batch or the data smaller",
                      file=sys.stderr)
                return 2
    except KeyboardInterrupt:
        print("bayes-sws: interrupted (an unfinished fit keeps its last epoch in OUT.partial/; "
              "continue it with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
