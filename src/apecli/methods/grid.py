"""The grid search every searched method shares: a grid of β, α and γ values, and the count of correct
validation predictions of every setting at once (APE, section 3.3, and the Tip-Adapter family).

A setting replaces the best only when strictly better, so the first of equal settings wins (β, then α,
then γ order). The count never forms a one-hot product per setting: for one β, a batched product over
the class blocks of the cache gives the cache logits H for every value-weight column (γ) at once. α
needs no product at all: an image of label t is classified correctly at α exactly when, for every other
class c, ``(R_fW[t] − R_fW[c]) + α (H[t] − H[c]) > 0``, which bounds α from below or above; so one pass
over the classes gives, per image, the interval of α that classifies it correctly, and counting images
per α grid value gives the accuracies of all α at once. The grid's β values are evenly spaced, so the
kernel of one β is the previous one times exp(−Δβ (1 − R_fF′)): an exp is taken at every EXACT_EVERY-th
β only, which keeps each kernel within a few float64 roundings of its exp. All of it runs in float64,
where it picks the same predictions as evaluating every setting one by one
(:func:`apecli.methods.tri_edge.search_loop`, the reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

import numpy as np

from apecli.checks import check_value
from apecli.errors import ApecliError, Setting, SettingError
from apecli.methods.scores import BLOCK_BYTES, device_block_bytes
from apecli.presets import preset_for

if TYPE_CHECKING:
    import torch

Progress = Callable[[int, int], None]  # steps done, steps in all
MAX_SETTINGS = 10**8  # the largest search: its counts alone take 800 MB, and at Caltech101 scale it takes hours
START = 0.1  # where the β and α values of a grid start (γ's start at 0)
EXACT_EVERY = 8  # the search's kernel is an exp at every 8th β, a product by exp(−Δβ(1 − a)) between


@dataclass(frozen=True)
class SearchGrid:
    """The search scales (upper ends) and step counts of β, α and γ, and the values given instead of
    searched (``fixed``, in the same order; None where searched)."""

    scale: tuple[float, float, float]
    steps: tuple[int, int, int]
    fixed: tuple[float | None, float | None, float | None] = (None, None, None)

    def __post_init__(self) -> None:
        if len(self.scale) != 3 or len(self.steps) != 3 or len(self.fixed) != 3:
            raise SettingError("steps", self.steps, "a search grid needs three scales and three step counts (β, α, γ)")
        if min(self.steps) < 1:
            raise SettingError("steps", self.steps, f"search steps must be at least 1, got {tuple(self.steps)}")
        if not all(0 <= scale < float("inf") for scale in self.scale):  # then every β and α is positive: a
            # negative α would flip the cache's vote
            raise SettingError("scale", self.scale, f"search scales must be finite and not negative, got "
                                                    f"{tuple(self.scale)}")
        low = [symbol for symbol, scale, given in zip("βα", self.scale, self.fixed) if given is None and scale < START]
        if low:  # their values run from 0.1 up to the scale: below it, every value would lie above the scale
            raise SettingError("scale", self.scale, f"the search scale of {low[0]} must be at least {START}, where its "
                                                    f"values start, got {tuple(self.scale)}")
        for symbol, value, positive in zip("βαγ", self.fixed, (False, True, False)):  # α = 0 is zero-shot CLIP
            if value is not None:
                check_value(f"a given {symbol}", value, positive)
        if self.size > MAX_SETTINGS:
            raise SettingError("steps", self.steps, f"a search of {self.size:,} settings is more than apecli runs (at "
                                                    f"most {MAX_SETTINGS:,}): fewer {Setting('steps')}")

    def fixing(self, beta: float | None = None, alpha: float | None = None, gamma: float | None = None) -> "SearchGrid":
        """This grid with the given values fixed (each one replaces its axis); None leaves an axis searched."""
        return replace(self, fixed=(beta, alpha, gamma))

    def _values(self, axis: int, start: float) -> np.ndarray:
        if self.fixed[axis] is not None:
            return np.array([float(self.fixed[axis])])
        top, steps = self.scale[axis], self.steps[axis]  # the decimal values the grid's formula defines,
        # not their float sums' rounding noise (6.655, not 6.654999999999999)
        return np.array([float(f"{i * (top - start) / steps + start:.12g}") for i in range(steps)])

    @property
    def betas(self) -> np.ndarray:
        return self._values(0, START)

    @property
    def alphas(self) -> np.ndarray:
        return self._values(1, START)

    @property
    def gammas(self) -> np.ndarray:
        return self._values(2, 0.0)

    @property
    def shape(self) -> tuple[int, int, int]:
        """How many values of β, α and γ the search tries."""
        return tuple(1 if value is not None else steps for value, steps in zip(self.fixed, self.steps))

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def beta_alpha_size(self) -> int:
        """How many (β, α) settings it tries: the search of a cache without γ (the Tip-Adapter family)."""
        return self.shape[0] * self.shape[1]

    @property
    def given(self) -> dict[str, float]:
        """The fixed values by name (alpha, beta, gamma), for the record."""
        return {name: float(value) for name, value in zip(("beta", "alpha", "gamma"), self.fixed) if value is not None}


def dataset_grid(dataset: str | None) -> SearchGrid:
    """The grid the authors configured for a dataset (the generic one for a dataset apecli does not know)."""
    preset = preset_for(dataset)
    return SearchGrid(preset.search_scale, preset.search_step)


@dataclass(frozen=True)
class SearchResult:
    """Correct predictions for every setting of the grid, indexed [β, α, γ], and the chosen setting."""

    correct: np.ndarray
    total: int
    grid: SearchGrid

    def __post_init__(self) -> None:
        if self.total == 0:  # nothing to choose by: every setting would tie at 0 of 0
            raise ApecliError("the validation split is empty; the search chooses its setting on it")

    @property
    def best_index(self) -> tuple[int, int, int]:
        flat = int(np.argmax(self.correct))  # first maximum in β, α, γ order
        return tuple(int(i) for i in np.unravel_index(flat, self.correct.shape))

    @property
    def beta(self) -> float:
        return float(self.grid.betas[self.best_index[0]])

    @property
    def alpha(self) -> float:
        return float(self.grid.alphas[self.best_index[1]])

    @property
    def gamma(self) -> float:
        return float(self.grid.gammas[self.best_index[2]])

    @property
    def accuracy(self) -> float:
        return 100.0 * float(self.correct[self.best_index]) / self.total

    def edges(self) -> list[str]:
        """A note for each searched value chosen at the top of its grid: the best may lie beyond it."""
        notes = []
        for axis, (symbol, values) in enumerate(zip("βαγ", (self.grid.betas, self.grid.alphas, self.grid.gammas))):
            if self.grid.fixed[axis] is None and len(values) > 1 and self.best_index[axis] == len(values) - 1:
                ends = ", ".join(f"{name} {scale:g}" for name, scale, count in zip("βαγ", self.grid.scale, self.grid.shape)
                                 if count > 1)  # the axes it searched (a cache without γ searches β and α)
                notes.append(f"{symbol} = {values[-1]:g} is the largest value its grid tried ({values[0]:g} … "
                             f"{values[-1]:g}): a better one may lie beyond it; {Setting('scale')} widens the grid "
                             f"(the upper ends of β, α and γ; now {ends})")
        return notes

    @property
    def ties(self) -> int:
        """How many settings share the best validation accuracy."""
        return int((self.correct == self.correct.max()).sum())


def product_keys(keys: np.ndarray, device: "torch.device") -> "torch.Tensor":
    """Keys as float64 on ``device``, moved there once for all blocks of images (on the CPU, the same
    memory as ``keys``)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(keys, dtype=np.float64)).to(device)


def count_grid(
    zero_shot: np.ndarray,
    affinity: Callable[[slice], "np.ndarray | torch.Tensor"],
    value_weights: np.ndarray,
    labels: np.ndarray,
    betas: np.ndarray,
    alphas: np.ndarray,
    progress: Progress | None = None,
    chunk_bytes: int | None = None,
    device: "torch.device | None" = None,
) -> np.ndarray:
    """Correct predictions of ``zero_shot + α · exp(−β(1 − affinity)) · values`` for every β, α and
    value-weight column g, as an array [β, α, g].

    ``zero_shot`` is N × C; ``affinity(rows)`` gives the affinities of a slice of the N images,
    rows × C × K (the keys in class blocks), computed a block at a time so that no N × C·K array is held;
    ``value_weights`` is C × K × G, the weight of each key in each of G variants of the cache values
    (γ, for APE). The α values must be positive. It runs on ``device`` (the CPU by default), where
    ``affinity`` may leave its tensors; ``chunk_bytes`` bounds the working memory of a block of images
    (default: BLOCK_BYTES on the CPU, :func:`device_block_bytes` on a GPU).

    Per image of label t and class c, with margin m_c = R_fW[t] − R_fW[c] and slope s_c = H[t] − H[c]
    (H the cache logits), the image is classified correctly at α when m_c + α s_c > 0 for every c.
    In u = 1/α that reads u > −s_c / m_c for the classes with m_c > 0 and u < −s_c / m_c for those
    with m_c < 0: which class bounds u from which side depends on the margin only, not on β or γ, so
    each bound is one multiply-add and one reduction over the classes. Classes that tie the true class
    exactly at zero shot (m_c = 0: two classes with the same text) need s_c > 0, or s_c = 0 and t listed first.
    """
    import torch

    device = torch.device("cpu") if device is None else device
    if chunk_bytes is None:
        chunk_bytes = BLOCK_BYTES if device.type == "cpu" else device_block_bytes(device)
    n, num_classes = zero_shot.shape
    shots, steps_g = value_weights.shape[1:]
    alphas = np.asarray(alphas, dtype=np.float64)
    if alphas.size and not alphas.min() > 0:
        raise ApecliError(f"the α values of a search must be positive, got {alphas.min()}")
    inverse_alphas = torch.from_numpy(1.0 / alphas).to(device)
    target = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
    zero_shot = torch.from_numpy(np.asarray(zero_shot, dtype=np.float64)).to(device)
    margin = zero_shot.gather(1, target[:, None]) - zero_shot  # m_c = R_fW[t] − R_fW[c]
    margin.scatter_(1, target[:, None], 1.0)  # the true class never competes with itself (its slope is 0)
    value_weights = torch.from_numpy(np.ascontiguousarray(np.moveaxis(value_weights, 2, 1), dtype=np.float64))
    value_weights = value_weights.to(device)  # C × G × K
    betas = np.asarray(betas, dtype=np.float64)
    step = float(betas[-1] - betas[0]) / (len(betas) - 1) if len(betas) > 1 else 0.0
    evenly_spaced = len(betas) > 2 and bool(np.allclose(np.diff(betas), step, rtol=1e-9, atol=0))
    correct = torch.zeros((len(betas), len(alphas), steps_g), dtype=torch.int64, device=device)
    rows = max(1, chunk_bytes // (8 * num_classes * 3 * (shots + steps_g)))
    chunks = range(0, n, rows)
    total_steps, done = len(chunks) * len(betas), 0
    # Buffers allocated once, for the largest chunk: fresh tensors of this size per chunk cost more in
    # page faults than a few β values of arithmetic.
    per_key = [torch.empty(num_classes * shots * min(rows, n), dtype=torch.float64, device=device) for _ in range(3)]
    per_class = [torch.empty(num_classes * steps_g * min(rows, n), dtype=torch.float64, device=device) for _ in range(3)]
    for start in chunks:
        block = slice(start, start + rows)
        computed = torch.as_tensor(affinity(block), dtype=torch.float64, device=device)
        size = computed.shape[0]
        # Classes first, images last: C × K × n, so the cache logits are C products of G × K by K × n.
        affinity_block, kernel, step_ratio = (flat[: num_classes * shots * size].view(num_classes, shots, size)
                                              for flat in per_key)
        by_class, slope, bounds = (flat[: num_classes * steps_g * size].view(num_classes, steps_g, size)
                                   for flat in per_class)
        affinity_block.copy_(computed.permute(1, 2, 0))
        margin_block = margin[block].T.contiguous().view(num_classes, 1, size)
        scale = torch.where(margin_block != 0, -1.0 / margin_block, 0.0)  # −1 / m_c
        from_below = torch.where(margin_block > 0, 0.0, -torch.inf)  # added: keeps only the bounds from below
        from_above = torch.where(margin_block < 0, 0.0, torch.inf)
        target_block = target[block]
        tied_class, _, tied_image = (margin_block == 0).nonzero(as_tuple=True)
        tied_first = tied_class < target_block[tied_image]  # the tied class is listed first, so it wins the tie
        own_index = target_block.view(1, 1, size).expand(1, steps_g, size)
        if evenly_spaced:
            torch.sub(affinity_block, 1.0, out=step_ratio).mul_(step).exp_()
        for b, beta in enumerate(betas):
            if evenly_spaced and b % EXACT_EVERY:
                kernel.mul_(step_ratio)  # exp(−β(1 − a)) from the previous β's: a product, not an exp
            else:
                torch.mul(affinity_block, beta, out=kernel).sub_(beta).exp_()  # exp(−(β − β·R_fF′))
            torch.bmm(value_weights, kernel, out=by_class)  # cache logits H, C × G × n
            torch.sub(by_class.gather(0, own_index), by_class, out=slope)  # s_c = H[t] − H[c]
            lower = torch.addcmul(from_below, slope, scale, out=bounds).amax(dim=0)  # G × n, in u = 1/α
            upper = torch.addcmul(from_above, slope, scale, out=bounds).amin(dim=0)
            hits = (lower[..., None] < inverse_alphas) & (inverse_alphas < upper[..., None])
            if tied_class.numel():
                tied_slope = slope[tied_class, :, tied_image]  # ties × G
                loses = (tied_slope < 0) | ((tied_slope == 0) & tied_first[:, None])
                never = torch.zeros((steps_g, size), dtype=torch.int64, device=device).index_add_(1, tied_image, loses.T.long())
                hits &= (never == 0)[..., None]
            correct[b] += hits.sum(dim=1).T
            done += 1
            if progress is not None:
                progress(done, total_steps)
    return correct.cpu().numpy()


