"""The one error type for problems a user can fix (bad input, missing files, wrong settings), and the
checks of settings that several stages share."""

import math

SEED_LIMIT = 2**32  # seeds run from 0 to SEED_LIMIT − 1: the augmentation seeds derived from them fit torch's


class ApecliError(Exception):
    """A user-facing failure; the command line prints its message as one line and exits 1."""


def check_value(what: str, value: float, positive: bool = False) -> float:
    """``value`` when it is finite and positive (``positive``) or not negative; else one clear error."""
    if not ((0 < value if positive else 0 <= value) and value < math.inf):
        raise ApecliError(f"{what} must be finite and {'positive' if positive else 'not negative'}, got {value}")
    return value


def check_seed(seed: int) -> int:
    """``seed`` when it is a whole number from 0 to 2³² − 1; else one clear error."""
    if not 0 <= seed < SEED_LIMIT:
        raise ApecliError(f"a seed must be between 0 and {SEED_LIMIT - 1}, got {seed}")
    return seed
