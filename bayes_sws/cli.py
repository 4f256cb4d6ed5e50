"""The ``bayes-sws`` command: a thin shell over the Python API.

    bayes-sws fit models/digits.toml [--method map|vi|nuts] [--out DIR] [--set key=value ...] [--device cpu|cuda]
    bayes-sws check models/digits.toml [--set key=value ...]
    bayes-sws diagnose RUN_DIR [--draws S] [--seed N] [--quiet]

Errors in the user's input print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import BayesSWSError
from .experiment import run
from .spec import METHODS, load_spec

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
    diagnose = commands.add_parser("diagnose", help="posterior diagnostics and predictive uncertainty of a fitted run")
    diagnose.add_argument("run_dir", help="a directory written by `bayes-sws fit` (holding checkpoint.pt)")
    diagnose.add_argument("--draws", type=int, default=100, help="posterior draws of a variational fit (default 100)")
    diagnose.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    diagnose.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _diagnose(arguments: argparse.Namespace) -> int:
    from .diagnose import diagnose  # imports arviz: only this command pays for it

    results = diagnose(arguments.run_dir, draws=arguments.draws, seed=arguments.seed, progress=not arguments.quiet)
    scores = {k: v for k, v in results.items() if isinstance(v, float) and k != "seconds"}
    scores.update({f"ood_auroc_{k}": v for k, v in results.get("ood_auroc", {}).items()})
    summary = ", ".join(f"{k}={v:.4g}" for k, v in scores.items())
    print(f"{results['model']} ({results['method']}, {results['chains']}x{results['draws']} draws): {summary}; "
          f"diagnostics in {arguments.run_dir}/")
    return 0


def _summary(metrics: dict) -> str:
    scores = {k: v for k, v in metrics.items() if k.startswith("test_") and isinstance(v, float)}
    point = "" if metrics["method"] == "map" else f" (at the {metrics['metrics_at']}; predictive: bayes-sws diagnose)"
    return ", ".join(f"{k}={v:.4g}" for k, v in scores.items()) + f"{point}, {metrics['seconds']:.1f} s"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    arguments = _parser().parse_args(argv)
    try:
        if arguments.command == "diagnose":
            return _diagnose(arguments)
        method = [f"inference.method={arguments.method!r}"] if getattr(arguments, "method", None) else []
        spec = load_spec(arguments.spec, overrides=[*arguments.overrides, *method])
        if arguments.command == "check":
            print(json.dumps(spec.to_dict(), indent=2))
            return 0
        out = Path(arguments.out or Path("runs") / spec.name)
        metrics = run(spec, out_dir=out, device=arguments.device, progress=not arguments.quiet)
    except BayesSWSError as error:
        print(f"bayes-sws: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bayes-sws: interrupted", file=sys.stderr)
        return 130
    print(f"{spec.name}: {_summary(metrics)}; results in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
