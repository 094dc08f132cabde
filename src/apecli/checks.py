"""Checks of settings that several steps share, each refusing a bad value in one clear error."""

from __future__ import annotations

import math

from apecli.errors import Setting, SettingError

SEED_LIMIT = 2**32  # seeds run from 0 to SEED_LIMIT − 1: the augmentation seeds derived from them fit torch's


def check_value(what: str, value: float, positive: bool = False) -> float:
    """``value`` when it is finite and positive (``positive``) or not negative; else one clear error."""
    if not ((0 < value if positive else 0 <= value) and value < math.inf):
        raise SettingError(what, value, f"{what} must be finite and {'positive' if positive else 'not negative'}, "
                                        f"got {value}")
    return value


def check_seed(seed: int) -> int:
    """``seed`` when it is a whole number from 0 to 2³² − 1; else one clear error."""
    if not 0 <= seed < SEED_LIMIT:
        raise SettingError("seed", seed, f"a seed must be between 0 and {SEED_LIMIT - 1}, got {seed}")
    return seed


def check_k(k: int, dim: int) -> int:
    """``k`` when it is a channel count of ``dim``-channel features (1 to ``dim``); else one clear error."""
    if not 1 <= k <= dim:
        raise SettingError("k", k, f"k must be between 1 and the feature width {dim}, got {k}")
    return k


def check_at_least(option: str, value: int, least: int = 1) -> int:
    """``value`` of the setting ``option`` when it is at least ``least``; else one clear error naming it."""
    if value < least:
        raise SettingError(option, value, f"{Setting(option)} must be at least {least}, got {value}")
    return value
