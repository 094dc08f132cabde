"""CLAP (Silva-Rodríguez et al., CVPR 2024, "A Closer Look at the Few-Shot Adaptation of Large
Vision-Language Models"; the authors' code: github jusiro/CLAP, trainers/adapters.py).

A linear probe whose class prototypes start at the text classifier and are held near it by a penalty of
its own weight for each class: ``logits = 100 · f · (w_c / ‖w_c‖)``, loss = cross-entropy +
``mean_c λ_c ‖w_c − t_c‖²``, where λ_c is zero-shot CLIP's mean probability of class c on the class's
own training samples (a class the text already knows well is held closer to it). Trained for 300 epochs
by SGD (momentum 0.9, no weight decay, learning rate 0.1 annealed along a cosine after one epoch at
10⁻⁵), as the authors' configuration has it; the last epoch's prototypes are kept. CLAP chooses nothing
on validation: it needs no validation images at all (its reported validation accuracy is measured, not
used).

Where apecli departs from the reference code, and why: the reference trains on 20 augmented passes of
the few-shot images in batches of 256; apecli takes one full-batch step an epoch, on every few-shot image
through one of its stored views drawn afresh each epoch (seeded, as apecli's other trainers draw them;
the keys where no views are stored). A fit is then the same on every run, and one epoch costs one
pass over the shots whatever the number of views (λ is measured on every view, as the reference measures
it on every pass).
"""

from __future__ import annotations

import math

import numpy as np

from apecli.errors import ApecliError
from apecli.methods.base import Method, Task
from apecli.methods.scores import CLIP_SCALE
from apecli.methods.trainer import ReportsEpochs, no_views_note, training_samples

CLAP_EPOCHS = 300
CLAP_LR = 0.1
WARMUP_LR = 1e-5  # the first epoch's
MOMENTUM = 0.9


def learning_rate(epoch: int) -> float:
    """The step size of ``epoch`` (from 0): one epoch at WARMUP_LR, then CLAP_LR along a cosine."""
    if epoch == 0:
        return WARMUP_LR
    return 0.5 * CLAP_LR * (1.0 + math.cos(math.pi * (epoch - 1) / CLAP_EPOCHS))


class CLAP(ReportsEpochs, Method):
    name = "clap"
    label = "CLAP"
    task_state = ()

    def fit(self, task: Task) -> dict[str, float]:
        import torch

        on = torch.device(task.device)
        samples, on_views = training_samples(task)
        views = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)).to(on)  # V × N × D
        y = torch.from_numpy(np.asarray(task.key_labels, dtype=np.int64)).to(on)
        text = torch.from_numpy(np.ascontiguousarray(task.text, dtype=np.float32)).to(on)
        with torch.no_grad():  # λ_c: zero-shot CLIP's mean probability of the right class on class c's samples
            right = torch.softmax(CLIP_SCALE * views @ text.T, dim=2).gather(2, y.expand(len(views), -1)[..., None])
            penalty = torch.zeros(task.num_classes, device=on).index_add_(0, y, right[..., 0].mean(dim=0)) / \
                torch.bincount(y, minlength=task.num_classes)
        prototypes = text.clone().requires_grad_(True)
        velocity = torch.zeros_like(prototypes)
        generator = torch.Generator().manual_seed(task.seed)
        images = torch.arange(y.shape[0], device=on)
        for epoch in range(CLAP_EPOCHS):
            drawn = torch.randint(views.shape[0], (y.shape[0],), generator=generator).to(on)  # a view of each image
            unit = prototypes / prototypes.norm(dim=1, keepdim=True)
            loss = torch.nn.functional.cross_entropy(CLIP_SCALE * views[drawn, images] @ unit.T, y) + torch.mean(
                penalty * (prototypes - text).pow(2).sum(dim=1))
            prototypes.grad = None
            loss.backward()
            with torch.no_grad():
                velocity.mul_(MOMENTUM).add_(prototypes.grad)
                prototypes.sub_(learning_rate(epoch) * velocity)
            if self.progress is not None:
                self.progress(epoch + 1, CLAP_EPOCHS, float(loss.detach()), float("nan"))
        self.prototypes = prototypes.detach().cpu().numpy().astype(np.float64)
        self.details = {"epochs": CLAP_EPOCHS, "device": on.type, "trained_on_views": on_views,
                        "penalty_weights": [float(penalty.min()), float(penalty.max())]}
        self.notes = () if on_views else (no_views_note(self.label, task.shots),)
        return {}

    def logits(self, features: np.ndarray) -> np.ndarray:
        prototypes = self.prototypes / np.linalg.norm(self.prototypes, axis=1, keepdims=True)
        return CLIP_SCALE * np.asarray(features, dtype=np.float64) @ prototypes.T

    def state(self) -> dict[str, np.ndarray]:
        return {"prototypes": self.prototypes}

    @classmethod
    def restore(cls, hyperparameters: dict[str, float], state: dict[str, np.ndarray]) -> "CLAP":
        method = cls()
        method.prototypes = np.asarray(state["prototypes"], dtype=np.float64)
        if method.prototypes.ndim != 2 or not np.all(np.linalg.norm(method.prototypes, axis=1) > 0):
            raise ApecliError(f"CLAP prototypes of shape {method.prototypes.shape}, some of them zero")
        return method
