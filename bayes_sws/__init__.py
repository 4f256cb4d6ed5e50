"""bayes-sws: soft weight-sharing priors for neural networks, as Pyro programs.

A network's weights get a learned mixture-of-Gaussians prior (Nowlan & Hinton
1992; Bishop, PRML §5.5.7); MAP fitting with Pyro's ``AutoDelta`` minimises
E(w) + λΩ(w) plus the hyperprior terms; ``fit_vi`` and ``fit_nuts`` give the
posterior over the same model (``PosteriorSamples``).

>>> import bayes_sws as sws
>>> spec = sws.load_spec("models/digits.toml")
>>> metrics = sws.run(spec, out_dir="runs/digits")
"""

import importlib
from typing import Any

# Public names and the modules they live in: imported on first use, so that the
# command line starts (and answers Ctrl-C) before torch and Pyro are loaded.
_EXPORTS = {
    "codec": ("QuantisedLayer", "QuantisedNetwork", "load_compressed", "read_compressed", "storage_report",
              "write_compressed"),
    "compression": ("CompressionResult", "compress", "save_compression", "sweep_prior_weight"),
    "data": ("Dataset", "load_dataset", "load_ood"),
    "errors": ("BayesSWSError", "DataError", "FitError", "SpecError"),
    "kernels": ("set_backend", "use_backend"),
    "experiment": ("FittedModel", "build_model", "load_checkpoint", "run"),
    "fitting": ("Callback", "Evaluate", "FitState", "evaluate", "fit", "library_scope", "start_fit"),
    "inference": ("NUTS_MAX_WEIGHTS", "EMUpdate", "NegativeELBO", "PosteriorSamples", "fit_map", "fit_nuts", "fit_vi",
                  "map_guide", "map_loss", "sample_guide", "vi_guide", "vi_loss"),
    "optim": ("LearningRates",),
    "model": ("Categorical", "Gaussian", "SoftWeightSharingModel"),
    "nets": ("build_network",),
    "prior": ("GaussianMixture", "Hyperpriors", "MixturePrior", "SoftWeightSharingPrior",
              "mixture_log_density", "mixture_log_prob_sum", "responsibilities"),
    "predictive": ("ClassificationPredictive", "RegressionPredictive", "predict"),
    "spec": ("Spec", "load_spec"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})


__version__ = "0.1.0"

__all__ = [
    "BayesSWSError",
    "Callback",
    "CompressionResult",
    "Categorical",
    "ClassificationPredictive",
    "DataError",
    "Dataset",
    "EMUpdate",
    "Evaluate",
    "FitError",
    "FitState",
    "FittedModel",
    "Gaussian",
    "GaussianMixture",
    "Hyperpriors",
    "LearningRates",
    "MixturePrior",
    "NUTS_MAX_WEIGHTS",
    "PosteriorSamples",
    "RegressionPredictive",
    "QuantisedLayer",
    "QuantisedNetwork",
    "SoftWeightSharingModel",
    "SoftWeightSharingPrior",
    "Spec",
    "SpecError",
    "build_model",
    "build_network",
    "compress",
    "evaluate",
    "fit",
    "fit_map",
    "fit_nuts",
    "fit_vi",
    "library_scope",
    "load_compressed",
    "load_checkpoint",
    "load_dataset",
    "load_ood",
    "load_spec",
    "map_guide",
    "map_loss",
    "predict",
    "mixture_log_density",
    "mixture_log_prob_sum",
    "read_compressed",
    "responsibilities",
    "run",
    "sample_guide",
    "save_compression",
    "set_backend",
    "use_backend",
    "vi_guide",
    "vi_loss",
    "NegativeELBO",
    "start_fit",
    "storage_report",
    "sweep_prior_weight",
    "write_compressed",
]
