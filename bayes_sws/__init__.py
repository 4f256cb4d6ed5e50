"""bayes-sws: soft weight-sharing priors for neural networks, as Pyro programs.

A network's weights get a learned mixture-of-Gaussians prior (Nowlan & Hinton
1992; Bishop, PRML §5.5.7); MAP fitting with Pyro's ``AutoDelta`` minimises
E(w) + λΩ(w) plus the hyperprior terms.

>>> import bayes_sws as sws
>>> spec = sws.load_spec("models/digits.toml")
>>> metrics = sws.run(spec, out_dir="runs/digits")
"""

from .codec import QuantisedLayer, QuantisedNetwork, load_compressed, read_compressed, storage_report, write_compressed
from .compression import CompressionResult, compress, save_compression, sweep_prior_weight
from .data import Dataset, load_dataset
from .errors import BayesSWSError, DataError, FitError, SpecError
from .kernels import set_backend, use_backend
from .experiment import FittedModel, build_model, load_checkpoint, run
from .fitting import Callback, Evaluate, FitState, evaluate, fit, library_scope, start_fit
from .inference import EMUpdate, fit_map, map_guide, map_loss
from .optim import LearningRates
from .model import Categorical, Gaussian, SoftWeightSharingModel
from .nets import build_network
from .prior import (
    GaussianMixture,
    Hyperpriors,
    MixturePrior,
    SoftWeightSharingPrior,
    mixture_log_density,
    mixture_log_prob_sum,
    responsibilities,
)
from .spec import Spec, load_spec

__version__ = "0.1.0"

__all__ = [
    "BayesSWSError",
    "Callback",
    "CompressionResult",
    "Categorical",
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
    "library_scope",
    "load_compressed",
    "load_checkpoint",
    "load_dataset",
    "load_spec",
    "map_guide",
    "map_loss",
    "mixture_log_density",
    "mixture_log_prob_sum",
    "read_compressed",
    "responsibilities",
    "run",
    "save_compression",
    "set_backend",
    "use_backend",
    "start_fit",
    "storage_report",
    "sweep_prior_weight",
    "write_compressed",
]
