"""The CLIP encoder: the only module that imports open_clip.

A model is an open_clip model name (``RN50``, ``ViT-B-16``, …) or the path of an open_clip model-config
JSON; its weights are an open_clip pretrained tag, the path of a local checkpoint, or ``none`` (random
weights, for tests and dry runs). A model may also carry its own config and weights: ``hf-hub:org/repo``
(a Hugging Face repository, fetched into its cache) or ``local-dir:PATH`` (such a repository's files in a
folder); ``pretrained`` is then ignored. The evaluation transform is the model's own; the training
augmentation is APE's: ``RandomResizedCrop(scale=(0.5, 1), bicubic)``, a horizontal flip, and the
model's normalisation.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from apecli.archives import is_openai_archive
from apecli.devices import torch_device
from apecli.errors import ApecliError, ChoiceError, Placeholder, Setting, SettingError, Step, first_line
from apecli.files import file_sha256

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
NO_WEIGHTS = ("none", "random", "")  # random weights, seeded: the same in every run
CARRIES_WEIGHTS = ("hf-hub:", "local-dir:")  # model names whose config and weights come with them
HF_CONFIG = "open_clip_config.json"
HF_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # in open_clip's order of preference


def known_models(pattern: str = "") -> dict[str, list[str]]:
    """open_clip's model names whose name contains ``pattern`` (any case), each with its pretrained tags
    (an empty list: random weights or your own checkpoint only)."""
    import open_clip

    tags: dict[str, list[str]] = {name: [] for name in open_clip.list_models()}
    for name, tag in open_clip.list_pretrained():
        tags.setdefault(name, []).append(tag)
    return {name: found for name, found in tags.items() if pattern.lower() in name.lower()}


def _bounded_hub_waits() -> None:
    """An unreachable Hugging Face hub fails in seconds, not minutes."""
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")


def model_files(model: str) -> tuple[Path, Path] | None:
    """The config and weights files of an ``hf-hub:`` or ``local-dir:`` model (fetched into the Hugging Face
    cache for hf-hub: where there is no network, from there), None for other models. Either missing is one
    clear error: open_clip itself would go on with random weights."""
    if model.startswith("local-dir:"):
        folder = Path(model[len("local-dir:"):]).expanduser()
        if not (folder / HF_CONFIG).is_file():
            raise ApecliError(f"{folder}: no {HF_CONFIG}; a local-dir: model is a folder with it and the weights")
        weights = sorted(path for pattern in ("*.safetensors", "*.bin", "*.pth") for path in folder.glob(pattern))
        if len(weights) != 1:
            found = f"{len(weights)} weights files ({', '.join(path.name for path in weights)})" if weights else "no weights file"
            raise ApecliError(f"{folder}: {found}; a local-dir: model holds one (.safetensors, .bin or .pth)")
        return folder / HF_CONFIG, weights[0]
    if model.startswith("hf-hub:"):
        return _hub_files(model[len("hf-hub:"):])
    return None


@functools.lru_cache(maxsize=8)
def _hub_files(repo: str) -> tuple[Path, Path]:
    """An hf-hub repository's config and weights in the hub's cache, looked up once per process (the
    request id, the model and its description each need them; online, every lookup asks the hub)."""
    _bounded_hub_waits()
    from huggingface_hub import hf_hub_download

    try:
        config = hf_hub_download(repo, HF_CONFIG)
        failures = []
        for name in HF_WEIGHTS:
            try:
                return Path(config), Path(hf_hub_download(repo, name))
            except Exception as failure:  # noqa: BLE001 - absent from the repository, or unreachable
                failures.append(failure)
        raise failures[-1]
    except Exception as error:  # noqa: BLE001 - the hub's many ways of saying no
        reason = first_line(error, 160)
        local = Setting("model", Placeholder("local-dir:DIR"))
        raise ApecliError(f"cannot get hf-hub:{repo} (offline?): download the repository where there is a network "
                          f"(hf download {repo} --local-dir DIR), then pass {local} ({reason})", local) from None


@dataclass(frozen=True)
class EncoderSpec:
    """Which model, which weights, where, at what precision."""

    model: str
    pretrained: str | None = None
    device: str = "auto"  # auto: CUDA when present
    precision: str = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    trust_torchscript: bool = False  # read an archive the weights reader refuses as TorchScript, which runs its code

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ChoiceError("precision", self.precision, f"unknown precision '{self.precision}'; use "
                                                           f"{', '.join(PRECISIONS)}", PRECISIONS)

    def identity(self) -> dict[str, Any]:
        """What makes features of this encoder what they are, computed without building the model."""
        device_type = self.resolved_device().split(":")[0]  # cuda:1 and cuda:0 give the same features
        files = model_files(self.model)
        if files is not None:  # the config and weights come with the model
            config, weights = files
            stat = weights.stat()
            name = f"local-dir:{config.parent.resolve()}" if self.model.startswith("local-dir:") else self.model
            return {"model": name, "model_config_sha256": file_sha256(config), "pretrained": "with the model",
                    "checkpoint_sha256": _checkpoint_sha256(str(weights.resolve()), stat.st_size, stat.st_mtime_ns),
                    "device": device_type, "precision": self.resolved_precision()}
        model_path = Path(self.model).expanduser()
        model = {"model": self.model}
        if model_path.suffix == ".json" and model_path.is_file():
            model = {"model": model_path.stem, "model_config_sha256": file_sha256(model_path),
                     "model_config": json.loads(model_path.read_text())}
        weights = self.pretrained or "none"
        if weights.lower() in NO_WEIGHTS:
            pretrained = {"pretrained": "none"}
        elif Path(weights).expanduser().is_file():
            checkpoint = Path(weights).expanduser().resolve()
            stat = checkpoint.stat()
            pretrained = {"pretrained": str(checkpoint),
                          "checkpoint_sha256": _checkpoint_sha256(str(checkpoint), stat.st_size, stat.st_mtime_ns)}
        else:
            pretrained = {"pretrained": weights}
        # Without importing open_clip: which tags were trained with QuickGELU is its to say, when the model
        # is built (see forces_quick_gelu); the request only needs to differ from a GELU-for-all one.
        activation = {"activation": "QuickGELU where the weights were trained with it"} if self._trained_activation() else {}
        return {**model, **pretrained, **activation, "device": device_type, "precision": self.resolved_precision()}

    def _trained_activation(self) -> bool:
        """Whether the weights' training decides the activation: an open_clip tag or an OpenAI archive (not
        random weights, weights that bring their config, or a state dict, which run as their config says)."""
        weights = self.pretrained or "none"
        checkpoint = Path(weights).expanduser()
        return weights.lower() not in NO_WEIGHTS and not self.model.startswith(CARRIES_WEIGHTS) and \
            (not checkpoint.is_file() or is_openai_archive(checkpoint))

    def forces_quick_gelu(self) -> bool:
        """Whether the weights were trained with QuickGELU while the model's config does not say so: OpenAI's
        weights (the ``openai`` tag, or an OpenAI CLIP archive such as ``~/.cache/clip/RN50.pt``) on ``RN50``
        or ``ViT-B-16``, say. open_clip would build those with GELU, whose features are not CLIP's."""
        if not self._trained_activation():
            return False
        weights = self.pretrained or "none"
        config_path = Path(self.model).expanduser()
        import open_clip

        if config_path.suffix == ".json":
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        else:
            config = open_clip.get_model_config(self.model) or {}
        if config.get("quick_gelu"):
            return False  # already so: RN50-quickgelu, …
        if Path(weights).expanduser().is_file():
            return True  # an OpenAI archive
        name = config_path.stem if config_path.suffix == ".json" else self.model
        return bool(open_clip.get_pretrained_cfg(name, weights).get("quick_gelu", False))

    @property
    def random_weights(self) -> bool:
        """Whether the model runs with random weights (``--pretrained none`` on a model without its own)."""
        return (self.pretrained or "none").lower() in NO_WEIGHTS and not self.model.startswith(CARRIES_WEIGHTS)

    def resolved_device(self) -> str:
        """The device to run on; under torchrun, a plain ``cuda`` (or ``auto`` with CUDA) is this process's GPU."""
        device = self.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and "LOCAL_RANK" in os.environ:
            return f"cuda:{os.environ['LOCAL_RANK']}"  # one GPU per rank
        return device

    def resolved_precision(self) -> str:
        if self.precision != "auto":
            return self.precision
        return "fp16" if self.resolved_device().startswith("cuda") else "fp32"


@functools.lru_cache(maxsize=8)
def _checkpoint_sha256(path: str, size: int, modified_ns: int) -> str:
    """A checkpoint's hash, computed once per file version (size and time are part of the key)."""
    return file_sha256(path)


GRAPH_SHAPES = 2  # batch shapes an encoder keeps a CUDA graph for: a chunk's full batches and its last one
_SWITCH = {"1": True, "yes": True, "on": True, "true": True, "0": False, "no": False, "off": False, "false": False, "": False}


def cuda_graphs_wanted() -> bool:
    """Whether ``APECLI_CUDA_GRAPHS`` asks for CUDA graphs (unset: no); another value is refused in one line."""
    value = os.environ.get("APECLI_CUDA_GRAPHS", "")
    if value.strip().lower() not in _SWITCH:
        raise ApecliError(f"APECLI_CUDA_GRAPHS={value}: give 1 (CUDA graphs for the encoder) or 0 (none, the default)")
    return _SWITCH[value.strip().lower()]


class Graphs:
    """A forward pass that runs batch shapes seen before as CUDA graphs.

    Run eagerly, each of a model's kernels is launched from Python, and each launch needs the GIL, which
    extraction's reading and decoding threads take turns with; a graph's replay is one call a batch.
    The second batch of a shape is captured (the first runs eagerly, so a one-batch run captures
    nothing), for at most :data:`GRAPH_SHAPES` shapes; other shapes run eagerly. A capture that fails
    leaves the forward pass eager, said once on stderr. The graphs share one memory pool: they run one
    after another on one stream, and each output is copied off before the next replay. ``capture``
    None: every batch eager.
    """

    def __init__(self, run: Callable, capture: Callable | None, most: int = GRAPH_SHAPES) -> None:
        self.run, self.capture, self.most = run, capture, most
        self.seen: dict[tuple[int, ...], int] = {}
        self.replays: dict[tuple[int, ...], Callable] = {}
        self.failure: str | None = None

    def __call__(self, batch):
        shape = tuple(batch.shape)
        replay = self.replays.get(shape)
        if replay is None and self.capture is not None and self.failure is None and len(self.replays) < self.most:
            self.seen[shape] = self.seen.get(shape, 0) + 1
            if self.seen[shape] >= 2:
                try:
                    replay = self.replays[shape] = self.capture(shape)
                except Exception as failure:  # noqa: BLE001 - an operation CUDA graphs cannot hold: stay eager
                    self.failure = first_line(failure, 200)
                    logging.getLogger("apecli").warning(f"encoding without CUDA graphs: capture failed ({self.failure})")
        return self.run(batch) if replay is None else replay(batch)


class Encoder:
    """A loaded CLIP model with its transforms and tokenizer."""

    def __init__(self, spec: EncoderSpec, model: Any, eval_transform: Callable, tokenizer: Callable, name: str) -> None:
        import torch
        from torchvision import transforms

        self.spec, self.model, self.eval_transform, self.tokenizer, self.name = spec, model, eval_transform, tokenizer, name
        self.device = torch.device(spec.resolved_device())
        self.dtype = torch.float16 if spec.resolved_precision() == "fp16" else torch.float32
        config = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
        size = config.get("size", model.visual.image_size)
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.mean, self.std = tuple(config.get("mean", (0.48145466, 0.4578275, 0.40821073))), tuple(
            config.get("std", (0.26862954, 0.26130258, 0.27577711)))
        self.train_transform = transforms.Compose([
            transforms.RandomResizedCrop(self.image_size, scale=(0.5, 1.0),
                                         interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.ToTensor(),
            transforms.Normalize(self.mean, self.std),
        ])
        self.use_graphs = cuda_graphs_wanted()
        self.preprocess_config = {**{k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
                                  "size": list(self.image_size), "train_augmentation":
                                  "RandomResizedCrop(scale=(0.5, 1), bicubic) + RandomHorizontalFlip(0.5)"}

    def describe(self) -> dict[str, Any]:
        activation = {"quick_gelu": True} if self.spec.forces_quick_gelu() else {}
        return {**self.spec.identity(), **activation, "name": self.name, "preprocessing": self.preprocess_config}

    def encode_images(self, batch: "torch.Tensor") -> np.ndarray:
        """Image features (not normalised) of a batch of transformed images, as float32."""
        return self.start_encoding(batch)()

    def start_encoding(self, batch: "torch.Tensor") -> Callable[[], np.ndarray]:
        """Queue a batch on the device; the returned function waits for its features and returns them.

        On CUDA the features travel back to pinned memory asynchronously, so the caller can prepare the
        next batch (read it, decode it on the GPU's JPEG engines) while this one is encoded, and a batch
        shape seen before runs as one CUDA graph (see :class:`Graphs`).
        """
        import torch

        with torch.inference_mode():
            if self.device.type != "cuda":
                return self.encode_eagerly(batch).cpu().numpy
            features = self.graphs(batch)
            host = torch.empty(features.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(features, non_blocking=True)  # before the next replay overwrites a graph's output: same stream
            done = torch.cuda.Event(blocking=True)  # the waiting thread sleeps: loader processes need the cores
            done.record(torch.cuda.current_stream(self.device))  # the encoder's GPU, which need not be the current one

        def result() -> np.ndarray:
            done.synchronize()
            return host.numpy()

        return result

    @functools.cached_property
    def graphs(self) -> "Graphs":
        """The CUDA encoder's forward pass; with ``APECLI_CUDA_GRAPHS=1``, replayed from a graph for
        recurring batch shapes (off by default until measured on a GPU against the eager pass)."""
        return Graphs(self.encode_eagerly, self.capture_graph if self.use_graphs else None)

    @functools.cached_property
    def _graph_pool(self):
        import torch

        return torch.cuda.graph_pool_handle()

    def encode_eagerly(self, batch: "torch.Tensor") -> "torch.Tensor":
        return self.model.encode_image(batch.to(self.device, self.dtype, non_blocking=True)).float()

    def capture_graph(self, shape: tuple[int, ...]) -> Callable[["torch.Tensor"], "torch.Tensor"]:
        """The forward pass for batches of ``shape`` captured in a CUDA graph: a function that copies a batch
        into the graph's input, replays it on the current stream and returns its output (overwritten by the
        next replay)."""
        import torch

        with torch.cuda.device(self.device):
            static = torch.zeros(shape, dtype=self.dtype, device=self.device)
            warm = torch.cuda.Stream(self.device)  # warm-up off the capturing stream, as capture requires
            warm.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(warm):
                for _ in range(2):
                    self.model.encode_image(static)
            torch.cuda.current_stream(self.device).wait_stream(warm)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the decoding thread goes on with its own CUDA calls meanwhile
            with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
                output = self.model.encode_image(static).float()

        def replay(batch: "torch.Tensor") -> "torch.Tensor":
            static.copy_(batch, non_blocking=True)
            graph.replay()
            return output

        return replay

    def text_classifier(self, class_names: tuple[str, ...], templates: tuple[str, ...],
                        prompts: dict[str, list[str]] | None = None) -> np.ndarray:
        """One L2-normalised row per class: the normalised mean of its normalised prompt embeddings."""
        return self.text_embeddings(class_names, templates, prompts)[0]

    def text_embeddings(self, class_names: tuple[str, ...], templates: tuple[str, ...],
                        prompts: dict[str, list[str]] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The text classifier (C × D, :meth:`text_classifier`), and the L2-normalised embedding of every
        prompt it averaged (M × D: each class's templates, then its sentences) with each one's class (M,)."""
        import torch

        rows, embeddings, labels = [], [], []
        with torch.inference_mode():
            for label, name in enumerate(class_names):
                spoken = name.replace("_", " ")
                texts = [template.format(spoken) for template in templates] + list((prompts or {}).get(name, []))
                embedded = self.model.encode_text(self.tokenizer(texts).to(self.device)).float()
                embedded = embedded / embedded.norm(dim=-1, keepdim=True)
                mean = embedded.mean(dim=0)
                rows.append((mean / mean.norm()).cpu().numpy())
                embeddings.append(embedded.cpu().numpy())
                labels.append(np.full(len(texts), label, dtype=np.int64))
        return (np.stack(rows).astype(np.float32), np.concatenate(embeddings).astype(np.float32),
                np.concatenate(labels))


@contextlib.contextmanager
def _open_clip_quiet() -> Iterator[None]:
    """open_clip logs its failures before raising them, which apecli reports in one line of its own:
    the root logger hears only critical messages meanwhile, and then what it heard before."""
    import logging

    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.setLevel(before)


def load_encoder(spec: EncoderSpec) -> Encoder:
    """Build the model; a missing, offline or unloadable model ends in one clear error."""
    _bounded_hub_waits()
    import open_clip

    torch_device(spec.resolved_device())  # an unknown or absent device, refused in one line
    if model_files(spec.model) is not None:
        return _load_with_files(spec)
    name = spec.model
    config_path = Path(spec.model).expanduser()
    if config_path.suffix == ".json":
        if not config_path.is_file():
            raise ApecliError(f"{config_path}: no such model-config file")
        try:
            json.loads(config_path.read_text())
        except ValueError as error:
            raise ApecliError(f"{config_path}: not a valid model config ({error})") from None
        open_clip.add_model_config(config_path)
        name = config_path.stem
    if name not in open_clip.list_models():
        raise SettingError("model", spec.model, f"unknown model '{spec.model}': give an open_clip model name (see "
                           f"{Step('known_models')}) "
                          "or the path of a model-config JSON")
    weights = spec.pretrained or "none"
    pretrained = None if weights.lower() in NO_WEIGHTS else str(Path(weights).expanduser()) \
        if Path(weights).expanduser().is_file() else weights
    if pretrained is not None and not Path(pretrained).is_file():
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            looks_like_path = any(sep in weights for sep in "/\\") or weights.endswith((".pt", ".bin", ".safetensors"))
            raise ApecliError(f"{weights}: no such checkpoint file" if looks_like_path else
                              f"unknown pretrained tag '{weights}' for {name}; known: {', '.join(tags) or 'none'}")
    import torch

    archive = pretrained is not None and is_openai_archive(Path(pretrained))
    torch.manual_seed(0)  # random weights (--pretrained none) are the same in every run
    try:
        with _open_clip_quiet():
            model, _, eval_transform = open_clip.create_model_and_transforms(
                name, pretrained=None if archive else pretrained, precision=spec.resolved_precision(),
                device=spec.resolved_device(), force_quick_gelu=spec.forces_quick_gelu())
        if archive:  # open_clip reads state dicts only: the archive's weights, by OpenAI's names (open_clip's too)
            _load_openai_archive(model, Path(pretrained), name, spec.trust_torchscript)
    except ApecliError:
        raise
    except Exception as error:  # downloads and checkpoint loading raise many types
        reason = first_line(error, 200)
        if pretrained is not None and not Path(pretrained).is_file():
            local = Setting("pretrained", Placeholder("/path/to/checkpoint"))
            raise ApecliError(f"cannot get pretrained weights '{pretrained}' for {name} (offline?): download them where "
                              f"there is a network, then pass {local} ({reason})", local) from None
        raise ApecliError(f"cannot build {name} with weights {weights}: {reason}") from None
    model.eval()
    return Encoder(spec, model, eval_transform, open_clip.get_tokenizer(name), name)


def _load_with_files(spec: EncoderSpec) -> Encoder:
    """An ``hf-hub:`` or ``local-dir:`` model, its files already found by :func:`model_files`."""
    import open_clip

    try:
        with _open_clip_quiet():
            model, _, eval_transform = open_clip.create_model_and_transforms(
                spec.model, precision=spec.resolved_precision(), device=spec.resolved_device())
            tokenizer = open_clip.get_tokenizer(spec.model)
    except Exception as error:  # noqa: BLE001 - a damaged config or checkpoint
        raise ApecliError(f"cannot build {spec.model}: {first_line(error, 200)}") from None
    model.eval()
    return Encoder(spec, model, eval_transform, tokenizer, spec.model)


def _load_openai_archive(model, path: Path, name: str, trust_torchscript: bool = False) -> None:
    """Load the weights of an OpenAI CLIP archive into ``model``, refusing ones of another architecture.
    An archive the weights reader (which runs nothing the file holds) cannot read is refused, unless
    ``trust_torchscript`` says to load it as TorchScript, which runs the code it holds."""
    from apecli.archives import UnreadableArchive, read_weights

    try:
        state = read_weights(path)
    except UnreadableArchive as unreadable:
        refusal = f"{path}: not an OpenAI CLIP archive apecli can read ({unreadable})"
        if not trust_torchscript:
            trust = Setting("trust_torchscript", True)
            raise ApecliError(f"{refusal}; loading it as TorchScript would run the code it holds: pass {trust} only "
                              "for a file you trust", trust, path=path) from None
        state = _load_with_torchscript(path, refusal)
    for key in ("input_resolution", "context_length", "vocab_size"):  # OpenAI's, not weights
        state.pop(key, None)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:  # its first line is torch's heading; the next names the keys
        reason = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise ApecliError(f"{path}: an OpenAI CLIP archive whose weights do not fit {name} ({reason[:160]})") from None


def _load_with_torchscript(path: Path, refusal: str) -> dict:
    """An archive the weights reader does not know, through TorchScript while torch still has it."""
    import warnings

    import torch

    if not hasattr(torch.jit, "load"):
        raise ApecliError(refusal)
    try:
        with warnings.catch_warnings():  # deprecated, but the only other reader of TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception:  # noqa: BLE001 - TorchScript's failures are RuntimeErrors of many kinds
        raise ApecliError(refusal) from None

