"""Training-free APE: the tri-edge logits, and a fast search that chooses exactly what the loop chooses."""

from __future__ import annotations

import math

import numpy as np
import pytest

from apecli.errors import ApecliError
from apecli.evaluate import evaluate_training_free
from apecli.methods.cache_model import CacheModel
from apecli.methods.grid import SearchGrid, SearchResult
from apecli.methods.scores import count_correct
from apecli.methods.tri_edge import TriEdge, search, search_loop
from apecli.refine import select_channels

from conftest import random_unit, real_dataset


def literal_logits(f, W, F, labels, channels, alpha, beta, gamma):
    """APE's logits for one image, term by term, with plain Python loops (W is D × C as in the paper)."""
    C = W.shape[1]
    def refine(v):
        v = v[channels]
        return v / math.sqrt(sum(x * x for x in v))
    f_r = refine(f)
    W_r = np.stack([refine(W[:, c]) for c in range(C)], axis=1)
    out = []
    for c in range(C):
        value = 100.0 * sum(f[d] * W[d, c] for d in range(len(f)))
        for j in range(F.shape[0]):
            key = refine(F[j])
            scores = [sum(key[d] * W_r[d, i] for d in range(len(key))) for i in range(C)]
            soft = [math.exp(s) / sum(math.exp(t) for t in scores) for s in scores]
            one_hot = [1.0 if i == labels[j] else 0.0 for i in range(C)]
            divergence = sum(l * math.log2((l + 1e-6) / (p + 1e-6)) for l, p in zip(one_hot, soft))
            affinity = sum(f_r[d] * key[d] for d in range(len(key)))
            value += alpha * math.exp(-beta * (1 - affinity)) * one_hot[c] * math.exp(gamma * divergence)
        out.append(value)
    return np.array(out)


def test_logits_follow_the_formula_term_by_term():
    rng = np.random.default_rng(0)
    W = random_unit(rng, 3, 9).T
    F = random_unit(rng, 6, 9)
    labels = np.array([2, 0, 1, 2, 1, 0])
    f = random_unit(rng, 2, 9)
    channels = np.array([0, 2, 3, 7, 8])
    tri = TriEdge.build(W.T, F, labels, channels)
    ours = tri.logits(f, alpha=1.7, beta=3.2, gamma=0.4)
    for row in range(2):
        np.testing.assert_allclose(ours[row], literal_logits(f[row], W, F, labels, channels, 1.7, 3.2, 0.4), rtol=1e-12)


def test_logits_are_the_same_in_blocks_of_images(monkeypatch):
    """Images go through the key products a block at a time; blocks of seven give what one block gives."""
    from apecli.methods import scores as training_free

    rng = np.random.default_rng(5)
    W, keys, x = random_unit(rng, 5, 12), random_unit(rng, 15, 12), random_unit(rng, 40, 12)
    labels, weights = rng.permutation(np.repeat(np.arange(5), 3)), rng.uniform(0.5, 2.0, 15)
    tri = TriEdge.build(W, keys, labels, np.arange(0, 12, 2))
    model = CacheModel(W, keys, labels, weights)
    dense = 100 * x @ W.T + 2.5 * np.exp(-4.0 * (1 - x @ keys.T)) @ (np.eye(5)[labels] * weights[:, None])
    whole_tri, whole_model = tri.logits(x, 2.5, 4.0, 0.7), model.logits(x, 2.5, 4.0)
    np.testing.assert_allclose(whole_model, dense, rtol=1e-12)
    monkeypatch.setattr(training_free, "BLOCK_BYTES", 8 * 15 * 7)
    np.testing.assert_allclose(tri.logits(x, 2.5, 4.0, 0.7), whole_tri, rtol=1e-13)
    np.testing.assert_allclose(model.logits(x, 2.5, 4.0), whole_model, rtol=1e-13)


def test_grid_values_follow_the_authors_formula():
    grid = SearchGrid((7.0, 7.0, 1.0), (200, 20, 20))
    assert grid.size == 80_000
    assert grid.betas[0] == pytest.approx(0.1) and grid.betas[-1] == pytest.approx(0.1 + 199 * 6.9 / 200)
    assert grid.alphas[1] == pytest.approx(0.1 + 6.9 / 20)
    assert grid.gammas[0] == 0.0 and grid.gammas[-1] == pytest.approx(19 / 20)


def _searches_agree(tri, x, labels, grid, **kwargs):
    fast = search(tri, x, labels, grid, **kwargs)
    loop = search_loop(tri, x, labels, grid)
    np.testing.assert_array_equal(fast.correct, loop.correct)
    assert fast.best_index == loop.best_index
    assert fast.accuracy == loop.accuracy
    return fast


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_search_equals_the_loop_on_generated_features(seed):
    from apecli.synthetic import synthetic_features

    features = synthetic_features(num_classes=7, dim=24, shots=(4,), val_per_class=15, seed=seed, text_noise=1.2)
    refinement = select_channels(features, k=12)
    _, cache = features.cache(4)
    tri = TriEdge.build(features.classifier, cache.keys, cache.labels, refinement.channels)
    val = features.split("val")
    # A wide α range makes the cache decide most images, so the grid is far from flat.
    _searches_agree(tri, val.features, val.labels, SearchGrid((7.0, 30.0, 2.0), (9, 11, 5)))


def test_fast_search_is_the_same_in_small_chunks():
    from apecli.synthetic import synthetic_features

    features = synthetic_features(num_classes=5, dim=16, shots=(2,), val_per_class=13, seed=4)
    _, cache = features.cache(2)
    tri = TriEdge.build(features.classifier, cache.keys, cache.labels, np.arange(0, 16, 2))
    val = features.split("val")
    grid = SearchGrid((7.0, 7.0, 1.0), (6, 5, 4))
    one_chunk = search(tri, val.features, val.labels, grid)
    many = _searches_agree(tri, val.features, val.labels, grid, chunk_bytes=1)  # one image per chunk
    np.testing.assert_array_equal(one_chunk.correct, many.correct)
    uneven = search(tri, val.features, val.labels, grid, chunk_bytes=3000)  # 4 images a chunk, 1 in the last
    np.testing.assert_array_equal(one_chunk.correct, uneven.correct)


def test_a_long_run_of_beta_values_counts_what_the_loop_counts():
    """Between exact exps the kernel is carried from β to β by products: 30 β values span several restarts."""
    from apecli.synthetic import synthetic_features

    features = synthetic_features(num_classes=6, dim=16, shots=(3,), val_per_class=10, seed=5, text_noise=1.2)
    _, cache = features.cache(3)
    tri = TriEdge.build(features.classifier, cache.keys, cache.labels, np.arange(0, 16, 2))
    val = features.split("val")
    result = _searches_agree(tri, val.features, val.labels, SearchGrid((12.0, 30.0, 2.0), (30, 8, 3)))
    assert len(np.unique(result.correct)) > 5  # the grid is far from flat, so the counts test something


def test_classes_tied_at_zero_shot_are_decided_by_the_cache():
    """Two classes with the same text but different keys tie exactly at zero shot: the cache decides."""
    rng = np.random.default_rng(11)
    centres = random_unit(rng, 4, 6)
    text = centres.copy()
    text[1] = text[0]  # classes 0 and 1 differ, their names do not
    keys = centres[np.repeat(np.arange(4), 3)] + 0.2 * random_unit(rng, 12, 6)
    labels = np.repeat(np.arange(4), 6)
    x = centres[labels] + 0.2 * random_unit(rng, 24, 6)
    tri = TriEdge.build(text, keys, np.repeat(np.arange(4), 3), np.arange(6))
    result = _searches_agree(tri, x, labels, SearchGrid((7.0, 7.0, 1.0), (10, 6, 3)))
    second = labels == 1
    assert count_correct(tri.zero_shot_logits(x[second]), labels[second]) == 0  # the tie goes to class 0
    chosen = tri.logits(x[second], result.alpha, result.beta, result.gamma)
    assert count_correct(chosen, labels[second]) > 0  # the cache wins images of class 1 back


@pytest.mark.parametrize("scale", [(7.0, -1.0, 1.0), (float("nan"), 7.0, 1.0), (7.0, 7.0, float("inf"))])
def test_negative_or_undefined_search_scales_are_refused(scale):
    with pytest.raises(ApecliError, match="must be finite and not negative"):
        SearchGrid(scale, (200, 20, 20))


def test_the_first_of_equal_settings_wins():
    grid = SearchGrid((7.0, 7.0, 1.0), (2, 3, 2))
    correct = np.zeros((2, 3, 2), dtype=np.int64)
    correct[1, 0, 1] = correct[0, 2, 0] = correct[1, 2, 1] = 9  # three settings share the best
    result = SearchResult(correct, 10, grid)
    assert result.best_index == (0, 2, 0)  # β first, then α, then γ
    assert (result.beta, result.alpha, result.gamma) == (grid.betas[0], grid.alphas[2], grid.gammas[0])
    assert result.ties == 3 and result.accuracy == 90.0


def test_a_flat_grid_chooses_its_first_setting():
    """Classes so far apart that every setting is perfect: the loop order's first setting is chosen."""
    rng = np.random.default_rng(7)
    centres = np.eye(4, 8)
    keys = centres[np.repeat(np.arange(4), 3)] + 0.01 * rng.normal(size=(12, 8))
    x = centres[np.repeat(np.arange(4), 5)] + 0.01 * rng.normal(size=(20, 8))
    tri = TriEdge.build(centres, keys, np.repeat(np.arange(4), 3), np.arange(8))
    result = _searches_agree(tri, x, np.repeat(np.arange(4), 5), SearchGrid((7.0, 7.0, 1.0), (5, 4, 3)))
    assert result.ties == 60 and result.best_index == (0, 0, 0)
    assert (result.alpha, result.beta, result.gamma) == (pytest.approx(0.1), pytest.approx(0.1), 0.0)


def test_argmax_ties_go_to_the_first_class_in_both_searches():
    """Two classes with identical text and keys tie exactly: the lower class index is the prediction."""
    text = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    keys = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    x = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = np.array([0, 1, 2])
    tri = TriEdge.build(text, keys, np.array([0, 1, 2]), np.arange(3))
    result = _searches_agree(tri, x, labels, SearchGrid((7.0, 7.0, 1.0), (3, 3, 2)))
    assert (result.correct == 2).all()  # image 1 (label 1) always loses the tie to class 0
    assert count_correct(np.array([[1.0, 1.0]]), np.array([0])) == 1


@pytest.mark.parametrize("name", ["caltech101", "oxford_flowers"])
def test_fast_search_equals_the_loop_on_real_features(name):
    from apecli.importers import import_tip_adapter

    folder = real_dataset(name)
    features = import_tip_adapter(folder, folder / "proxy_text_weights.pt", name)
    refinement = select_channels(features, k=350)
    _, cache = features.cache(16)
    tri = TriEdge.build(features.classifier, cache.keys, cache.labels, refinement.channels)
    val = features.split("val")
    # Every third validation image and 160 settings of the default ranges (all 20 α): what the loop affords.
    x, labels = val.features[::3], val.labels[::3]
    fast = _searches_agree(tri, x, labels, SearchGrid((7.0, 7.0, 1.0), (4, 20, 2)))
    zero_shot = 100.0 * count_correct(tri.zero_shot_logits(x), labels) / labels.shape[0]
    assert fast.accuracy > zero_shot


def test_evaluation_reports_test_accuracy_at_the_chosen_setting(small_features):
    refinement = select_channels(small_features, k=16)
    grid = SearchGrid((7.0, 7.0, 1.0), (8, 6, 4))
    evaluation = evaluate_training_free(small_features, refinement, grid)
    _, cache = small_features.cache(refinement.shots)
    tri = TriEdge.build(small_features.classifier, cache.keys, cache.labels, refinement.channels)
    test = small_features.split("test")
    logits = tri.logits(test.features, evaluation.alpha, evaluation.beta, evaluation.gamma)
    assert evaluation.test_accuracy == 100.0 * count_correct(logits, test.labels) / test.labels.shape[0]
    loop = search_loop(tri, small_features.split("val").features, small_features.split("val").labels, grid)
    assert (evaluation.alpha, evaluation.beta, evaluation.gamma) == (loop.alpha, loop.beta, loop.gamma)
    assert evaluation.val_accuracy == loop.accuracy


def test_grid_with_no_steps_is_refused():
    with pytest.raises(ApecliError, match="at least 1"):
        SearchGrid((7.0, 7.0, 1.0), (0, 20, 20))


def test_given_values_replace_their_axis_and_the_others_keep_the_authors_values():
    grid = SearchGrid((7.0, 7.0, 1.0), (200, 20, 20))
    given = grid.fixing(alpha=1.5, gamma=0.25)
    assert given.shape == (200, 1, 1) and given.size == 200 and given.given == {"alpha": 1.5, "gamma": 0.25}
    assert given.alphas.tolist() == [1.5] and given.gammas.tolist() == [0.25]
    # The searched axes are the authors' formulas, value for value.
    assert given.betas.tolist() == [float(f"{0.1 + i * (7.0 - 0.1) / 200:.12g}") for i in range(200)]
    assert grid.gammas.tolist() == [i * 1.0 / 20 for i in range(20)] and grid.given == {}
    assert grid.fixing(beta=0.0).betas.tolist() == [0.0]  # β = 0: every key weighs the same


@pytest.mark.parametrize("given, message", [({"alpha": 0.0}, "given α must be finite and positive"),
                                            ({"beta": -1.0}, "given β must be finite and not negative"),
                                            ({"gamma": float("nan")}, "given γ must be finite and not negative"),
                                            ({"alpha": float("inf")}, "given α")])
def test_given_values_outside_their_range_are_refused(given, message):
    with pytest.raises(ApecliError, match=message):
        SearchGrid((7.0, 7.0, 1.0), (3, 3, 3)).fixing(**given)


def test_a_search_with_given_values_counts_what_the_whole_grid_counts_there():
    from apecli.synthetic import synthetic_features

    features = synthetic_features(num_classes=6, dim=16, shots=(3,), val_per_class=12, seed=8, text_noise=1.2)
    _, cache = features.cache(3)
    tri = TriEdge.build(features.classifier, cache.keys, cache.labels, np.arange(0, 16, 2))
    val = features.split("val")
    grid = SearchGrid((7.0, 20.0, 2.0), (12, 8, 4))  # 12 β values: the kernel is carried between exps
    whole = search(tri, val.features, val.labels, grid)
    assert len(np.unique(whole.correct)) > 5
    b, a, g = 7, 3, 2  # a β reached by products in the whole search, computed by an exp when given
    alone = search(tri, val.features, val.labels, grid.fixing(grid.betas[b], grid.alphas[a], grid.gammas[g]))
    assert alone.correct.shape == (1, 1, 1) and alone.correct[0, 0, 0] == whole.correct[b, a, g]
    assert (alone.beta, alone.alpha, alone.gamma) == (grid.betas[b], grid.alphas[a], grid.gammas[g])
    np.testing.assert_array_equal(search(tri, val.features, val.labels, grid.fixing(alpha=grid.alphas[a])).correct,
                                  whole.correct[:, a : a + 1, :])
    loop = search_loop(tri, val.features, val.labels, grid.fixing(gamma=grid.gammas[g]))
    np.testing.assert_array_equal(loop.correct, whole.correct[:, :, g : g + 1])
    model = CacheModel(features.classifier, cache.keys, cache.labels, np.ones(cache.labels.shape[0]))
    plain = model.search(val.features, val.labels, grid)
    np.testing.assert_array_equal(model.search(val.features, val.labels, grid.fixing(beta=grid.betas[b])).correct,
                                  plain.correct[b : b + 1])


def test_the_mean_class_accuracy_weighs_every_class_present_alike():
    from apecli.kinds.evaluation import class_accuracy

    assert class_accuracy(np.array([0, 0, 0, 0]), np.array([0, 0, 0, 1])) == 50.0  # overall 75 %
    assert class_accuracy(np.array([0, 1, 2]), np.array([0, 0, 2])) == 75.0  # class 1 holds no test image
