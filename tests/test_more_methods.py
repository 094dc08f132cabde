"""TIMO, TIMO-S, LP++, CLAP, the nearest class mean and auto: each against an independent computation of
its authors' method, the prompt embeddings they read, and auto's choice on validation alone."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_importers import write_tip_adapter
from typer.testing import CliRunner

from apecli.cli import app
from apecli.errors import ApecliError
from apecli.evaluate import evaluate_artifact, evaluate_method, save_evaluation
from apecli.importers import import_npz, import_tip_adapter
from apecli.kinds.features import load_features, save_features
from apecli.methods import Options, registry
from apecli.methods.auto import Auto
from apecli.methods.clap import CLAP
from apecli.methods.class_mean import ClassMean
from apecli.methods.gda import GDA, GDA_ALPHAS, ScatterSums, gda_head
from apecli.methods.lp_plus_plus import LPPlusPlus
from apecli.methods.timo import TIMO, TIMOS, PromptMatch, blend_counts, text_sample_counts
from apecli.predict import load_classifier
from apecli.synthetic import synthetic_features

from conftest import assert_one_line_error, no_partial_files, real_dataset, write_npz

runner = CliRunner()
NEW = ("timo", "timo-s", "lp++", "clap", "class-mean")


def with_prompts(features, prompts: int = 5, seed: int = 4):
    """``features`` with ``prompts`` embeddings a class: its text plus noise that grows from prompt to prompt."""
    rng = np.random.default_rng(seed)
    text = features.classifier.astype(np.float64)
    table = text[:, None, :] + (0.15 * 1.6 ** np.arange(prompts))[None, :, None] * rng.normal(
        size=(features.num_classes, prompts, features.dim))
    table /= np.linalg.norm(table, axis=-1, keepdims=True)
    return replace(features, prompts=table.reshape(-1, features.dim).astype(np.float32),
                   prompt_labels=np.repeat(np.arange(features.num_classes), prompts))


@pytest.fixture(scope="module")
def features():
    plain = synthetic_features(num_classes=6, dim=32, shots=(4,), val_per_class=12, test_per_class=12, seed=11,
                               text_noise=1.5, view_noise=1.0, views=4)
    return with_prompts(plain)


# ---- an independent computation of the authors' TIMO, written as their code reads (torch, loops) ----

def reference_timo(features, searched: bool):
    """The authors' TIMO / TIMO-S on ``features``: (γ, text samples, α, test predictions)."""
    _, cache = features.cache(4)
    d = torch.float64
    text_all = torch.tensor(features.prompts, dtype=d).reshape(features.num_classes, -1, features.dim)
    keys = torch.tensor(cache.keys, dtype=d)
    labels = torch.tensor(cache.labels)
    image = torch.stack([keys[labels == c].mean(0) for c in range(features.num_classes)])
    image = image / image.norm(dim=-1, keepdim=True)
    val, val_y = torch.tensor(features.split("val").features, dtype=d), torch.tensor(features.split("val").labels)
    test = torch.tensor(features.split("test").features, dtype=d)

    def guided(gamma):
        weights, matching = [], []
        for c in range(features.num_classes):
            w = image[c] @ text_all[c].T
            matching.append(w.clone())
            weights.append(torch.softmax(w / w.norm() * gamma, dim=0))
        text = torch.stack([(w[:, None] * text_all[c]).sum(0) for c, w in enumerate(weights)])
        return text / text.norm(dim=-1, keepdim=True), torch.stack(matching)

    gamma = 50.0
    if searched:
        best = 0
        for g in range(5, 101, 5):
            acc = ((val @ guided(g)[0].T).argmax(-1) == val_y).sum()
            if acc > best:
                best, gamma = acc, g
    text, matching = guided(gamma)
    prompts = text_all.shape[1]
    top, order = torch.topk(matching, k=prompts, dim=-1)
    sorted_text = torch.stack([text_all[c][order[c]] for c in range(features.num_classes)])
    counts = [int(t) for t in torch.linspace(1, prompts * 2, 10)] if searched else [prompts]
    views = torch.tensor(features.views(4), dtype=d).reshape(-1, features.dim)
    view_labels = labels.repeat(features.views(4).shape[0])
    best_acc, chosen = 0, None
    for count in counts:
        samples = (sorted_text.repeat(1, 2, 1)[:, :count] * top.repeat(1, 2)[:, :count, None]).reshape(-1, features.dim)
        sample_labels = torch.arange(features.num_classes).repeat_interleave(count)
        x, y = torch.cat([samples, views]), torch.cat([sample_labels, view_labels])
        mus = torch.stack([x[y == c].mean(0) for c in range(features.num_classes)])
        centred = torch.cat([x[y == c] - mus[c] for c in range(features.num_classes)])
        cov = centred.T.cov()
        inverse = features.dim * torch.linalg.pinv((centred.shape[0] - 1) * cov + cov.trace() * torch.eye(features.dim, dtype=d))
        weights = mus @ inverse
        bias = np.log(1.0 / features.num_classes) - 0.5 * torch.einsum("cd,cd->c", weights, mus)
        for alpha in [10.0**i for i in range(-4, 5)]:
            acc = ((alpha * val @ text.T + val @ weights.T + bias).argmax(-1) == val_y).sum()
            if acc > best_acc:
                best_acc, chosen = acc, (gamma, count, alpha, weights, bias)
    gamma, count, alpha, weights, bias = chosen
    return gamma, count, alpha, (alpha * test @ text.T + test @ weights.T + bias).argmax(-1).numpy()


@pytest.mark.parametrize("method", [TIMO, TIMOS])
def test_timo_equals_the_authors_computation(features, method):
    evaluation = evaluate_method(features, method())
    gamma, count, alpha, predictions = reference_timo(features, method is TIMOS)
    assert (evaluation.hyperparameters["gamma"], evaluation.hyperparameters["text_samples"]) == (gamma, count)
    assert evaluation.hyperparameters["alpha"] == pytest.approx(alpha)
    np.testing.assert_array_equal(evaluation.test_predictions, predictions)


def test_timo_s_tries_the_authors_counts_of_text_samples():
    assert text_sample_counts(8) == [1, 2, 4, 6, 7, 9, 11, 12, 14, 16]
    assert text_sample_counts(1) == [1, 2]


def test_image_guided_text_weighs_the_prompts_that_match_the_images(features):
    match = PromptMatch(features.task(4))
    np.testing.assert_allclose(np.linalg.norm(match.text(50.0), axis=1), 1.0)
    uniform = match.text(0.0)  # γ = 0: every prompt alike, the normalised mean
    mean = features.prompts.reshape(features.num_classes, -1, features.dim).astype(np.float64).mean(axis=1)
    np.testing.assert_allclose(uniform, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-12)
    samples, labels = match.samples(7)  # 5 prompts: the best five, then the best two again
    assert samples.shape == (6 * 7, 32) and list(labels[:7]) == [0] * 7
    np.testing.assert_allclose(samples[5], samples[0])
    assert np.all(np.diff(np.linalg.norm(samples[:5], axis=1)) <= 0)  # scaled by their match, best first


def test_with_one_prompt_and_no_text_samples_timo_is_gda(features):
    """GDA's part of TIMO: the same head, and the same logits up to the scale of the blend (α_gda = 100 / α)."""
    task = replace(features, prompts=None, prompt_labels=None).task(4)
    views = task.views
    head = ScatterSums.of(views.reshape(-1, task.dim), np.tile(task.key_labels, views.shape[0]), task.num_classes).head()
    expected = gda_head(views.reshape(-1, task.dim), np.tile(task.key_labels, views.shape[0]), task.num_classes)
    np.testing.assert_allclose(head[0], expected[0], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(head[1], expected[1], rtol=1e-7, atol=1e-9)
    text = PromptMatch(task).text(50.0)
    np.testing.assert_allclose(text, task.text, atol=1e-6)  # one prompt a class: the classifier itself
    gda = evaluate_method(replace(features, prompts=None, prompt_labels=None), GDA())
    val = features.split("val")
    x = val.features.astype(np.float64)
    shared = [alpha for alpha in GDA_ALPHAS if 1e-4 <= 100 / alpha <= 1e4]  # α values both grids hold
    timo_counts = blend_counts(x, val.labels, x @ text.T, *head, [100 / alpha for alpha in shared])
    gda_counts = [int((np.argmax(100 * x @ task.text.T + alpha * (x @ expected[0].T + expected[1]), axis=1)
                       == val.labels).sum()) for alpha in shared]
    np.testing.assert_array_equal(timo_counts, gda_counts)
    test = features.split("test").features.astype(np.float64)
    alpha = gda.hyperparameters["alpha"]
    timo_logits = (100 / alpha) * test @ text.T + test @ head[0].T + head[1]
    np.testing.assert_array_equal(np.argmax(timo_logits, axis=1), gda.test_predictions)


def test_timo_on_real_features_with_one_prompt_is_gda():
    folder = real_dataset("caltech101")
    real = import_tip_adapter(folder, folder / "proxy_text_weights.pt", "caltech101", shots=[4], normalise=True)
    task = real.task(4)
    head = ScatterSums.of(task.keys, task.key_labels, task.num_classes).head()
    gda = evaluate_method(real, GDA())
    test = real.split("test").features.astype(np.float64)
    text = PromptMatch(task).text(50.0)
    logits = (100 / gda.hyperparameters["alpha"]) * test @ text.T + test @ head[0].T + head[1]
    np.testing.assert_array_equal(np.argmax(logits, axis=1), gda.test_predictions)


def test_a_feature_set_without_prompts_is_said_to_give_one_a_class(features):
    evaluation = evaluate_method(replace(features, prompts=None, prompt_labels=None), TIMO())
    assert any("keeps no prompt embeddings" in note for note in evaluation.notes)
    assert evaluation.extra["prompts_kept"] is False and evaluation.extra["prompts_per_class"] == 1
    assert not any("prompt" in note for note in evaluate_method(features, TIMO()).notes)


# ---- LP++ and CLAP ----

def test_lp_plus_plus_takes_the_authors_step_sizes_and_start(features):
    method = LPPlusPlus()
    evaluation = evaluate_method(features, method)
    _, cache = features.cache(4)
    x, t = cache.keys.astype(np.float64), features.classifier.astype(np.float64)
    assert method.details["lr_weights"] == pytest.approx(4 * 24 / np.linalg.eigvalsh(x.T @ x).max())
    assert method.details["lr_alpha"] == pytest.approx(24 / (4 * ((x @ t.T) ** 2).sum(axis=0).max()))
    own = [(x @ t.T)[cache.labels == c, c].mean() for c in range(6)]
    assert method.details["alpha_start"] == pytest.approx(250 * np.mean(own))
    assert 1 <= evaluation.extra["best_epoch"] <= 300 and evaluation.extra["epochs"] == 300
    assert evaluation.val_accuracy == pytest.approx(100 * np.mean(
        np.argmax(method.logits(features.split("val").features), axis=1) == features.split("val").labels))


def test_clap_holds_each_class_by_zero_shot_clips_confidence_and_never_looks_at_validation(features):
    method = CLAP()
    evaluate_method(features, method)
    views = features.views(4).reshape(-1, 32).astype(np.float64)
    labels = np.tile(features.caches[4].labels, 4)
    logits = 100 * views @ features.classifier.astype(np.float64).T
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    expected = [probabilities[labels == c, c].mean() for c in range(6)]
    assert method.details["penalty_weights"] == pytest.approx([min(expected), max(expected)], rel=1e-4)
    val = features.split("val")
    shuffled = replace(features, splits={**features.splits, "val": replace(val, labels=val.labels[::-1].copy())})
    other = CLAP()
    evaluate_method(shuffled, other)
    np.testing.assert_array_equal(other.prototypes, method.prototypes)
    assert not np.allclose(method.prototypes, features.classifier, atol=1e-3)  # it learned


def test_the_nearest_class_mean_is_the_argmax_of_cosines_to_the_mean_keys(features):
    evaluation = evaluate_method(features, ClassMean())
    _, cache = features.cache(4)
    means = np.stack([cache.keys[cache.labels == c].mean(0) for c in range(6)])
    np.testing.assert_array_equal(evaluation.test_predictions, np.argmax(
        features.split("test").features @ (means / np.linalg.norm(means, axis=1, keepdims=True)).T, axis=1))
    assert evaluation.hyperparameters == {}


@pytest.mark.parametrize("mode", [*NEW, "auto"])
def test_each_new_mode_is_restored_as_it_predicted(features, tmp_path, mode):
    saved = save_features(features, tmp_path / "f.h5")
    evaluation = evaluate_artifact(saved.artifact, mode)
    artifact = save_evaluation(evaluation, [saved.artifact], tmp_path / "e.h5")
    classifier = load_classifier(artifact)
    test = features.split("test").features
    np.testing.assert_array_equal(np.argmax(classifier.scores(test), axis=1), artifact.read("test/predictions"))
    probabilities = classifier.probabilities(test)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)


# ---- auto ----

def test_auto_keeps_the_candidate_of_the_best_validation_accuracy(features):
    candidates = ("gda", "timo", "class-mean", "clap")
    evaluation = evaluate_method(features, Auto(candidates))
    alone = {mode: evaluate_method(features, registry.get(mode).create(Options())) for mode in candidates}
    recorded = {row["mode"]: row["val_accuracy"] for row in evaluation.extra["candidates"]}
    assert recorded == pytest.approx({mode: result.val_accuracy for mode, result in alone.items()})
    best = max(recorded.values())
    assert recorded[evaluation.extra["chosen"]] == best == evaluation.val_accuracy
    np.testing.assert_array_equal(evaluation.test_predictions, alone[evaluation.extra["chosen"]].test_predictions)
    assert all(row["seconds"] >= 0 for row in evaluation.extra["candidates"])


def test_auto_never_looks_at_test(features):
    test = features.split("test")
    scrambled = replace(features, splits={**features.splits, "test": replace(test, labels=np.roll(test.labels, 5))})
    ran = [evaluate_method(f, Auto(("gda", "timo", "class-mean"))) for f in (features, scrambled)]
    assert ran[0].extra["chosen"] == ran[1].extra["chosen"]
    assert [r["val_accuracy"] for r in ran[0].extra["candidates"]] == [r["val_accuracy"] for r in ran[1].extra["candidates"]]
    np.testing.assert_array_equal(ran[0].test_predictions, ran[1].test_predictions)


def test_of_equally_good_candidates_auto_keeps_the_quicker(features, monkeypatch):
    import time

    from apecli.methods import auto

    class Slow(ClassMean):
        name = "slow-mean"

        def fit(self, task):
            time.sleep(0.05)
            return super().fit(task)

    monkeypatch.setattr(auto, "candidate_methods", lambda names=None: [Slow, ClassMean])
    assert evaluate_method(features, Auto()).extra["chosen"] == "class-mean"
    monkeypatch.setattr(auto, "candidate_methods", lambda names=None: [ClassMean, Slow])
    assert evaluate_method(features, Auto()).extra["chosen"] == "class-mean"


def test_auto_takes_every_mode_that_evaluates_features_unless_told():
    from apecli.methods.auto import candidate_methods

    names = [method.name for method in candidate_methods()]
    assert "auto" not in names and "training-required" not in names
    assert set(NEW) | {"zero-shot", "tip-adapter", "training-free", "gda", "proker"} <= set(names)
    with pytest.raises(ApecliError, match="auto cannot choose training-required"):
        candidate_methods(["gda", "training-required"])


def test_auto_on_the_command_line(features, tmp_path):
    store = tmp_path / "store"
    save_features(features, tmp_path / "f.h5")
    result = runner.invoke(app, ["eval", str(tmp_path / "f.h5"), "--mode", "auto", "--candidates", "gda,timo-s,lp++",
                                 "--store", str(store), "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["mode"] == "auto" and summary["chosen"] in ("gda", "timo-s", "lp++")
    assert [row["mode"] for row in summary["candidates"]] == ["gda", "timo-s", "lp++"]
    assert "candidates, chosen on validation" in result.stderr and "chosen" in result.stderr
    listed = runner.invoke(app, ["ls", "--store", str(store)])
    assert f"auto (chose {summary['chosen']})" in listed.stdout
    predicted = runner.invoke(app, ["classes", summary["artifact"], "--store", str(store)])
    assert predicted.exit_code == 0, predicted.stderr
    moved = runner.invoke(app, ["transfer", summary["artifact"], "--to", str(tmp_path / "f.h5"), "--store", str(store),
                                "--json"])
    assert moved.exit_code == 0, moved.stderr
    assert json.loads(moved.stdout)["targets"][0]["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    wrong = runner.invoke(app, ["eval", str(tmp_path / "f.h5"), "--mode", "gda", "--candidates", "gda",
                                "--store", str(store)])
    assert_one_line_error(wrong, "--candidates", "--mode auto")
    unknown = runner.invoke(app, ["eval", str(tmp_path / "f.h5"), "--mode", "auto", "--candidates", "gda,nope",
                                  "--store", str(store)])
    assert_one_line_error(unknown, "unknown mode 'nope'")
    assert unknown.exit_code == 2


def test_bench_runs_the_new_modes(features, tmp_path):
    save_features(features, tmp_path / "f.h5")
    result = runner.invoke(app, ["bench", str(tmp_path / "f.h5"), "--modes", "class-mean,timo,clap,auto",
                                 "--out", str(tmp_path / "bench"), "--store", str(tmp_path / "store")])
    assert result.exit_code == 0, result.stderr
    rows = (tmp_path / "bench" / "results.csv").read_text()
    assert all(mode in rows for mode in ("class-mean", "timo", "clap", "auto"))


# ---- prompt embeddings kept ----

def test_npz_prompt_embeddings_are_imported_stored_and_exported(features, tmp_path):
    path = write_npz(tmp_path / "f.npz", features)
    with np.load(path) as archive:
        assert archive["prompt_embeddings"].shape == (6, 5, 32)
    imported = import_npz(path)
    np.testing.assert_array_equal(imported.prompts, features.prompts)
    np.testing.assert_array_equal(imported.prompt_labels, features.prompt_labels)
    saved = load_features(save_features(imported, tmp_path / "f.h5").artifact)
    np.testing.assert_array_equal(saved.prompts, features.prompts)
    assert list(saved.prompt_counts) == [5] * 6


def test_classes_may_have_different_numbers_of_prompts(features, tmp_path):
    keep = features.prompt_labels != 0
    keep[0] = True  # class 0 keeps one prompt, the others five
    ragged = replace(features, prompts=features.prompts[keep], prompt_labels=features.prompt_labels[keep])
    path = write_npz(tmp_path / "f.npz", ragged)
    imported = import_npz(path)
    assert list(imported.prompt_counts) == [1, 5, 5, 5, 5, 5]
    evaluation = evaluate_method(imported, TIMOS())
    assert evaluation.extra["prompts_per_class"] == [1, 5]


def test_a_tip_adapter_folder_takes_its_prompt_embeddings_from_a_file(features, tmp_path):
    folder = write_tip_adapter(tmp_path / "cache", features)
    table = torch.from_numpy(features.prompts.reshape(6, 5, 32))
    torch.save(table, folder / "prompts.pt")
    result = runner.invoke(app, ["import", "tip-adapter", str(folder), "--text-weights", str(folder / "text.pt"),
                                 "--prompt-embeddings", str(folder / "prompts.pt"), "--normalise",
                                 "--store", str(tmp_path / "store"), "--json"])
    assert result.exit_code == 0, result.stderr
    stored = load_features(json.loads(result.stdout)["artifact"])
    np.testing.assert_allclose(stored.prompts, features.prompts, atol=1e-6)
    torch.save(table[:5], folder / "short.pt")
    bad = runner.invoke(app, ["import", "tip-adapter", str(folder), "--text-weights", str(folder / "text.pt"),
                              "--prompt-embeddings", str(folder / "short.pt"), "--store", str(tmp_path / "bad")])
    assert_one_line_error(bad, "short.pt", "prompt embeddings of shape (5, 5, 32)", "C=6")
    assert not (tmp_path / "bad").exists() or no_partial_files(tmp_path / "bad")


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(prompt_embeddings=a["prompt_embeddings"][:, :, :7]), "D=32"),
    (lambda a: a.update(prompt_embeddings=np.zeros((6, 2, 32), np.float32)), "row(s) of zeros"),
    (lambda a: a.update(prompt_embeddings=a["prompt_embeddings"].astype(np.int64)), "expected floating-point"),
    (lambda a: a.update(prompt_embeddings=a["prompt_embeddings"].reshape(30, 32), prompt_labels=np.zeros(29, int)),
     "29 labels"),
])
def test_bad_prompt_embeddings_are_one_line(features, tmp_path, change, message):
    path = write_npz(tmp_path / "f.npz", features)
    with np.load(path) as archive:
        arrays = dict(archive)
    change(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    result = runner.invoke(app, ["import", "npz", str(tmp_path / "bad.npz"), "--store", str(tmp_path / "store")])
    assert_one_line_error(result, message)
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").rglob("*.h5"))


def test_extract_keeps_every_prompt_embedding(tiny, caltech, tmp_path):
    from apecli.datasets import read_coop
    from apecli.extract import ExtractSettings, extract

    extracted = extract(read_coop("caltech101", caltech), tiny, tmp_path / "s",
                        ExtractSettings(shots=(2,), views=2, workers=0))
    stored = load_features(extracted.artifact)
    templates = len(stored.provenance["templates"])
    assert stored.prompts.shape == (stored.num_classes * templates, stored.dim)
    assert list(stored.prompt_counts) == [templates] * stored.num_classes
    np.testing.assert_allclose(np.linalg.norm(stored.prompts, axis=1), 1.0, atol=1e-5)
    for c in range(stored.num_classes):
        mean = stored.prompts[stored.prompt_labels == c].mean(axis=0)
        np.testing.assert_allclose(stored.classifier[c], mean / np.linalg.norm(mean), atol=1e-5)


def test_an_auto_evaluation_naming_no_installed_method_is_one_error():
    with pytest.raises(ApecliError, match="auto chose 'nope', which is not a method installed here"):
        Auto.restore({}, {"auto_chosen": np.frombuffer(b"nope", dtype=np.uint8)})
    with pytest.raises(ApecliError, match="auto chose 'a name no mode has'"):
        Auto.restore({}, {"auto_chosen": np.frombuffer(b"x\nfake: line", dtype=np.uint8)})
    with pytest.raises(ApecliError, match="does not name the method it chose"):
        Auto.restore({}, {})
    assert "earlier apecli" in Auto.outdated({"chosen": "proker", "chosen_details": [1, 2]})  # not a map: none of it read
    assert Auto.outdated({"chosen": "gda", "chosen_details": {}}) is None


def test_a_candidate_that_cannot_fit_the_task_is_left_out_and_said(features, monkeypatch):
    from apecli.methods import auto

    class Refusing(ClassMean):
        name = "refusing"

        def fit(self, task):
            raise ApecliError("needs more shots than 4")

    monkeypatch.setattr(auto, "candidate_methods", lambda names=None: [Refusing, ClassMean])
    evaluation = evaluate_method(features, Auto())
    assert evaluation.extra["chosen"] == "class-mean"
    assert [row["mode"] for row in evaluation.extra["candidates"]] == ["class-mean"]
    assert "auto left out refusing: needs more shots than 4" in evaluation.notes
    monkeypatch.setattr(auto, "candidate_methods", lambda names=None: [Refusing])
    with pytest.raises(ApecliError, match="auto has no candidate that fits this task: auto left out refusing"):
        evaluate_method(features, Auto())
