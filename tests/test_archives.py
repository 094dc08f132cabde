"""OpenAI's CLIP archives (TorchScript zips) read as state dicts without TorchScript."""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import pytest

from apecli.archives import UnreadableArchive, is_openai_archive, read_weights
from apecli.errors import ApecliError


def _modules(scratch: bool = True):
    """Modules with what a CLIP archive holds: containers, typed lists (LayerNorm's shape), half-precision
    and transposed weights, buffers, a plain tensor attribute (not state) and, with ``scratch``, a
    non-persistent buffer (which TorchScript keeps in the state dict, unlike torch)."""
    import torch

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = torch.nn.LayerNorm(8)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
            self.attn_mask = torch.zeros(3, 3)
            self.register_buffer("scratch", torch.ones(2) if scratch else torch.zeros(0), persistent=not scratch)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.mlp(self.ln(x)) + self.scratch.sum()

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.blocks = torch.nn.ModuleList([Block() for _ in range(3)])
            self.proj = torch.nn.Parameter(torch.randn(4, 8).half().t())
            self.register_buffer("counts", torch.arange(5))
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.bn = torch.nn.BatchNorm2d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return x @ self.proj.float()

    return Model


def _save(module, path: Path, how: str = "script") -> Path:
    import torch

    with warnings.catch_warnings():  # torch.jit is deprecated; these archives are what OpenAI published
        warnings.simplefilter("ignore")
        (torch.jit.script(module) if how == "script" else torch.jit.trace(module, torch.randn(2, 8))).save(str(path))
    return path


def _torchscript_state(path: Path) -> dict:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location="cpu").state_dict()


@pytest.mark.parametrize("how", ["script", "trace"])
def test_weights_equal_torchscripts_own_reading(tmp_path, how):
    import torch

    archive = _save(_modules()(), tmp_path / "model.pt", how)
    assert is_openai_archive(archive)
    expected, read = _torchscript_state(archive), read_weights(archive)
    assert sorted(read) == sorted(expected) and "blocks.0.ln.weight" in read and "blocks.2.scratch" in read
    assert "blocks.0.attn_mask" not in read  # an attribute, not a parameter or buffer
    for key, value in expected.items():
        assert read[key].dtype == value.dtype and read[key].shape == value.shape, key
        assert torch.equal(read[key], value), key
    assert read["proj"].dtype == torch.float16 and read["proj"].stride() == (1, 8)


def _with_data_pkl(archive: Path, path: Path, data: bytes) -> Path:
    """A copy of ``archive`` whose data.pkl is ``data``."""
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(path, "w") as target:
        for item in source.infolist():
            target.writestr(item, data if item.filename.endswith("/data.pkl") else source.read(item))
    return path


def test_an_archive_never_runs_what_it_pickles(tmp_path, tiny):
    from apecli.encoder import EncoderSpec, load_encoder

    marker = tmp_path / "ran"
    payload = f"cposix\nsystem\n(S'touch {marker}'\ntR.".encode()  # what a plain unpickler would run
    archive = _with_data_pkl(_save(_modules()(), tmp_path / "model.pt"), tmp_path / "hostile.pt", payload)
    with pytest.raises(UnreadableArchive, match="it pickles posix.system"):
        read_weights(archive)
    with pytest.raises(ApecliError, match="hostile.pt: not an OpenAI CLIP archive apecli can read .it pickles posix.system"):
        load_encoder(EncoderSpec(tiny.model, str(archive), "cpu"))  # TorchScript cannot read it either
    assert not marker.exists()


def test_damaged_archives_are_refused(tmp_path):
    archive = _save(_modules()(), tmp_path / "model.pt")
    short = tmp_path / "short.pt"
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(short, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            target.writestr(item, data[:-4] if item.filename.endswith("/data/0") else data)
    with pytest.raises(UnreadableArchive, match="data/0 holds .* values, not"):
        read_weights(short)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(UnreadableArchive, match="a damaged zip"):
        read_weights(cut)
    empty = _with_data_pkl(archive, tmp_path / "empty.pt", b"\x80\x02N.")
    with pytest.raises(UnreadableArchive, match="holds no module"):
        read_weights(empty)


def _odd_module():
    """A module that pickles its state as a tuple, which only TorchScript knows how to read back."""
    import torch

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight

        @torch.jit.export
        def __getstate__(self):
            return (self.weight, self.training)

        @torch.jit.export
        def __setstate__(self, state: tuple[torch.Tensor, bool]):
            self.weight = state[0]
            self.training = state[1]

    return Odd


def test_an_archive_the_reader_does_not_know_loads_through_torchscript_only_when_trusted(tmp_path, monkeypatch):
    import torch

    from apecli.encoder import _load_openai_archive

    odd = _odd_module()
    saved = odd()
    archive = _save(saved, tmp_path / "odd.pt")
    with pytest.raises(UnreadableArchive, match="pickles its state as tuple"):
        read_weights(archive)
    with pytest.raises(ApecliError, match="odd.pt: not an OpenAI CLIP archive apecli can read .module __torch__[.].*Odd "
                                          "pickles its state as tuple.*would run the code it holds"):
        _load_openai_archive(odd(), archive, "odd")  # TorchScript runs a file's code: only when asked
    fresh = odd()
    _load_openai_archive(fresh, archive, "odd", trust_torchscript=True)
    assert torch.equal(fresh.weight, saved.weight)

    monkeypatch.delattr(torch.jit, "load")  # a torch without TorchScript
    with pytest.raises(ApecliError, match="odd.pt: not an OpenAI CLIP archive apecli can read .module __torch__[.].*Odd pickles its state as tuple"):
        _load_openai_archive(odd(), archive, "odd", trust_torchscript=True)


def test_a_known_archive_needs_no_torchscript(tmp_path, monkeypatch):
    import torch

    from apecli.encoder import _load_openai_archive

    model = _modules(scratch=False)()
    archive = _save(model, tmp_path / "model.pt")
    monkeypatch.delattr(torch.jit, "load")
    fresh = _modules(scratch=False)()
    with torch.no_grad():
        for parameter in fresh.parameters():
            parameter.zero_()
    _load_openai_archive(fresh, archive, "model")
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
