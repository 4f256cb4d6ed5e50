"""The specification layer: light to import, and its vocabularies match the modules that act on them."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bayes_sws import data, inference, kernels, nets, optim, spec
from bayes_sws.errors import SpecError

ROOT = Path(__file__).resolve().parents[1]

# Loads bayes_sws.spec (and the bayes_sws.errors it imports) as submodules of an empty
# stand-in package: the real bayes_sws/__init__.py imports every module, so a plain
# `import bayes_sws.spec` would say nothing about spec.py's own imports.
LOAD_SPEC_ALONE = """
import importlib, sys, types
package = types.ModuleType("bayes_sws")
package.__path__ = [sys.argv[1]]
sys.modules["bayes_sws"] = package
spec = importlib.import_module("bayes_sws.spec")
for path in sys.argv[2:]:
    spec.load_spec(path)
print(" ".join(sorted({"torch", "pyro", "numpy", "matplotlib"} & set(sys.modules))))
"""


def test_loading_every_model_spec_imports_neither_torch_nor_pyro():
    models = sorted(str(p) for p in (ROOT / "models").glob("*.toml"))
    assert models
    result = subprocess.run([sys.executable, "-c", LOAD_SPEC_ALONE, str(ROOT / "bayes_sws"), *models],
                            capture_output=True, text=True, check=True)
    assert result.stdout.split() == []


@pytest.mark.parametrize(
    ("names", "accepted"),
    [
        (spec.DATASET_NAMES, data.DATASET_NAMES),
        (spec.ARCHITECTURES, nets.ARCHITECTURES),
        (spec.ACTIVATIONS, tuple(nets.ACTIVATIONS)),
        (spec.BACKENDS, kernels.BACKENDS),
        (tuple(f"fit_{method}" for method in spec.METHODS),
         tuple(name for name in inference.__all__ if name.startswith("fit_"))),
        (spec.MIXTURE_GUIDES, inference.MIXTURE_GUIDES),
    ],
    ids=["datasets", "architectures", "activations", "backends", "methods", "mixture guides"],
)
def test_vocabularies_equal_what_the_modules_accept(names, accepted):
    assert names == accepted


@pytest.mark.parametrize("name", spec.OPTIMIZERS)
def test_every_optimizer_a_spec_names_can_be_built(name):
    import torch

    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = optim.make_optimizer(name, {"weights": [parameter]}, spec.LearningRates(), iterations=2)
    assert isinstance(optimizer, torch.optim.Optimizer)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(n_components=0), "n_components"),
        (dict(init_scale=0.0), "init_scale"),
        (dict(pi_zero=0.5, zero_component=False), "zero_component"),
        (dict(pi_zero=0.5, n_components=1), "two components"),
        (dict(pi_zero=1.0), "pi_zero"),
        (dict(init_means=(0.5, -0.5)), "increasing"),
    ],
)
def test_mixture_spec_rejects_invalid_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        spec.MixtureSpec(**kwargs)


@pytest.mark.parametrize("field", ["dirichlet", "means_scale", "precision_gamma", "zero_proportion_beta"])
def test_hyperpriors_must_be_positive_and_finite(field):
    value = (1.0, float("inf")) if field.endswith(("gamma", "beta")) else -1.0
    with pytest.raises(ValueError, match=field):
        spec.Hyperpriors(**{field: value})


def test_the_zero_components_precision_hyperprior_needs_the_others():
    with pytest.raises(ValueError, match="needs precision_gamma"):
        spec.Hyperpriors(zero_precision_gamma=(2.0, 1.0))


def test_a_toml_prior_table_becomes_a_mixture_spec_with_hyperpriors():
    parsed = spec.parse_spec({"name": "m", "prior": {"weight": 0.05, "n_components": 17, "pi_zero": 0.999,
                                                     "hyperpriors": {"precision_gamma": [250, 0.1]}}})
    assert parsed.prior.mixture == spec.MixtureSpec(
        n_components=17, pi_zero=0.999, hyperpriors=spec.Hyperpriors(precision_gamma=(250.0, 0.1)))
    assert parsed.to_dict()["prior"]["n_components"] == 17


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"prior": {"pi_zero": 2.0}}, "pi_zero"),
        ({"inference": {"method": "laplace"}}, "method"),
        ({"inference": {"vi": {"num_particles": 0}}}, "num_particles"),
        ({"inference": {"vi": {"mixture_guide": "wishart"}}}, "mixture_guide"),
        ({"inference": {"nuts": {"target_accept_prob": 1.5}}}, "target_accept_prob"),
        ({"inference": {"nuts": {"unknown": 1}}}, "inference.nuts.'unknown'"),
        ({"inference": {"learning_rates": {"means": 0.0}}}, "means"),
    ],
)
def test_invalid_values_raise_spec_errors_naming_the_setting(table, key):
    with pytest.raises(SpecError, match=key):
        spec.parse_spec({"name": "m", **table})


def test_a_bundled_specification_loads_by_name_from_any_directory(tmp_path: Path, monkeypatch) -> None:
    assert set(spec.bundled_specs()) == {p.stem for p in (ROOT / "models").glob("*.toml")}
    monkeypatch.chdir(tmp_path)
    for name in ("digits", "digits.toml", "models/digits.toml"):
        assert spec.load_spec(name).name == "digits"
    (tmp_path / "digits.toml").write_text('name = "mine"\n')
    assert spec.load_spec("digits.toml").name == "mine"       # a file that exists comes first
    with pytest.raises(SpecError, match=r"not found \(bundled: .*sunspots"):
        spec.load_spec("models/no-such-model.toml")
    with pytest.raises(SpecError, match="not found"):
        spec.load_spec(tmp_path / "elsewhere" / "digits.toml")  # only NAME, NAME.toml, models/NAME.toml


def test_a_built_wheel_ships_the_specifications_and_an_install_from_it_finds_them(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    source = tmp_path / "source"      # a copy, so that the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "bayes_sws", "models"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, source / name)
    build = ("import sys; from setuptools import build_meta; "
             "print(build_meta.build_wheel(sys.argv[1]))")
    wheel = subprocess.run([sys.executable, "-c", build, str(tmp_path)], cwd=source, capture_output=True,
                           text=True, check=True).stdout.split()[-1]
    installed = tmp_path / "installed"
    with zipfile.ZipFile(tmp_path / wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(installed)
    assert {f"bayes_sws/models/{p.name}" for p in (ROOT / "models").glob("*.toml")} <= names
    assert "bayes_sws/sws_kernel.c" in names
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    check = ("from bayes_sws.spec import bundled_specs, load_spec; "
             "print(len(bundled_specs()), load_spec('models/digits.toml').name, bundled_specs()['digits'])")
    result = subprocess.run([sys.executable, "-c", check], cwd=elsewhere, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(installed)}, check=True).stdout.split()
    assert result[:2] == [str(len(list((ROOT / "models").glob("*.toml")))), "digits"]
    assert Path(result[2]).is_relative_to(installed)
