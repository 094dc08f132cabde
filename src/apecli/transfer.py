"""Distribution shift: an evaluated model applied, unchanged, to the test split of another feature set.

The CoOp protocol's domain-generalisation test: a model adapted on ImageNet's few shots, tested on
ImageNet-V2, -Sketch, -A and -R; the same question applies to any test set whose classes are among
the model's. The model is
the one its evaluation chose: text classifier, cache, channels and hyperparameters, all from the
source (nothing is searched on the target). A target that holds a subset of the source's classes
(ImageNet-A and -R hold 200 of ImageNet's 1,000) is scored over those classes only: the prediction is
the best of their scores. Classes are matched by name (by position, between equal class counts, where
an import named none). Source and target must come from the same
encoder, which is checked where both record it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from apecli import store
from apecli.errors import ApecliError, Setting
from apecli.kinds.features import EncoderRecord, FeatureSet, load_features
from apecli.kinds.transfer import Transfer, save_transfer
from apecli.methods.scores import row_blocks
from apecli.predict import Classifier, load_classifier

__all__ = ["Transfer", "check_compatible", "save_transfer", "score_on", "transfer"]


def _encoder(record: EncoderRecord) -> tuple[str, str | None] | None:
    """What identifies an encoder's features in a feature set's model record (None if unrecorded)."""
    if not record.recorded:
        return None
    architecture = record.model_config_sha256 or record.model or record.name
    weights = record.checkpoint_sha256 or record.pretrained
    return f"{architecture} with QuickGELU" if record.quick_gelu else architecture, weights


def check_compatible(source: FeatureSet, target: FeatureSet) -> tuple[np.ndarray, list[str]]:
    """The source's class index of each target class, and warnings; one clear error where they cannot meet."""
    if source.artifact and target.artifact and source.artifact.content_id == target.artifact.content_id:
        return np.arange(source.num_classes), []  # the model's own feature set
    if target.dim != source.dim:
        raise ApecliError(f"{target.name}: features of {target.dim} channels, the model's have {source.dim}")
    warnings = []
    mine, theirs = _encoder(source.encoder), _encoder(target.encoder)
    if mine is None or theirs is None:
        unrecorded = source.name if mine is None else target.name
        warnings.append(f"{unrecorded} records no encoder: cannot check that both feature sets share one")
    elif mine[0] != theirs[0] or (None not in (mine[1], theirs[1]) and mine[1] != theirs[1]):
        raise ApecliError(f"{target.name}: extracted with {theirs[0]} ({theirs[1] or 'weights unrecorded'}), the "
                          f"model's features with {mine[0]} ({mine[1] or 'weights unrecorded'})")
    elif None in (mine[1], theirs[1]):  # an import that named its model alone
        unrecorded = source.name if mine[1] is None else target.name
        warnings.append(f"{unrecorded} records no weights for {mine[0]}: cannot check that both feature sets share them")
    elif None not in (source.encoder.precision, target.encoder.precision) and \
            source.encoder.precision != target.encoder.precision:
        warnings.append(f"{target.name}: encoded in {target.encoder.precision}, the model's features in "
                        f"{source.encoder.precision}")
    unnamed = [part.name for part in (source, target) if part.unnamed_classes]
    if unnamed:  # class_0, class_1, …: their names say nothing, their positions may
        if target.num_classes != source.num_classes:
            raise ApecliError(f"{unnamed[0]}: its classes are unnamed (imported without class names), so the "
                              f"{target.num_classes} classes of the target cannot be matched to the model's "
                              f"{source.num_classes}: import it with {Setting('class_names')}", Setting("class_names"))
        warnings.append(f"{unnamed[0]}: its classes are unnamed (imported without class names): matched by position")
        return np.arange(target.num_classes), warnings
    index = {name: i for i, name in enumerate(source.class_names)}
    missing = [name for name in target.class_names if name not in index]
    if missing:
        raise ApecliError(f"{target.name}: {len(missing)} of its {target.num_classes} classes are not the model's "
                          f"(first: '{missing[0]}')")
    return np.array([index[name] for name in target.class_names], dtype=np.int64), warnings


def score_on(classifier: Classifier, target: FeatureSet, say: Callable[[str], None] = lambda message: None) -> Transfer:
    """The classifier's predictions and accuracy on ``target``'s test split."""
    columns, warnings = check_compatible(classifier.features, target)
    for warning in warnings:
        say(f"warning: {warning}")
    test = target.split("test")
    if test.labels.shape[0] == 0:
        raise ApecliError(f"{target.name}: the test split is empty")
    x = test.features.astype(np.float64)
    predictions = np.concatenate([np.argmax(classifier.scores(x[rows])[:, columns], axis=1)  # first of equal scores
                                  for rows in row_blocks(x.shape[0], classifier.features.num_classes)])
    where = str(Path(target.artifact.path).resolve()) if target.artifact else target.name
    return Transfer(target.dataset, where, target.num_classes,
                    int((predictions == test.labels).sum()), int(test.labels.shape[0]), predictions)


def transfer(evaluation: store.Artifact, targets: Sequence[store.Artifact],
             say: Callable[[str], None] = lambda message: None) -> list[Transfer]:
    """Score the model an evaluation chose on every target's test split."""
    if not targets:
        raise ApecliError(f"give at least one target features artifact ({Setting('targets')})", Setting("targets"))
    classifier = load_classifier(evaluation)
    return [score_on(classifier, load_features(target), say) for target in targets]
