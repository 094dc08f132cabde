"""The kinds of artifact apecli stores, one module each: its arrays and metadata keys, how it is written
and read (as a typed record), and the upgrade of what older format versions wrote.

==============  ==================================  =========================================
kind            record                              module
==============  ==================================  =========================================
features        FeatureSet, FeaturesHeader          :mod:`apecli.kinds.features`
refinement      Refinement, RefinementHeader        :mod:`apecli.kinds.refinement`
adapter         FitResult, AdapterHeader            :mod:`apecli.kinds.adapter`
evaluation      Evaluation, EvaluationRecord        :mod:`apecli.kinds.evaluation`
transfer        Transfer, TransferRecord            :mod:`apecli.kinds.transfer`
==============  ==================================  =========================================
"""

from __future__ import annotations

from typing import Any

from apecli import store
from apecli.errors import InputError
from apecli.kinds import adapter, evaluation, features, refinement, transfer

HEADERS = {
    features.KIND: features.FeaturesHeader.of,
    refinement.KIND: refinement.RefinementHeader.of,
    adapter.KIND: adapter.AdapterHeader.of,
    evaluation.KIND: evaluation.EvaluationRecord.read,
    transfer.KIND: transfer.TransferRecord.read,
}
KINDS = tuple(HEADERS)


def header(artifact: store.Artifact) -> Any:
    """The typed header of an artifact of any kind (its record, read without its arrays)."""
    if artifact.kind not in HEADERS:
        raise InputError(artifact.path, f"is an artifact of unknown kind '{artifact.kind}' (known: {', '.join(KINDS)})")
    return HEADERS[artifact.kind](artifact)


def describe(artifact: store.Artifact) -> str:
    """One line on what an artifact holds, as ``apecli ls`` shows it."""
    return header(artifact).describe() if artifact.kind in HEADERS else f"of unknown kind '{artifact.kind}'"


def dataset_of(artifact: store.Artifact) -> str | None:
    """The dataset an artifact is about (its model's, for a transfer)."""
    return header(artifact).dataset if artifact.kind in HEADERS else None
