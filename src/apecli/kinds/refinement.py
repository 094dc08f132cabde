"""The ``refinement`` kind: the channels APE's prior refinement chose for a feature set's cache, with the
criterion that chose them (docs/cache-format.md, ``refinement``). Its parent is the feature set."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from apecli import store
from apecli.errors import ApecliError, InputError
from apecli.kinds.features import FeatureSet, load_features
from apecli.kinds.fields import LIST, NUMBER, TEXT, WHOLE, checked, each
from apecli.methods.ape import checked_channels

KIND = "refinement"


@dataclass(frozen=True)
class Refinement:
    """The channels chosen for one feature set and shot count, with the criterion that chose them."""

    channels: np.ndarray  # (k,) indices in criterion order, best first
    criterion: np.ndarray  # (D,) float64
    shots: int
    weights: tuple[float, float]
    artifact: store.Artifact | None = None

    @property
    def k(self) -> int:
        return int(self.channels.shape[0])

    @property
    def sorted_channels(self) -> list[int]:
        return sorted(int(c) for c in self.channels)


@dataclass(frozen=True)
class RefinementHeader:
    """A refinement artifact's header, read without its arrays."""

    dataset: str | None
    k: int
    shots: int
    weights: tuple[float, float]

    @classmethod
    def of(cls, artifact: store.Artifact) -> "RefinementHeader":
        """The header of a refinement artifact, each field checked against the format."""
        meta = artifact.metadata
        weights = each(artifact, checked(artifact, meta, "weights", LIST), "weights", NUMBER)
        if len(weights) != 2:
            raise InputError(artifact.path, f"its header is damaged (metadata 'weights' holds {len(weights)} "
                                            "numbers, where the format says two)")
        return cls(checked(artifact, meta, "dataset", TEXT, None, optional=True), checked(artifact, meta, "k", WHOLE),
                   checked(artifact, meta, "shots", WHOLE), tuple(weights))

    def describe(self) -> str:
        return f"k={self.k} of the {self.shots}-shot cache, w={list(self.weights)}"


def save_refinement(refinement: Refinement, features: FeatureSet,
                    destination: Path | Callable[[str], Path]) -> Refinement:
    """Write a refinement artifact whose parent is the feature set."""
    if features.artifact is None:
        raise ApecliError("save the feature set before its refinement")
    metadata = {"dataset": features.dataset, "k": refinement.k, "shots": refinement.shots,
                "weights": list(refinement.weights)}
    arrays = {"channels": refinement.channels, "criterion": refinement.criterion}
    artifact = store.write_artifact(destination, KIND, arrays, metadata, parents=[features.artifact])
    return replace(refinement, artifact=artifact)


def read_channels(artifact: store.Artifact, dim: int) -> np.ndarray:
    """An artifact's ``channels``, checked to be indices of ``dim``-channel features (one or more)."""
    try:
        return checked_channels(artifact.read("channels"), dim)
    except ApecliError as error:
        raise error.within(f"{artifact.path}: ") from None


def load_refinement(source: str | Path | store.Artifact) -> tuple[Refinement, FeatureSet]:
    """Read a refinement artifact and the feature set it was computed from (checked unchanged)."""
    artifact = store.opened(source, KIND)
    features = load_features(artifact.parent("features"))
    header = RefinementHeader.of(artifact)
    refinement = Refinement(read_channels(artifact, features.dim), artifact.read("criterion"), header.shots,
                            header.weights, artifact)
    return refinement, features
