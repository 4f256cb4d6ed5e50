"""Scores of predictive distributions against hand computations on small constructed inputs."""

import math

import pytest
import torch
from sklearn.metrics import roc_auc_score

from bayes_sws.metrics import (
    accuracy,
    average_relative_variance,
    brier_score,
    calibration,
    classification_metrics,
    gaussian_nll,
    negative_log_likelihood,
    ood_auroc,
)

# Four inputs, two classes; confidences 0.9 (right), 0.78 (wrong), 0.55 (right), 0.7 (right),
# each off the 15-bin edges (multiples of 1/15), in bins 13, 11, 8 and 10.
PROBABILITIES = torch.tensor([[0.9, 0.1], [0.78, 0.22], [0.55, 0.45], [0.3, 0.7]])
LABELS = torch.tensor([0, 1, 0, 1])


def test_ece_is_the_count_weighted_gap_between_accuracy_and_confidence():
    result = calibration(PROBABILITIES, LABELS)
    # one input per occupied bin: ECE = mean |correct − confidence|
    assert result.ece == pytest.approx((0.1 + 0.78 + 0.45 + 0.3) / 4)
    assert result.counts.tolist() == [0] * 8 + [1, 0, 1, 1, 0, 1, 0]
    assert result.confidence[[8, 10, 11, 13]].tolist() == pytest.approx([0.55, 0.7, 0.78, 0.9])
    assert result.accuracy[[8, 10, 11, 13]].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert torch.isnan(result.confidence[0]) and torch.isnan(result.accuracy[14])
    assert result.edges.tolist() == pytest.approx([m / 15 for m in range(16)])


def test_ece_pools_inputs_sharing_a_bin():
    probabilities = torch.tensor([[0.91, 0.09], [0.92, 0.08], [0.1, 0.9]])  # all three in bin 13
    result = calibration(probabilities, torch.tensor([0, 1, 1]))
    assert result.counts[13] == 3
    assert result.accuracy[13] == pytest.approx(2 / 3)
    assert result.confidence[13] == pytest.approx((0.91 + 0.92 + 0.9) / 3)
    assert result.ece == pytest.approx(abs(2 / 3 - 0.91))


def test_bins_include_their_upper_edge():
    # two bins, (0, 0.5] and (0.5, 1]: confidence 0.5 falls in the first, 1.0 in the last
    result = calibration(torch.tensor([[0.5, 0.5], [1.0, 0.0]]), torch.tensor([0, 0]), n_bins=2)
    assert result.counts.tolist() == [1, 1]
    assert result.ece == pytest.approx(0.5 * 0.5)


def test_auroc_is_the_mann_whitney_statistic_with_ties_counted_half():
    inside = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.4])
    outside = torch.tensor([0.9, 0.4, 0.2])
    pairs = [(1.0 if o > i else 0.5 if o == i else 0.0) for o in outside.tolist() for i in inside.tolist()]
    expected = sum(pairs) / len(pairs)
    assert ood_auroc(inside, outside) == pytest.approx(expected)
    labels = [0] * len(inside) + [1] * len(outside)
    assert ood_auroc(inside, outside) == pytest.approx(roc_auc_score(labels, torch.cat([inside, outside])))


def test_auroc_agrees_with_sklearn_on_many_tied_scores():
    generator = torch.Generator().manual_seed(0)
    inside = torch.randint(0, 6, (200,), generator=generator).float()
    outside = torch.randint(2, 9, (150,), generator=generator).float()
    labels = [0] * 200 + [1] * 150
    assert ood_auroc(inside, outside) == pytest.approx(roc_auc_score(labels, torch.cat([inside, outside])))


def test_auroc_extremes():
    assert ood_auroc(torch.tensor([0.0, 0.1]), torch.tensor([0.5, 0.7, 0.6])) == 1.0
    assert ood_auroc(torch.tensor([0.5, 0.7]), torch.tensor([0.0, 0.1])) == 0.0
    assert ood_auroc(torch.ones(4), torch.ones(3)) == 0.5
    with pytest.raises(ValueError, match="at least one"):
        ood_auroc(torch.ones(3), torch.ones(0))


def test_accuracy_nll_and_brier_by_hand():
    assert accuracy(PROBABILITIES, LABELS) == 0.75
    expected_nll = -(math.log(0.9) + math.log(0.22) + math.log(0.55) + math.log(0.7)) / 4
    assert negative_log_likelihood(PROBABILITIES, LABELS) == pytest.approx(expected_nll)
    expected_brier = (2 * 0.1**2 + 2 * 0.78**2 + 2 * 0.45**2 + 2 * 0.3**2) / 4
    assert brier_score(PROBABILITIES, LABELS) == pytest.approx(expected_brier)
    uniform = torch.full((1, 4), 0.25)
    assert brier_score(uniform, torch.tensor([2])) == pytest.approx(0.75**2 + 3 * 0.25**2)
    assert negative_log_likelihood(torch.tensor([[1.0, 0.0]]), torch.tensor([1])) > 700  # p = 0: finite, huge
    assert classification_metrics(PROBABILITIES, LABELS) == {
        "accuracy": 0.75, "nll": pytest.approx(expected_nll), "brier": pytest.approx(expected_brier),
        "ece": pytest.approx(0.4075)}


def test_regression_scores():
    mean, variance, targets = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 4.0]), torch.tensor([1.0, 1.0])
    expected = -torch.distributions.Normal(mean, variance.sqrt()).log_prob(targets).mean()
    assert gaussian_nll(mean, variance, targets) == pytest.approx(float(expected))
    assert average_relative_variance(mean, targets, target_variance=0.25) == pytest.approx(0.5 / 0.25)


NAN = float("nan")


@pytest.mark.parametrize("score", [accuracy, negative_log_likelihood, brier_score, classification_metrics])
def test_a_nan_probability_is_a_one_line_error_not_a_score(score):
    probabilities = PROBABILITIES.clone()
    probabilities[1] = NAN
    with pytest.raises(ValueError, match="NaN") as error:
        score(probabilities, LABELS)
    assert "\n" not in str(error.value)


def test_calibration_refuses_nan_probabilities():
    probabilities = PROBABILITIES.clone()
    probabilities[0, 0] = NAN
    with pytest.raises(ValueError, match="NaN"):
        calibration(probabilities, LABELS)


@pytest.mark.parametrize("side", ["in", "out"])
def test_auroc_refuses_nan_scores_instead_of_ranking_them(side):
    scores = {"in": torch.tensor([0.1, 0.2]), "out": torch.tensor([0.5, 0.7])}
    scores[side][0] = NAN
    with pytest.raises(ValueError, match="NaN"):
        ood_auroc(scores["in"], scores["out"])


def test_regression_scores_refuse_nan():
    with pytest.raises(ValueError, match="NaN"):
        gaussian_nll(torch.tensor([NAN]), torch.tensor([1.0]), torch.tensor([0.0]))
    with pytest.raises(ValueError, match="NaN"):
        average_relative_variance(torch.tensor([0.0]), torch.tensor([NAN]), target_variance=1.0)
