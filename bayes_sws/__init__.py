"""bayes-sws: soft weight-sharing priors for neural networks, as Pyro programs.

A network's weights get a learned mixture-of-Gaussians prior (Nowlan & Hinton
1992; Bishop, PRML §5.5.7); MAP fitting with Pyro's ``AutoDelta`` minimises
E(w) + λΩ(w) plus the hyperprior terms; ``fit_vi`` and ``fit_nuts`` give the
posterior over the same model (``PosteriorSamples``).

>>> import bayes_sws as sws
>>> spec = sws.load_spec("models/digits.toml")
>>> metrics = sws.run(spec, out_dir="runs/digits")
"""

from .data import Dataset, load_dataset, load_ood
from .errors import BayesSWSError, DataError, FitError, SpecError
from .kernels import set_backend, use_backend
from .experiment import FittedModel, build_model, load_checkpoint, run
from .fitting import Callback, Evaluate, FitState, evaluate, fit, library_scope, start_fit
from .inference import (
    NUTS_MAX_WEIGHTS,
    EMUpdate,
    PosteriorSamples,
    fit_map,
    fit_nuts,
    fit_vi,
    map_guide,
    map_loss,
    sample_guide,
    vi_guide,
    vi_loss,
)
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
from .predictive import ClassificationPredictive, RegressionPredictive, predict
from .spec import Spec, load_spec

__version__ = "0.1.0"

__all__ = [
    "BayesSWSError",
    "Callback",
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
    "SoftWeightSharingModel",
    "SoftWeightSharingPrior",
    "Spec",
    "SpecError",
    "build_model",
    "build_network",
    "evaluate",
    "fit",
    "fit_map",
    "fit_nuts",
    "fit_vi",
    "library_scope",
    "load_checkpoint",
    "load_dataset",
    "load_ood",
    "load_spec",
    "map_guide",
    "map_loss",
    "predict",
    "mixture_log_density",
    "mixture_log_prob_sum",
    "responsibilities",
    "run",
    "sample_guide",
    "set_backend",
    "use_backend",
    "vi_guide",
    "vi_loss",
    "start_fit",
]
