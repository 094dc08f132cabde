"""Prior refinement: the closed form equals the definition, groups by label, and picks stable channels."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from apecli.errors import ApecliError
from apecli.methods.criterion import channel_criterion, top_channels
from apecli.methods.scores import renormalised
from apecli.refine import select_channels

from conftest import random_unit, real_dataset


def criterion_by_pairs(text: np.ndarray, keys: np.ndarray, labels: np.ndarray, weights) -> np.ndarray:
    """The definition, literally: mean of f_d·g_d over every pair of pool vectors of different classes."""
    pools = [np.vstack([text[c][None], keys[labels == c]]) for c in range(text.shape[0])]
    total, pairs = np.zeros(text.shape[1]), 0
    for i, j in itertools.permutations(range(len(pools)), 2):
        for f in pools[i]:
            for g in pools[j]:
                total += f * g
                pairs += 1
    similarity = total / pairs
    variance = np.array([np.var(text[:, d], ddof=1) for d in range(text.shape[1])])
    return -weights[0] * similarity + weights[1] * variance


def test_closed_form_equals_pairwise_definition():
    rng = np.random.default_rng(0)
    text = random_unit(rng, 5, 12)
    labels = np.repeat(np.arange(5), 3)
    keys = random_unit(rng, 15, 12)
    expected = criterion_by_pairs(text, keys, labels, (0.3, 0.7))
    np.testing.assert_allclose(channel_criterion(text, keys, labels, (0.3, 0.7)), expected, rtol=1e-12, atol=1e-15)


def test_text_only_pools_follow_the_same_definition():
    rng = np.random.default_rng(1)
    text = random_unit(rng, 4, 8)
    empty = np.zeros((0, 8))
    expected = criterion_by_pairs(text, empty, np.zeros(0, dtype=int), (0.5, 0.5))
    np.testing.assert_allclose(channel_criterion(text, None, None, (0.5, 0.5)), expected, rtol=1e-12, atol=1e-15)


def test_cache_order_does_not_matter_only_labels_do():
    rng = np.random.default_rng(2)
    text = random_unit(rng, 6, 16)
    labels = np.repeat(np.arange(6), 4)
    keys = random_unit(rng, 24, 16)
    shuffle = rng.permutation(24)
    np.testing.assert_allclose(
        channel_criterion(text, keys[shuffle], labels[shuffle], (0.5, 0.5)),
        channel_criterion(text, keys, labels, (0.5, 0.5)),
        rtol=1e-13,
    )


def test_top_channels_are_best_first_with_lower_index_winning_ties():
    criterion = np.array([0.1, 0.5, 0.5, -1.0, 0.7])
    assert top_channels(criterion, 3).tolist() == [4, 1, 2]


@pytest.mark.parametrize("k", [0, -3, 33])
def test_k_outside_one_to_width_is_refused(small_features, k):
    with pytest.raises(ApecliError, match="k must be between 1 and the feature width 32"):
        select_channels(small_features, k=k)


def test_defaults_come_from_the_dataset_and_scale_with_width(small_features):
    from dataclasses import replace

    caltech = replace(small_features, dataset="caltech101")
    refinement = select_channels(caltech)
    assert refinement.k == round(800 * 32 / 1024)  # caltech101's k for D = 1024, scaled to D = 32
    assert refinement.weights == (0.5, 0.5)
    assert refinement.shots == 4  # the largest cache


def test_refinement_keeps_the_class_separating_channels():
    from apecli.synthetic import synthetic_features

    features = synthetic_features(num_classes=12, dim=64, informative=0.5, seed=5)
    refinement = select_channels(features, k=32, weights=(1.0, 0.0))
    # The generator puts the class signal in the first half of the channels and a shared offset in the rest.
    assert np.mean(refinement.channels < 32) > 0.8


def test_real_flowers_group_by_label_where_a_reshape_would_not():
    """oxford_flowers' class blocks are not in label order: grouping by position picks other channels."""
    from apecli.importers import import_tip_adapter

    folder = real_dataset("oxford_flowers")
    features = import_tip_adapter(folder, folder / "proxy_text_weights.pt", "oxford_flowers")
    _, cache = features.cache(16)
    text = features.classifier.astype(np.float64)
    keys = cache.keys.astype(np.float64)
    # The reference, written the authors' way on label-sorted blocks: pools of shape C × (K+1) × D.
    order = np.argsort(cache.labels, kind="stable")
    pools = np.concatenate([text[:, None], keys[order].reshape(102, 16, -1)], axis=1)
    class_sums = pools.sum(axis=1)
    similarity = (class_sums.sum(0) ** 2 - (class_sums**2).sum(0)) / (102 * 101 * 17**2)
    expected = -0.4 * similarity + 0.6 * text.var(axis=0, ddof=1)
    ours = channel_criterion(features.classifier, cache.keys, cache.labels, (0.4, 0.6))
    np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-14)
    chosen = set(top_channels(ours, 350).tolist())
    assert chosen == set(np.argsort(-expected, kind="stable")[:350].tolist())
    by_position = np.concatenate([text[:, None], keys.reshape(102, 16, -1)], axis=1).sum(axis=1)
    wrong = -0.4 * (by_position.sum(0) ** 2 - (by_position**2).sum(0)) / (102 * 101 * 17**2) + 0.6 * text.var(0, ddof=1)
    assert np.abs(wrong - ours).max() > 1e-7
    assert any(set(top_channels(wrong, k).tolist()) != set(top_channels(ours, k).tolist()) for k in range(1, 512))


def test_real_caltech_criterion_matches_pairs_over_a_class_subset():
    from apecli.importers import import_tip_adapter

    folder = real_dataset("caltech101")
    features = import_tip_adapter(folder, folder / "proxy_text_weights.pt", "caltech101")
    _, cache = features.cache(2)
    keep = cache.labels < 5
    text = features.classifier[:5].astype(np.float64)
    expected = criterion_by_pairs(text, cache.keys[keep].astype(np.float64), cache.labels[keep], (0.5, 0.5))
    ours = channel_criterion(features.classifier[:5], cache.keys[keep], cache.labels[keep], (0.5, 0.5))
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-15)


def test_renormalised_rows_have_unit_norm():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(7, 10)).astype(np.float32)
    out = renormalised(x, np.array([0, 3, 5]))
    assert out.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(out, x[:, [0, 3, 5]] / np.linalg.norm(x[:, [0, 3, 5]], axis=1, keepdims=True), rtol=1e-6)
