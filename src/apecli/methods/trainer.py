"""The training loop of the methods that learn from the cache (APE-T, Tip-Adapter-F).

A training sample is one of the stored augmented views of a few-shot image, drawn afresh for every
image in every epoch (seeded), which stands in for re-encoding a freshly augmented image each epoch;
a store without views trains on the keys. Cross-entropy, shuffled batches, AdamW, cosine annealing
over all steps; after each epoch the validation accuracy is measured, and the parameters of the
first best epoch are kept.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from apecli.checks import check_seed, check_value
from apecli.errors import ApecliError, Setting, SettingError

if TYPE_CHECKING:
    import torch

    from apecli.methods.base import Task

EpochProgress = Callable[[int, int, float, float], None]  # epoch, epochs, mean loss, val accuracy
VAL_BLOCK = 2048  # validation images scored at once


@dataclass(frozen=True)
class TrainingRun:
    """The kept parameters and the history of one training run."""

    parameters: list[np.ndarray]  # those of the best epoch
    best_epoch: int  # counted from 1
    best_val_accuracy: float
    loss: np.ndarray  # mean training loss per epoch
    val_accuracy: np.ndarray  # percent, per epoch


class CosineAdamW:
    """AdamW (Loshchilov and Hutter, ICLR 2019) whose learning rate is annealed along a cosine to 0 over
    ``total_steps`` steps: the arithmetic of ``torch.optim.AdamW`` (its single-tensor path) followed by
    ``CosineAnnealingLR``, operation for operation, so on CPU tensors the parameters come out bit for
    bit the same; on a GPU the moments live there too.

    Written out because creating torch's optimiser imports ``torch._dynamo``, about a second of every
    fresh ``apecli fit``; the arithmetic itself is a few tensor operations per parameter.
    """

    def __init__(self, parameters: list, lr: float, eps: float, weight_decay: float, total_steps: int,
                 betas: tuple[float, float] = (0.9, 0.999)) -> None:
        import torch

        self.parameters = list(parameters)
        self.lr, self.eps, self.weight_decay, self.betas = float(lr), float(eps), float(weight_decay), betas
        self.total_steps = total_steps
        self.steps = 0  # the schedule's
        self.counts = [0] * len(self.parameters)  # each parameter's own updates, as torch counts them
        self.averages = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.parameters]
        self.squares = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.parameters]

    def zero_grad(self) -> None:
        for parameter in self.parameters:
            parameter.grad = None

    def step(self) -> None:
        """One AdamW update with the current learning rate, then the next rate of the cosine schedule."""
        import torch

        beta1, beta2 = self.betas
        self.steps += 1
        with torch.no_grad():
            for index, (parameter, average, square) in enumerate(zip(self.parameters, self.averages, self.squares)):
                if parameter.grad is None:  # not updated, and its bias correction does not advance
                    continue
                self.counts[index] += 1
                step = float(self.counts[index])
                grad = parameter.grad
                if self.weight_decay != 0:
                    parameter.mul_(1 - self.lr * self.weight_decay)  # decoupled weight decay
                average.lerp_(grad, 1 - beta1)
                square.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = self.lr / (1 - beta1**step)
                denominator = (square.sqrt() / (1 - beta2**step) ** 0.5).add_(self.eps)
                parameter.addcdiv_(average, denominator, value=-step_size)
        # lr_t = lr_0 (1 + cos(π t / T)) / 2, carried from step to step as torch's scheduler carries it
        t, total = self.steps, self.total_steps
        self.lr = (1 + math.cos(math.pi * t / total)) / (1 + math.cos(math.pi * (t - 1) / total)) * self.lr


def check_training(*, epochs: int, batch_size: int, lr: float, eps: float, weight_decay: float, alpha: float,
                   beta: float, seed: int) -> None:
    """One clear error for a training setting out of range (APE-T's and Tip-Adapter-F's alike)."""
    for name, value in (("epochs", epochs), ("batch size", batch_size)):
        if value < 1:
            raise SettingError(name.replace(" ", "_"), value, f"{name} must be at least 1, got {value}")
    check_value("lr", lr, positive=True)
    check_value("eps", eps, positive=True)
    check_value("weight decay", weight_decay)
    check_value("α during training", alpha, positive=True)
    check_value("β during training", beta)
    check_seed(seed)


class ReportsEpochs:
    """Mixed into a method that trains epoch by epoch: it reports each epoch to the evaluation's
    ``epoch_progress`` (epoch, epochs, mean loss, validation accuracy or NaN)."""

    def __init__(self, progress: EpochProgress | None = None) -> None:
        self.progress = progress

    @classmethod
    def create(cls, options):
        return cls(options.epoch_progress)


def no_views_note(label: str, shots: int) -> str:
    """What a method that trains on augmented views says when the cache has none."""
    return (f"no augmented views stored for {shots} shot{'s' * (shots != 1)}: {label} learned from the cache keys "
            f"themselves (extract's {Setting('views')} stores augmented views of each training image)")


def last_epoch_note(best_epoch: int, epochs: int) -> str | None:
    """A note where training's best validation accuracy came at its last epoch (still rising), else None."""
    if epochs <= 1 or best_epoch != epochs:
        return None
    return (f"the best validation accuracy came at the last epoch ({epochs} of {epochs}): it was still rising, and "
            f"more {Setting('epochs')} may do better")


def training_samples(task: "Task") -> tuple[np.ndarray, bool]:
    """The V × N × D training views of a task's cache (its keys as one view when none are stored), and
    whether they are views."""
    views = task.views
    return (views, True) if views is not None else (np.asarray(task.keys, dtype=np.float32)[None], False)


def train(
    parameters: list,
    logits: Callable,
    samples: np.ndarray,
    labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    *,
    epochs: int,
    lr: float,
    eps: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
    progress: EpochProgress | None = None,
    val_logits: Callable | None = None,
    device: "torch.device | None" = None,
) -> TrainingRun:
    """Train ``parameters`` (torch tensors) of ``logits(x)`` as the module docstring says.

    ``val_logits(rows)``, if given, scores a slice of the validation images instead of
    ``logits(val_features[rows])``: a model can keep there what no epoch changes. On ``device`` (where
    the parameters and the tensors ``logits`` uses must be already), samples and labels are moved there;
    the views and the order are drawn on the CPU, so they are the same on every device."""
    import torch

    if val_labels.shape[0] == 0:
        raise ApecliError("the validation split is empty; training chooses its epoch on it")
    generator = torch.Generator().manual_seed(seed)
    samples_t = torch.from_numpy(samples).to(device)
    labels_t = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
    score = val_logits
    if score is None:  # else the model scores its own copy of the images, already on the device
        val_x = torch.from_numpy(np.asarray(val_features, dtype=np.float32)).to(device)

        def score(rows: slice):
            return logits(val_x[rows])

    val_y = torch.from_numpy(np.asarray(val_labels, dtype=np.int64)).to(device)
    count = labels_t.shape[0]
    optimiser = CosineAdamW(parameters, lr, eps, weight_decay, epochs * math.ceil(count / batch_size))
    best = (-1, -1.0, [p.detach().clone() for p in parameters])
    losses, accuracies = [], []
    for epoch in range(epochs):
        view = torch.randint(samples_t.shape[0], (count,), generator=generator).to(device)
        order = torch.randperm(count, generator=generator).to(device)
        total = 0.0
        for start in range(0, count, batch_size):
            batch = order[start : start + batch_size]
            loss = torch.nn.functional.cross_entropy(logits(samples_t[view[batch], batch]), labels_t[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * batch.shape[0]
        with torch.no_grad():  # in blocks of images: the image × key products of a large split stay small
            blocks = [slice(start, start + VAL_BLOCK) for start in range(0, val_y.shape[0], VAL_BLOCK)]
            hits = sum(int((score(block).argmax(dim=1) == val_y[block]).sum()) for block in blocks)
            accuracy = 100.0 * hits / val_y.shape[0]
        losses.append(total / count)
        accuracies.append(accuracy)
        if accuracy > best[1]:
            best = (epoch, accuracy, [p.detach().clone() for p in parameters])
        if progress is not None:
            progress(epoch + 1, epochs, losses[-1], accuracy)
    return TrainingRun([p.cpu().numpy() for p in best[2]], best[0] + 1, best[1], np.array(losses), np.array(accuracies))


@contextlib.contextmanager
def reproducible(device: "torch.device") -> Iterator[None]:
    """Deterministic kernels while training on a GPU, so that a fit run twice gives the same parameters:
    CUDA's defaults sum ``index_add`` (the cache logits) and ``index_select``'s gradient with atomics, in
    no fixed order. Nothing changes on the CPU, whose kernels are deterministic already."""
    import torch

    if device.type != "cuda":
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what cuBLAS needs to be deterministic
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)
