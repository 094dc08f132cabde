"""LP++ (Huang et al., CVPR 2024, "LP++: A Surprisingly Strong Linear Probe for Few-Shot CLIP"; the
authors' code: github FereshteShakeri/FewShot-CLIP-Strong-Baseline, methods/linear_probe_p2.py).

A linear probe on the few-shot features blended with the text classifier by one learned weight a class:
``logits = f Vᵀ + b + α ⊙ (f Wᵀ)``. V starts at each class's sum of features and b at zero; α starts at
250 times the mean over classes of the mean cosine between a class's features and its own text. Training
is full-batch gradient descent for 300 epochs: V and b by SGD with momentum 0.9 at the step size
``4N / λ_max(FᵀF)``, α every 10th epoch by a plain step of ``N / (4 max_c Σ_i (f_i · w_c)²)``, both step
sizes computed from the data as the authors do. The epoch of the best validation accuracy is kept (the
last of equal ones, as the authors keep it).

Where apecli departs from the reference code, and why:
- the reference never zeroes α's gradient, so every 10th epoch α moves by the sum of all the gradients
  since the start, a step that grows with each update; apecli steps along the gradient of that epoch,
  the step size the data-derived rate is meant for;
- the reference's bias starts at ``nn.Linear``'s random values; apecli's at zero, so that a fit is the
  same on every run;
- the reference runs in half precision on a GPU; apecli in float32 on the device named.
LP++ learns from the cache keys, one feature a few-shot image, as the reference does from one pass of
its images.
"""

from __future__ import annotations

import numpy as np

from apecli.errors import ApecliError
from apecli.methods.base import Method, Task
from apecli.methods.scores import percent
from apecli.methods.trainer import ReportsEpochs

LP_EPOCHS = 300
ALPHA_EVERY = 10  # α takes a step every 10th epoch
ALPHA_SCALE = 250.0  # α starts at 250 × the mean own-class cosine
MOMENTUM = 0.9


class LPPlusPlus(ReportsEpochs, Method):
    name = "lp++"
    label = "LP++"
    task_state = ("text",)

    def fit(self, task: Task) -> dict[str, float]:
        import torch

        on = torch.device(task.device)

        def tensor(array: np.ndarray, dtype=torch.float32) -> "torch.Tensor":
            return torch.from_numpy(np.ascontiguousarray(array)).to(on, dtype)

        x, y = tensor(task.keys), tensor(task.key_labels, torch.int64)
        text = tensor(task.text)
        count, num_classes = x.shape[0], task.num_classes
        x64, text64 = np.asarray(task.keys, dtype=np.float64), np.asarray(task.text, dtype=np.float64)
        cosines = x64 @ text64.T  # N × C
        lr_weights = 4.0 * count / float(np.linalg.eigvalsh(x64.T @ x64).max())
        lr_alpha = count / (4.0 * float((cosines**2).sum(axis=0).max()))
        own = np.array([cosines[task.key_labels == c, c].mean() for c in range(num_classes)])
        alpha_start = ALPHA_SCALE * float(own.mean())
        sums = np.zeros((num_classes, task.dim))
        np.add.at(sums, task.key_labels, x64)
        weights = tensor(sums).requires_grad_(True)
        bias = torch.zeros(num_classes, device=on, requires_grad=True)
        alpha = torch.full((num_classes,), alpha_start, device=on, requires_grad=True)
        velocity = [torch.zeros_like(weights), torch.zeros_like(bias)]
        text_logits = x @ text.T
        val_x = tensor(task.val_features)
        val_text, val_y = val_x @ text.T, tensor(task.val_labels, torch.int64)
        best = (-1, 0, None)
        for epoch in range(LP_EPOCHS):
            logits = x @ weights.T + bias + alpha * text_logits
            loss = torch.nn.functional.cross_entropy(logits, y)
            weights.grad = bias.grad = alpha.grad = None
            loss.backward()
            with torch.no_grad():
                for parameter, moving in zip((weights, bias), velocity):
                    moving.mul_(MOMENTUM).add_(parameter.grad)  # torch's SGD with momentum, no dampening
                    parameter.sub_(lr_weights * moving)
                if (epoch + 1) % ALPHA_EVERY == 0:
                    alpha.sub_(lr_alpha * alpha.grad)
                hits = int(((val_x @ weights.T + bias + alpha * val_text).argmax(dim=1) == val_y).sum())
            if hits >= best[0]:  # the last of equal epochs, as the reference keeps it
                best = (hits, epoch + 1, [p.detach().cpu().numpy().astype(np.float64) for p in (weights, bias, alpha)])
            if self.progress is not None:
                self.progress(epoch + 1, LP_EPOCHS, float(loss.detach()), percent(hits, val_y.shape[0]))
        hits, epoch, (self.weights, self.bias, self.alpha) = best
        self.text = text64
        self.val_accuracy = percent(hits, task.val_labels.shape[0])
        self.details = {"best_epoch": epoch, "epochs": LP_EPOCHS, "device": on.type, "lr_weights": lr_weights,
                        "lr_alpha": lr_alpha, "alpha_start": alpha_start}
        return {}

    def logits(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64)
        return x @ self.weights.T + self.bias + self.alpha * (x @ self.text.T)

    def state(self) -> dict[str, np.ndarray]:
        return {"weights": self.weights, "bias": self.bias, "class_alpha": self.alpha}

    @classmethod
    def restore(cls, hyperparameters: dict[str, float], state: dict[str, np.ndarray]) -> "LPPlusPlus":
        method = cls()
        method.text = np.asarray(state["text"], dtype=np.float64)
        method.weights, method.bias, method.alpha = state["weights"], state["bias"], state["class_alpha"]
        classes = len(method.text)
        if method.weights.shape != method.text.shape or method.bias.shape != (classes,) or \
                method.alpha.shape != (classes,):
            raise ApecliError(f"an LP++ probe of shapes {method.weights.shape}, {method.bias.shape} and "
                              f"{method.alpha.shape}, for text of shape {method.text.shape}")
        return method
