"""The arithmetic the methods share: zero-shot logits, products in float64, the class sums of cache
logits, softmax, top-1 predictions, and images taken a block at a time.

Products go through torch's BLAS in float64: numpy's BLAS keeps its own threads spinning for a while
after each product, on the cores that the torch operations between products need (a search that took
its affinities from numpy block by block ran 1.5× slower).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    import torch

CLIP_SCALE = 100.0  # CLIP's logit scale: zero-shot logits are 100 · f Wᵀ
BLOCK_BYTES = 128 << 20  # working memory per block of images: image × key arrays never exceed it
DEVICE_BLOCK_BYTES = 1 << 30  # the same on a GPU, where fewer, larger blocks keep it busy


def products(a: np.ndarray, b: np.ndarray, device: "torch.device | str | None" = None) -> np.ndarray:
    """``a @ bᵀ`` in float64, through torch's BLAS (on ``device``, returned to the CPU)."""
    return product_tensor(a, b, device).cpu().numpy()


def product_tensor(a: np.ndarray, b: "np.ndarray | torch.Tensor", device: "torch.device | str | None" = None) -> "torch.Tensor":
    """``a @ bᵀ`` in float64 as a tensor on ``device`` (the CPU by default); ``b`` may be there already."""
    import torch

    a = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(device)
    if not isinstance(b, torch.Tensor):
        b = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float64))
    return a @ b.to(device).T


def zero_shot_logits(x: np.ndarray, text: np.ndarray, device: "torch.device | str | None" = None) -> np.ndarray:
    """CLIP's zero-shot logits ``100 · x Wᵀ`` (``text`` is W transposed: one row per class), in float64: on
    ``device`` through torch's BLAS where one is given (beside the other products of a search or a cache
    model), else as numpy's ``(100 · x) @ Wᵀ``, which needs no torch (zero-shot CLIP, GDA). The two round
    differently in the last bits, so each caller keeps one of them."""
    if device is None:
        return (CLIP_SCALE * np.asarray(x, dtype=np.float64)) @ np.asarray(text, dtype=np.float64).T
    return CLIP_SCALE * products(x, text, device)


def renormalised(x: np.ndarray, channels: np.ndarray) -> np.ndarray:
    """Rows of ``x`` restricted to ``channels`` and L2-normalised again, in float64."""
    part = np.asarray(x, dtype=np.float64)[:, channels]
    return part / np.linalg.norm(part, axis=1, keepdims=True)


def class_sums(per_key: "torch.Tensor", key_labels: "torch.Tensor", num_classes: int) -> "torch.Tensor":
    """``per_key · L`` for the one-hot label matrix L (keys × classes), without forming L: each key's
    column added into its class's. Differentiable, for the methods that train."""
    return per_key.new_zeros((per_key.shape[0], num_classes)).index_add(1, key_labels, per_key)


def cache_logits(affinity: np.ndarray, key_labels: np.ndarray, key_weights: np.ndarray, num_classes: int,
                 beta: float) -> np.ndarray:
    """``exp(−β(1 − affinity)) · (L ⊙ v)``: each key's kernel value, weighted, summed into its class."""
    import torch

    kernel = torch.from_numpy(np.asarray(affinity, dtype=np.float64)).mul(beta).sub_(beta).exp_()
    kernel.mul_(torch.from_numpy(np.asarray(key_weights, dtype=np.float64)))
    return class_sums(kernel, torch.from_numpy(np.asarray(key_labels, dtype=np.int64)), num_classes).numpy()


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


def percent(correct: int, total: int) -> float:
    """``correct`` of ``total`` in percent (NaN of none)."""
    return 100.0 * correct / total if total else float("nan")


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


def device_block_bytes(device: "torch.device") -> int:
    """The working memory of a block of images on a GPU: DEVICE_BLOCK_BYTES, or a quarter of the memory
    free there when that is less (the block's buffers and products take about 1.5 times it)."""
    import torch

    if device.type != "cuda":
        return DEVICE_BLOCK_BYTES
    return max(BLOCK_BYTES // 8, min(DEVICE_BLOCK_BYTES, torch.cuda.mem_get_info(device)[0] // 4))
