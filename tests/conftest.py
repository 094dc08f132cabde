"""Shared fixtures: generated feature sets, a temporary store, and the real features when present."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import numpy as np
import pytest

from apecli.encoder import EncoderSpec
from apecli.synthetic import coop_caltech, tiny_model_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The real CLIP features: ../shared/real-features beside the project, or a copy named by APECLI_REAL_FEATURES
# (a machine the project is copied to without its surroundings).
REAL_FEATURES = Path(os.environ.get("APECLI_REAL_FEATURES") or Path(__file__).resolve().parents[2] / "shared" / "real-features")


def real_dataset(name: str) -> Path:
    """The folder of one real-feature set, or skip the test with the reason."""
    folder = REAL_FEATURES / name
    if not (folder / "keys_16shots.pt").is_file():
        pytest.skip(f"real features not found at {folder} (they live in ../shared/real-features beside the project, "
                    "or where APECLI_REAL_FEATURES says)")
    return folder


@pytest.fixture
def small_features():
    from apecli.synthetic import synthetic_features

    return synthetic_features(num_classes=6, dim=32, shots=(1, 4), val_per_class=8, test_per_class=10, seed=3)


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


def write_npz(path: Path, features, shots: int | None = None) -> Path:
    """A feature set as the .npz that `apecli import npz` reads."""
    from apecli.importers import export_npz

    return export_npz(features, path, shots)


def no_partial_files(folder: Path) -> bool:
    """True when no temporary file is left anywhere under ``folder``."""
    return not any(p.name.endswith(".tmp") for p in folder.rglob("*")) if folder.exists() else True


def assert_one_line_error(result, *fragments: str) -> None:
    """A CLI failure: non-zero exit, one line on stderr that names the problem, no traceback, no stdout."""
    assert result.exit_code != 0, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("apecli: error: "), lines
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert result.stdout == ""


def random_unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> EncoderSpec:
    """The tiny model with a saved checkpoint, as a user's local checkpoint would be given."""
    import open_clip
    import torch

    folder = tmp_path_factory.mktemp("model")
    config = tiny_model_config(folder)
    open_clip.add_model_config(config)
    torch.manual_seed(42)
    model = open_clip.create_model("apecli-tiny", pretrained=None)
    torch.save(model.state_dict(), folder / "tiny.pt")
    return EncoderSpec(str(config), str(folder / "tiny.pt"), device="cpu")


@pytest.fixture
def caltech(tmp_path) -> Path:
    coop_caltech(tmp_path / "data", classes=3, per_split=(5, 3, 3))
    return tmp_path / "data"




@pytest.fixture
def interrupt_encoder(monkeypatch):
    """``interrupt_encoder(n)``: the n-th encoder batch from now on raises KeyboardInterrupt, as a killed run would."""
    from apecli.encoder import Encoder

    original = Encoder.start_encoding

    def arm(batch_number: int) -> None:
        calls = {"n": 0}

        def start_encoding(self, batch):
            calls["n"] += 1
            if calls["n"] == batch_number:
                raise KeyboardInterrupt
            return original(self, batch)

        monkeypatch.setattr(Encoder, "start_encoding", start_encoding)

    return arm


@contextlib.contextmanager
def raises_said(pattern: str):
    """An ApecliError whose message, in the command line's words (the library names settings in Python,
    ``apecli.cli.errors`` turns them into flags), matches ``pattern``."""
    from apecli.cli.errors import in_flags
    from apecli.errors import ApecliError

    with pytest.raises(ApecliError) as caught:
        yield caught
    said = in_flags(str(caught.value))
    assert re.search(pattern, said), f"{pattern!r} does not match {said!r}"
