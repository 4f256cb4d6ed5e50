"""Benchmark: Ullrich et al.'s Table 1 on Fashion-MNIST: soft weight-sharing against Deep Compression and pruning.

For each model (``models/fashion-<model>.toml``) and seed, the network is pretrained
once (``inference.pretrain_epochs`` without the prior); every method then starts
from that network, through :func:`bayes_sws.compression.compress`, with the same
epoch budget after pretraining (``--epochs`` retraining + ``--finetune-epochs``
codebook fine-tune; pruning alone retrains for both):

* ``sws``: soft weight-sharing at each τ of ``--taus``;
* ``dc``: Deep Compression at each pruning fraction of ``--dc-fractions`` (k-means with
  ``compression.fc_clusters`` / ``conv_clusters`` centres, zero included);
* ``prune``: magnitude pruning and retraining at each of ``--prune-fractions``.

Per method the setting is chosen on the validation split
(:func:`~bayes_sws.compression.choose_on_validation`: the highest Han (Huffman) rate
whose validation accuracy is within ``--tolerance`` of the pretrained net's, else the
most accurate). The chosen setting's test figures go into the table
(test accuracy is computed for every run but never used to choose). Rates, each for
what it counts (docs in ``bayes_sws/codec.py``): Han's accounting with Huffman codes
and with fixed-width codes, the real file's bytes against the dense float32 network,
and |W| / non-zero weights. Mean ± standard deviation over the seeds.

Run (full protocol):
    PYTHONPATH=. .venv/bin/python benchmarks/bench_compression.py --json benchmarks/results/compression.json
Cut version (one model, one seed, shorter schedules):
    PYTHONPATH=. .venv/bin/python benchmarks/bench_compression.py --models lenet-300-100 --seeds 0 \\
        --taus 0.05,0.1 --dc-fractions 0.9,0.95 --prune-fractions 0.95
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bayes_sws.codec import encode_compressed, storage_report
from bayes_sws.compression import choose_on_validation, compress, pretrained_model
from bayes_sws.data import load_dataset
from bayes_sws.errors import BayesSWSError
from bayes_sws.spec import load_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import loadavg, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t]


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet-300-100,lenet5", help="comma-separated: lenet-300-100, lenet5")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--pretrain-epochs", type=int, help="default: the spec's")
    parser.add_argument("--epochs", type=int, help="retraining epochs (default: the spec's)")
    parser.add_argument("--finetune-epochs", type=int, help="default: the spec's compression.finetune_epochs")
    parser.add_argument("--taus", default="0.02,0.05,0.1", help="soft weight-sharing prior weights to choose from")
    parser.add_argument("--dc-fractions", default="0.9,0.95,0.97", help="Deep Compression pruning fractions")
    parser.add_argument("--prune-fractions", default="0.9,0.95,0.97", help="pruning-alone fractions")
    parser.add_argument("--methods", default="sws,dc,prune")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a specification value for every run (repeatable), as bayes-sws --set; "
                             "--seeds, --taus and the pruning fractions still set seed, prior.weight and prune_fraction")
    parser.add_argument("--tolerance", type=float, default=0.01, help="validation accuracy loss allowed when choosing")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--json", help="also write the results here (after every seed)")
    parser.add_argument("--table-from", nargs="+", metavar="JSON",
                        help="run nothing: print the table of these --json files (e.g. one per seed)")
    return parser.parse_args()


def _settings(method: str, arguments: argparse.Namespace) -> list[tuple[str, list[str]]]:
    if method == "sws":
        return [(f"tau={t:g}", [f"prior.weight={t}"]) for t in _floats(arguments.taus)]
    fractions = _floats(arguments.dc_fractions if method == "dc" else arguments.prune_fractions)
    return [(f"pruned={f:g}", [f"compression.prune_fraction={f}"]) for f in fractions]


def _run(spec_path: Path, seed: int, method: str, arguments: argparse.Namespace, base: list[str],
         data, state) -> dict:
    rows = []
    for label, overrides in _settings(method, arguments):
        spec = load_spec(spec_path, overrides=[*base, f"seed={seed}", *overrides])
        started = time.perf_counter()
        result = compress(spec, method=method, data=data, network_state=state, device=arguments.device,
                          progress=arguments.progress)
        wall = time.perf_counter() - started
        report = storage_report(result.quantised, file_bytes=len(encode_compressed(result.quantised)))
        rows.append({"setting": label, "wall_seconds": wall, **result.metrics,
                     **{k: v for k, v in report.items() if k != "layers"}, "history": result.history})
        print(f"  {spec.name} seed {seed} {method} {label}: valid {rows[-1]['valid_accuracy_before']:.4f} -> "
              f"{rows[-1]['valid_accuracy_after']:.4f} (quantised {rows[-1]['valid_accuracy_quantised']:.4f}), non-zero {100 * report['nonzero_fraction']:.2f}%, "
              f"Han huffman {report['han_huffman_rate']:.1f}x, folded {result.metrics['folded_weights']} weights, "
              f"{wall:.0f} s", flush=True)
    return {"chosen": rows[choose_on_validation(rows, tolerance=arguments.tolerance)], "all": rows}


def _spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f}±{statistics.stdev(values) * scale:.{digits}f}"


def _print_table(results: dict[tuple[str, str], list[dict]], *, seeds: str, tolerance: float) -> None:
    """The table: per model and method, the chosen setting's figures, mean ± sd over the seeds."""
    header = (f"{'model':<14} {'method':<6} {'setting(s)':<22} {'fine-tune':>9} {'test err % before -> after':>27} "
              f"{'non-zero %':>11} {'Han huffman':>12} {'Han fixed':>10} {'file':>9} {'|W|/nnz':>9} {'wall s':>9}")
    print("\n" + header + "\n" + "-" * len(header))
    for (name, method), outcomes in results.items():
        chosen = [o["chosen"] for o in outcomes]
        before = [1 - r["test_accuracy_before"] for r in chosen]
        after = [1 - r["test_accuracy_after"] for r in chosen]
        settings = ",".join(sorted({r["setting"] for r in chosen}))
        finetune = f"{chosen[0]['finetune_epochs']} ep" if chosen[0]["finetune_epochs"] else "no"
        print(f"{name:<14} {method:<6} {settings:<22} {finetune:>9} "
              f"{_spread(before, 100, 2) + ' -> ' + _spread(after, 100, 2):>27} "
              f"{_spread([r['nonzero_fraction'] for r in chosen], 100, 2):>11} "
              f"{_spread([r['han_huffman_rate'] for r in chosen]) + 'x':>12} "
              f"{_spread([r['han_fixed_rate'] for r in chosen]) + 'x':>10} "
              f"{_spread([r['file_rate'] for r in chosen]) + 'x':>9} "
              f"{_spread([r['parameter_rate'] for r in chosen]) + 'x':>9} "
              f"{_spread([r['wall_seconds'] for r in chosen], digits=0):>9}")
    print(f"\nseeds {seeds}; pretraining not in wall s; settings chosen on validation (tolerance {tolerance})")


def _tables_from(paths: list[str]) -> None:
    """Print the table of one or more ``--json`` files (e.g. one per seed, run side by side)."""
    results: dict[tuple[str, str], list[dict]] = {}
    tolerances = set()
    for path in paths:
        try:
            payload = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise SystemExit(f"bench_compression: cannot read {path}: {error}") from None
        tolerances.add(payload["config"]["tolerance"])
        listed = [int(seed) for seed in payload["config"]["seeds"].split(",")]
        for entry in payload["results"]:
            # (files written before runs recorded their seed hold them in --seeds order)
            runs = [{"seed": listed[i], **run} for i, run in enumerate(entry["runs"])]
            results.setdefault((entry["model"], entry["method"]), []).extend(runs)
    if len(tolerances) > 1:
        raise SystemExit(f"the files chose their settings with different tolerances: {sorted(tolerances)}")
    seeds = sorted({run["seed"] for runs in results.values() for run in runs})
    _print_table(results, seeds=",".join(map(str, seeds)), tolerance=tolerances.pop())


def _write(arguments: argparse.Namespace, results: dict[tuple[str, str], list[dict]]) -> None:
    write_json(arguments.json, "compression", config=vars(arguments),
               results=[{"model": n, "method": m, "runs": o} for (n, m), o in results.items()])


def main() -> None:
    arguments = _arguments()
    if arguments.table_from:
        _tables_from(arguments.table_from)
        return
    torch.set_num_threads(arguments.threads)
    base = list(arguments.set)
    if arguments.pretrain_epochs is not None:
        base.append(f"inference.pretrain_epochs={arguments.pretrain_epochs}")
    if arguments.epochs is not None:
        base.append(f"inference.epochs={arguments.epochs}")
    if arguments.finetune_epochs is not None:
        base.append(f"compression.finetune_epochs={arguments.finetune_epochs}")
    methods = arguments.methods.split(",")
    try:  # every run's specification, before any training
        for name in arguments.models.split(","):
            for method in methods:
                for _, overrides in _settings(method, arguments):
                    load_spec(ROOT / "models" / f"fashion-{name}.toml",
                              overrides=[*base, f"compression.method={method}", *overrides])
    except (BayesSWSError, ValueError) as error:
        raise SystemExit(f"bench_compression: {error}") from None
    results: dict[tuple[str, str], list[dict]] = {}
    for name in arguments.models.split(","):
        spec_path = ROOT / "models" / f"fashion-{name}.toml"
        for seed in (int(s) for s in arguments.seeds.split(",")):
            spec = load_spec(spec_path, overrides=[*base, f"seed={seed}"])
            data = load_dataset(spec.data.dataset, path=spec.data.path, seed=seed).with_validation(
                spec.data.validation_fraction, seed=seed).to(arguments.device)
            model, pretrain_seconds = pretrained_model(spec, data, progress=arguments.progress)
            state = {k: v.detach().clone() for k, v in model.network.state_dict().items()}
            print(f"{name} seed {seed}: pretrained {spec.inference.pretrain_epochs} epochs in {pretrain_seconds:.0f} s",
                  flush=True)
            for method in methods:
                outcome = _run(spec_path, seed, method, arguments, base, data, state)
                outcome["chosen"]["pretrain_seconds"] = pretrain_seconds
                outcome["seed"] = seed
                results.setdefault((name, method), []).append(outcome)
            if arguments.json:  # after every seed, so that an interrupted run keeps what it finished
                _write(arguments, results)
    _print_table(results, seeds=arguments.seeds, tolerance=arguments.tolerance)
    print(f"load average at end: {loadavg()}")


if __name__ == "__main__":
    main()
