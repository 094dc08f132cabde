"""Per-dataset defaults of APE, as the authors configured them for CLIP RN50 (D = 1024).

Channel counts are given for D = 1024; for another feature width they scale with D
(``k · D / 1024``, rounded), which keeps the same fraction of channels.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

REFERENCE_DIM = 1024


@dataclass(frozen=True)
class Preset:
    """The settings one dataset uses by default."""

    name: str
    k_training_free: int
    w_training_free: tuple[float, float]
    k_training: int
    w_training: tuple[float, float]
    search_scale: tuple[float, float, float]
    search_step: tuple[int, int, int]
    init_alpha: float
    lr: float
    eps: float
    epochs: int
    eps_few_shots: float | None = None  # eps at 1 and 2 shots, where it differs
    init_beta: float = 1.0
    init_gamma: float = 0.1

    def scaled_k(self, k: int, dim: int) -> int:
        """A channel count given for D = 1024, scaled to ``dim`` channels."""
        return max(1, min(dim, round(k * dim / REFERENCE_DIM)))

    def eps_for(self, shots: int) -> float:
        return self.eps_few_shots if (self.eps_few_shots is not None and shots <= 2) else self.eps


_W_TRAIN = (0.2, 0.8)
_SCALE = (7.0, 7.0, 1.0)
_STEP = (200, 20, 20)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("caltech101", 800, (0.5, 0.5), 900, _W_TRAIN, _SCALE, _STEP, 1.0, 1e-3, 1e-3, 30),
        Preset("dtd", 400, (0.5, 0.5), 700, _W_TRAIN, _SCALE, _STEP, 3.0, 1e-3, 1e-3, 20),
        Preset("eurosat", 700, (0.9, 0.1), 900, _W_TRAIN, (30.0, 5.0, 1.5), _STEP, 1.0, 1e-3, 1e-3, 200),
        Preset("fgvc", 800, (0.1, 0.9), 900, _W_TRAIN, (20.0, 10.0, 1.0), _STEP, 5.0, 1e-3, 1e-3, 30),
        Preset("food101", 700, (0.3, 0.7), 900, _W_TRAIN, _SCALE, _STEP, 0.8, 1e-4, 1e-3, 30, eps_few_shots=1e-2),
        Preset("imagenet", 500, (0.7, 0.3), 500, _W_TRAIN, (7.0, 7.0, 0.5), (200, 20, 5), 2.0, 1e-4, 1e-3, 20),
        Preset("oxford_flowers", 700, (0.4, 0.6), 800, _W_TRAIN, _SCALE, _STEP, 3.0, 1e-3, 1e-3, 60),
        Preset("oxford_pets", 800, (0.7, 0.3), 800, _W_TRAIN, _SCALE, _STEP, 2.0, 1e-4, 2e-3, 30),
        Preset("stanford_cars", 500, (0.6, 0.4), 800, _W_TRAIN, (10.0, 7.0, 1.0), _STEP, 1.0, 1e-3, 5e-3, 30),
        Preset("sun397", 800, (0.7, 0.3), 800, _W_TRAIN, (10.0, 7.0, 1.0), _STEP, 1.0, 1e-4, 1e-3, 30),
        Preset("ucf101", 700, (0.3, 0.7), 800, _W_TRAIN, (10.0, 7.0, 1.5), _STEP, 2.0, 1e-3, 2e-3, 30),
    ]
}

# Used for a dataset apecli does not know: the most common of the authors' settings.
GENERIC = Preset("generic", 700, (0.5, 0.5), 800, _W_TRAIN, _SCALE, _STEP, 1.0, 1e-3, 1e-3, 30)

ALIASES = {
    "caltech-101": "caltech101",
    "describabletextures": "dtd",
    "fgvc_aircraft": "fgvc",
    "fgvcaircraft": "fgvc",
    "food-101": "food101",
    "flowers102": "oxford_flowers",
    "oxfordflowers": "oxford_flowers",
    "oxfordpets": "oxford_pets",
    "stanfordcars": "stanford_cars",
    "sun": "sun397",
    "imagenet-v2": "imagenetv2",
    "imagenet_v2": "imagenetv2",
    "imagenet-sketch": "imagenet_sketch",
    "imagenet-a": "imagenet_a",
    "imagenet-r": "imagenet_r",
}


def canonical_name(dataset: str | None) -> str | None:
    """The canonical spelling of a dataset name (``flowers102`` → ``oxford_flowers``); others unchanged."""
    if dataset is None:
        return None
    key = dataset.strip().lower()
    return ALIASES.get(key, key)


def preset_for(dataset: str | None) -> Preset:
    """The defaults of a known dataset, else the generic ones."""
    return PRESETS.get(canonical_name(dataset) or "", GENERIC)


# Test sets only (ImageNet's shifted variants): known, and nothing to set for them.
TEST_ONLY = ("imagenet_a", "imagenet_r", "imagenet_sketch", "imagenetv2")


def known_datasets() -> tuple[str, ...]:
    """The dataset names apecli knows, sorted: those with settings of their own, then the test-only sets."""
    return (*sorted(PRESETS), *TEST_ONLY)


def nearest_dataset(dataset: str) -> str | None:
    """The known dataset a name most likely meant (``pets`` → ``oxford_pets``), or None where none is close."""
    key = dataset.strip().lower().replace("-", "_").replace(" ", "_")
    spellings = {name: name for name in known_datasets()} | ALIASES
    within = sorted({canonical for spelling, canonical in spellings.items() if key and key in spelling})
    if len(within) == 1:  # a part of one name: pets, flowers, aircraft
        return within[0]
    close = difflib.get_close_matches(key, list(spellings), n=1, cutoff=0.7)
    return spellings[close[0]] if close else None


def unknown_dataset(dataset: str | None) -> str | None:
    """What to tell a user who names a dataset apecli does not know (None for a known one, or none
    named): it runs with the generic settings, the nearest known name, and the known ones."""
    canonical = canonical_name(dataset)
    if canonical is None or canonical in PRESETS or canonical in TEST_ONLY:
        return None
    nearest = nearest_dataset(canonical)
    return (f"'{dataset}' is not a dataset apecli knows, so its settings are the generic ones"
            + (f"; did you mean {nearest}?" if nearest else "") + f" (known: {', '.join(known_datasets())})")
