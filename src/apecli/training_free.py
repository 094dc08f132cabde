"""Training-free APE: the tri-edge classifier and the search of its hyperparameters (APE, section 3.3).

With ′ meaning "restricted to the refined channels, then L2-normalised again":

    R_fW   = 100 · f Wᵀ                                   zero-shot logits, full width
    R_fF′  = f′ F′ᵀ                                        affinity of an image to each cache key
    d_j    = log2((1 + 1e-6) / (softmax(F′ W′ᵀ)_{j, y_j} + 1e-6))   divergence of key j from its label
    logits = R_fW + α · exp(−β (1 − R_fF′)) · (L ⊙ exp(γ d))   L = one-hot labels of the keys

α, β, γ come from a grid searched on the validation split: β, then α, then γ, and a setting replaces
the best only when strictly better, so the first of equal settings wins.

The search here never forms a one-hot product per setting. For one β, a batched product over the
class blocks of the cache gives the cache logits H for every γ at once. α needs no product at all: an
image of label t is classified correctly at α exactly when, for every other class c,
``(R_fW[t] − R_fW[c]) + α (H[t] − H[c]) > 0``, which bounds α from below or above; so one pass over the
classes gives, per image, the interval of α that classifies it correctly, and counting images per
α grid value gives the accuracies of all α at once. The grid's β values are evenly spaced, so the kernel
of one β is the previous one times exp(−Δβ (1 − R_fF′)): an exp is taken at every EXACT_EVERY-th β only,
which keeps each kernel within a few float64 roundings of its exp. All of it runs in float64, where it
picks the same predictions as evaluating every setting one by one (:func:`search_loop`, the reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

import numpy as np

from apecli.errors import ApecliError, check_value

if TYPE_CHECKING:
    import torch

Progress = Callable[[int, int], None]
DIVERGENCE_EPSILON = 1e-6
BLOCK_BYTES = 128 << 20  # working memory per block of images: image × key arrays never exceed it
DEVICE_BLOCK_BYTES = 1 << 30  # the same on a GPU, where fewer, larger blocks keep it busy
MAX_SETTINGS = 10**8  # the largest search: its counts alone take 800 MB, and at Caltech101 scale it takes hours
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
            raise ApecliError("a search grid needs three scales and three step counts (β, α, γ)")
        if min(self.steps) < 1:
            raise ApecliError(f"search steps must be at least 1, got {tuple(self.steps)}")
        if not all(0 <= scale < float("inf") for scale in self.scale):  # then every β and α is positive: a
            # negative α would flip the cache's vote
            raise ApecliError(f"search scales must be finite and not negative, got {tuple(self.scale)}")
        for symbol, value, positive in zip("βαγ", self.fixed, (False, True, False)):  # α = 0 is zero-shot CLIP
            if value is not None:
                check_value(f"a given {symbol}", value, positive)
        if self.size > MAX_SETTINGS:
            raise ApecliError(f"a search of {self.size:,} settings is more than apecli runs (at most {MAX_SETTINGS:,}): "
                              "fewer --search-step")

    def fixing(self, beta: float | None = None, alpha: float | None = None, gamma: float | None = None) -> "SearchGrid":
        """This grid with the given values fixed (each one replaces its axis); None leaves an axis searched."""
        return replace(self, fixed=(beta, alpha, gamma))

    def _values(self, axis: int, start: float) -> np.ndarray:
        if self.fixed[axis] is not None:
            return np.array([float(self.fixed[axis])])
        top, steps = self.scale[axis], self.steps[axis]
        return np.array([i * (top - start) / steps + start for i in range(steps)])

    @property
    def betas(self) -> np.ndarray:
        return self._values(0, 0.1)

    @property
    def alphas(self) -> np.ndarray:
        return self._values(1, 0.1)

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
    def given(self) -> dict[str, float]:
        """The fixed values by name (alpha, beta, gamma), for the record."""
        return {name: float(value) for name, value in zip(("beta", "alpha", "gamma"), self.fixed) if value is not None}


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

    @property
    def ties(self) -> int:
        """How many settings share the best validation accuracy."""
        return int((self.correct == self.correct.max()).sum())


def products(a: np.ndarray, b: np.ndarray, device: "torch.device | None" = None) -> np.ndarray:
    """``a @ bᵀ`` in float64, through torch's BLAS (on ``device``, returned to the CPU). numpy's BLAS keeps
    its own threads spinning for a while after each product, on the cores that the torch operations
    between products need: a search that took its affinities from numpy block by block ran 1.5× slower."""
    return product_tensor(a, b, device).cpu().numpy()


def product_tensor(a: np.ndarray, b: "np.ndarray | torch.Tensor", device: "torch.device | None" = None) -> "torch.Tensor":
    """``a @ bᵀ`` in float64 as a tensor on ``device`` (the CPU by default); ``b`` may be there already."""
    import torch

    a = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(device)
    if not isinstance(b, torch.Tensor):
        b = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float64))
    return a @ b.to(device).T


def renormalised(x: np.ndarray, channels: np.ndarray) -> np.ndarray:
    """Rows of ``x`` restricted to ``channels`` and L2-normalised again, in float64."""
    part = np.asarray(x, dtype=np.float64)[:, channels]
    return part / np.linalg.norm(part, axis=1, keepdims=True)


@dataclass(frozen=True)
class TriEdge:
    """The cache side of the tri-edge classifier, computed once for a cache and a set of channels.

    Keys are kept sorted by label, so that they form C blocks of K keys.
    """

    classifier: np.ndarray  # C × D, full width
    channels: np.ndarray
    refined_keys: np.ndarray  # (C·K) × k, sorted by label
    key_labels: np.ndarray  # (C·K,), sorted
    divergence: np.ndarray  # (C·K,)

    @classmethod
    def build(cls, classifier: np.ndarray, keys: np.ndarray, key_labels: np.ndarray, channels: np.ndarray) -> "TriEdge":
        order = np.argsort(key_labels, kind="stable")
        labels = np.asarray(key_labels)[order]
        refined_keys = renormalised(np.asarray(keys)[order], channels)
        refined_text = renormalised(classifier, channels)
        key_logits = refined_keys @ refined_text.T
        key_logits -= key_logits.max(axis=1, keepdims=True)
        probabilities = np.exp(key_logits)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        own = probabilities[np.arange(labels.shape[0]), labels]
        divergence = np.log2((1.0 + DIVERGENCE_EPSILON) / (own + DIVERGENCE_EPSILON))
        return cls(np.asarray(classifier, dtype=np.float64), np.asarray(channels), refined_keys, labels, divergence)

    @property
    def num_classes(self) -> int:
        return int(self.classifier.shape[0])

    @property
    def shots(self) -> int:
        return int(self.key_labels.shape[0] // self.num_classes)

    def zero_shot_logits(self, x: np.ndarray) -> np.ndarray:
        return 100.0 * products(x, self.classifier)

    def affinity(self, x: np.ndarray) -> np.ndarray:
        return products(renormalised(x, self.channels), self.refined_keys)

    def logits(self, x: np.ndarray, alpha: float, beta: float, gamma: float) -> np.ndarray:
        """APE's logits for one setting."""
        weights = np.exp(self.divergence * gamma)
        return by_blocks(x, self.key_labels.shape[0], lambda rows: self.zero_shot_logits(rows) + alpha * cache_logits(
            self.affinity(rows), self.key_labels, weights, self.num_classes, beta))


def cache_logits(affinity: np.ndarray, key_labels: np.ndarray, key_weights: np.ndarray, num_classes: int,
                 beta: float) -> np.ndarray:
    """``exp(−β(1 − affinity)) · (L ⊙ v)``: each key's kernel value, weighted, summed into its class."""
    import torch

    kernel = torch.from_numpy(np.asarray(affinity, dtype=np.float64)).mul(beta).sub_(beta).exp_()
    kernel.mul_(torch.from_numpy(np.asarray(key_weights, dtype=np.float64)))
    return class_sums(kernel, torch.from_numpy(np.asarray(key_labels, dtype=np.int64)), num_classes).numpy()


def class_sums(per_key: torch.Tensor, key_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``per_key · L`` for the one-hot label matrix L (keys × classes), without forming L: each key's
    column added into its class's. Differentiable, for the methods that train."""
    return per_key.new_zeros((per_key.shape[0], num_classes)).index_add(1, key_labels, per_key)


def row_blocks(count: int, width: int, block_bytes: int | None = None) -> list[slice]:
    """Consecutive slices of ``count`` rows, each block's rows × ``width`` float64 array within
    ``block_bytes`` (BLOCK_BYTES by default), so that an image × key product never holds all images at once."""
    rows = max(1, (BLOCK_BYTES if block_bytes is None else block_bytes) // (8 * max(width, 1)))
    return [slice(start, start + rows) for start in range(0, max(count, 1), rows)]


def by_blocks(x: np.ndarray, width: int, compute: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``compute`` applied to the :func:`row_blocks` of ``x`` and stacked."""
    blocks = row_blocks(x.shape[0], width)
    if len(blocks) == 1:
        return compute(x)
    return np.concatenate([compute(x[block]) for block in blocks])


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, shifted by each row's maximum."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def predicted(logits: np.ndarray) -> np.ndarray:
    """The top-1 class of each row; of equal logits the first class is the prediction."""
    return np.argmax(logits, axis=1)


def count_correct(logits: np.ndarray, labels: np.ndarray) -> int:
    """Top-1 hits (see :func:`predicted`)."""
    return int((predicted(logits) == labels).sum())


def search(
    tri: TriEdge,
    x: np.ndarray,
    labels: np.ndarray,
    grid: SearchGrid,
    progress: Progress | None = None,
    chunk_bytes: int | None = None,
    device: "torch.device | str | None" = None,
) -> SearchResult:
    """Correct predictions of every (β, α, γ) of the grid on ``x``, computed as the module docstring says,
    on ``device`` (the CPU by default; a CUDA GPU computes the same float64 arithmetic)."""
    device = search_device(device)
    value_weights = np.exp(tri.divergence.reshape(tri.num_classes, tri.shots, 1) * grid.gammas)  # C × K × G
    keys = product_keys(tri.refined_keys, device)

    def affinity(rows: slice):  # tri.affinity, computed where the search runs
        return product_tensor(renormalised(x[rows], tri.channels), keys, device).view(-1, tri.num_classes, tri.shots)

    correct = count_grid(100.0 * products(x, tri.classifier, device), affinity, value_weights, labels, grid.betas,
                         grid.alphas, progress, chunk_bytes, device)
    return SearchResult(correct, x.shape[0], grid)


def search_device(device: "torch.device | str | None") -> "torch.device":
    """The device a search runs on: the CPU unless told, checked (float64 is needed)."""
    from apecli.devices import torch_device

    return torch_device("cpu" if device is None else str(device), float64=True)


def product_keys(keys: np.ndarray, device: "torch.device") -> "torch.Tensor":
    """Keys as float64 on ``device``, moved there once for all blocks of images (on the CPU, the same
    memory as ``keys``)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(keys, dtype=np.float64)).to(device)


def device_block_bytes(device: "torch.device") -> int:
    """The working memory of a block of images on a GPU: DEVICE_BLOCK_BYTES, or a quarter of the memory
    free there when that is less (the block's buffers and products take about 1.5 times it)."""
    import torch

    if device.type != "cuda":
        return DEVICE_BLOCK_BYTES
    return max(BLOCK_BYTES // 8, min(DEVICE_BLOCK_BYTES, torch.cuda.mem_get_info(device)[0] // 4))


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


def search_loop(tri: TriEdge, x: np.ndarray, labels: np.ndarray, grid: SearchGrid) -> SearchResult:
    """The same search the authors' way: full logits for every setting, one by one (the reference)."""
    import torch

    target = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    zero_shot = torch.from_numpy(tri.zero_shot_logits(x))
    affinity = torch.from_numpy(tri.affinity(x))
    one_hot = torch.eye(tri.num_classes, dtype=torch.float64)[torch.from_numpy(tri.key_labels)]
    divergence = torch.from_numpy(tri.divergence)[:, None]
    correct = np.zeros(grid.shape, dtype=np.int64)
    for b, beta in enumerate(grid.betas):
        for a, alpha in enumerate(grid.alphas):
            for g, gamma in enumerate(grid.gammas):
                values = one_hot * torch.exp(divergence * gamma)
                cache_logits = torch.exp(-(beta - beta * affinity)) @ values
                logits = zero_shot + cache_logits * alpha
                correct[b, a, g] = int((logits.argmax(dim=1) == target).sum())
    return SearchResult(correct, x.shape[0], grid)


@dataclass(frozen=True)
class CacheModel:
    """The classifier of the Tip-Adapter family without γ: ``100 · f textᵀ + α · exp(−β(1 − f keysᵀ)) · (L ⊙ v)``.

    Tip-Adapter uses CLIP's text classifier and cache keys with v = 1; Tip-Adapter-F trained keys;
    APE-T the text and keys with its residual added, and its learned v.
    """

    text: np.ndarray  # C × D
    keys: np.ndarray  # M × D
    key_labels: np.ndarray  # (M,)
    value_weights: np.ndarray  # (M,)

    def logits(self, x: np.ndarray, alpha: float, beta: float) -> np.ndarray:
        text, keys = np.asarray(self.text, dtype=np.float64), np.asarray(self.keys, dtype=np.float64)

        def compute(rows: np.ndarray) -> np.ndarray:
            return 100.0 * products(rows, text) + alpha * cache_logits(products(rows, keys), self.key_labels,
                                                                       self.value_weights, text.shape[0], beta)

        return by_blocks(x, keys.shape[0], compute)

    def search(self, x: np.ndarray, labels: np.ndarray, grid: SearchGrid, progress: Progress | None = None,
               device: "torch.device | str | None" = None) -> SearchResult:
        """Correct predictions for every β and α of ``grid`` (its γ is ignored), as SearchResult[β, α, 0],
        on ``device`` (the CPU by default)."""
        device = search_device(device)
        grid = SearchGrid((grid.scale[0], grid.scale[1], 0.0), (grid.steps[0], grid.steps[1], 1), (*grid.fixed[:2], None))
        num_classes = self.text.shape[0]
        order = np.argsort(self.key_labels, kind="stable")
        shots = order.shape[0] // num_classes
        x = np.asarray(x, dtype=np.float64)
        keys = np.asarray(self.keys, dtype=np.float64)[order]
        weights = np.asarray(self.value_weights, dtype=np.float64)[order].reshape(num_classes, shots, 1)
        zero_shot = 100.0 * products(x, self.text, device)
        on_device = product_keys(keys, device)

        def affinity(rows: slice):
            return product_tensor(x[rows], on_device, device).view(-1, num_classes, shots)

        correct = count_grid(zero_shot, affinity, weights, labels, grid.betas, grid.alphas, progress, device=device)
        return SearchResult(correct, x.shape[0], grid)
