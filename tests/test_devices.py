"""Where searches and training run: device names checked in one line, the CPU unchanged, the GPU's settings
restored. What only a GPU shows (the same counts there, a fit run twice alike) is in test_gpu.py."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from apecli import store
from apecli.cli import app
from apecli.devices import torch_device
from apecli.errors import ApecliError
from apecli.evaluate import evaluate_artifact, evaluate_training_free, evaluate_training_required
from apecli.fitting import fit
from apecli.kinds.adapter import load_fit, save_fit
from apecli.kinds.features import save_features
from apecli.methods.ape_t import FitSettings
from apecli.methods.grid import SearchGrid
from apecli.methods.scores import BLOCK_BYTES, DEVICE_BLOCK_BYTES, device_block_bytes
from apecli.methods.trainer import reproducible
from apecli.methods.tri_edge import TriEdge, search, search_loop
from apecli.refine import select_channels
from apecli.synthetic import synthetic_features

from conftest import assert_one_line_error, raises_said

runner = CliRunner()
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
GRID = SearchGrid((7.0, 7.0, 1.0), (12, 6, 5))


def features(seed: int = 0):
    return synthetic_features(num_classes=6, dim=32, shots=(4,), val_per_class=8, test_per_class=8, seed=seed)


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "gpu", ""])
def test_an_unknown_device_is_refused_in_one_line(name):
    with pytest.raises(ApecliError, match=r"unknown device .*; use auto, cpu, cuda, cuda:N or mps$"):
        torch_device(name)


def test_a_known_backend_apecli_does_not_run_on_is_refused():
    with pytest.raises(ApecliError, match="device 'meta' is not supported"):
        torch_device("meta")


def test_the_cpu_and_auto_without_a_gpu():
    assert torch_device("cpu") == torch.device("cpu")
    assert torch_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_search_refuses_a_device_without_float64():
    with pytest.raises(ApecliError, match="'mps' has no float64"):
        torch_device("mps", float64=True)
    data = features()
    val = data.split("val")
    with pytest.raises(ApecliError, match="'mps' has no float64"):
        search(TriEdge.build(*cache_of(data)), val.features, val.labels, GRID, device="mps")


def cache_of(feature_set):
    _, cache = feature_set.cache(4)
    return feature_set.classifier, cache.keys, cache.labels, np.arange(16)


@no_cuda
def test_cuda_without_a_gpu_says_so_and_how_to_go_on():
    with raises_said(r"device 'cuda': no CUDA GPU is usable here \(torch .*\); use --device cpu$"):
        torch_device("cuda")


def test_a_gpu_index_beyond_the_machines_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert torch_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ApecliError, match=r"'cuda:2': this machine has 2 CUDA GPUs \(cuda:0 to cuda:1\)"):
        torch_device("cuda:2")


def test_the_search_on_the_cpu_device_counts_what_the_loop_counts():
    data = features(3)
    tri = TriEdge.build(*cache_of(data))
    val = data.split("val")
    on_cpu = search(tri, val.features, val.labels, GRID, device="cpu")
    np.testing.assert_array_equal(on_cpu.correct, search(tri, val.features, val.labels, GRID).correct)
    np.testing.assert_array_equal(on_cpu.correct, search_loop(tri, val.features, val.labels, GRID).correct)
    assert len(np.unique(on_cpu.correct)) > 3  # the settings differ, so equal counts check something


def test_evaluations_and_fits_record_where_they_ran(tmp_path):
    data = save_features(features(1), tmp_path / "f.h5")
    evaluation = evaluate_training_free(data, select_channels(data, k=16), GRID, device="cpu")
    assert evaluation.summary()["device"] == "cpu"
    assert evaluate_artifact(data.artifact, "proker", None, GRID, device="cpu").summary()["device"] == "cpu"
    fitted = save_fit(fit(data, FitSettings(epochs=2), device="cpu"), data, tmp_path / "fit.h5")
    assert fitted.artifact.metadata["device"] == "cpu"
    assert evaluate_training_required(data, fitted, GRID).summary()["device"] == "cpu"
    assert load_fit(fitted.artifact.path)[0].device == "cpu"


def test_a_fit_written_before_devices_were_recorded_reads_as_trained_on_the_cpu(tmp_path):
    data = save_features(features(1), tmp_path / "f.h5")
    fitted = save_fit(fit(data, FitSettings(epochs=2)), data, tmp_path / "fit.h5")
    metadata = dict(fitted.artifact.metadata)
    del metadata["device"]
    arrays = {name: fitted.artifact.read(name) for name in ("channels", "residual", "value_weights", "history/loss",
                                                           "history/val_accuracy")}
    older = store.write_artifact(tmp_path / "older.h5", "adapter", arrays, metadata, [data.artifact])
    loaded, _ = load_fit(older.path)
    assert loaded.device == "cpu"
    np.testing.assert_array_equal(loaded.adapter.residual, fitted.adapter.residual)


def test_reproducible_training_on_cuda_asks_for_deterministic_kernels_and_restores_the_settings(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    with reproducible(torch.device("cpu")):  # the CPU's kernels are deterministic already: nothing changes
        assert torch.are_deterministic_algorithms_enabled() == before[0]
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with reproducible(torch.device("cuda")):  # only settings: no GPU is touched
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()  # a kernel without a deterministic twin warns
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) == before
    with pytest.raises(KeyError):
        with reproducible(torch.device("cuda")):
            raise KeyError("a failed fit")
    assert (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) == before


@pytest.fixture
def stored(tmp_path):
    return save_features(features(2), store.in_store(tmp_path / "s", "x", "features")).artifact.path


@pytest.mark.parametrize("command", [["eval", "--mode", "training-free"], ["eval", "--mode", "gda"],
                                     ["eval", "--mode", "tip-adapter-f"], ["fit", "--epochs", "1"],
                                     ["bench", "--shots", "4", "--modes", "zero-shot,tip-adapter"]])
def test_commands_refuse_an_unknown_device_in_one_line_and_write_nothing(stored, tmp_path, command):
    before = sorted(p.name for p in (tmp_path / "s").rglob("*"))
    source = [str(stored)] if command[0] != "bench" else [str(stored), "--out", str(tmp_path / "results")]
    result = runner.invoke(app, [command[0], *source, *command[1:], "--device", "tpu", "--store", str(tmp_path / "s")])
    assert_one_line_error(result, "unknown device 'tpu'")
    assert sorted(p.name for p in (tmp_path / "s").rglob("*")) == before
    assert not (tmp_path / "results" / "results.json").exists()


@no_cuda
def test_eval_on_cuda_without_a_gpu_fails_before_searching(stored, tmp_path):
    result = runner.invoke(app, ["eval", str(stored), "--device", "cuda", "--store", str(tmp_path / "s")])
    assert_one_line_error(result, "no CUDA GPU is usable here", "--device cpu")


def test_eval_fit_and_bench_run_on_the_cpu_device_by_default_and_say_so(stored, tmp_path):
    def run(*arguments: str) -> dict:
        result = runner.invoke(app, [*arguments, "--store", str(tmp_path / "s"), "--json"])
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)

    assert run("eval", str(stored), "--search-step", "6", "4", "3")["device"] == "cpu"
    fitted = run("fit", str(stored), "--epochs", "2")
    assert fitted["device"] == "cpu"
    explicit = run("eval", str(stored), "--search-step", "6", "4", "3", "--device", "cpu")
    assert explicit["device"] == "cpu"
    rows = run("bench", str(stored), "--shots", "4", "--modes", "zero-shot,tip-adapter", "--out", str(tmp_path / "r"))["rows"]
    assert [row["device"] for row in rows] == ["cpu", "cpu"]
    assert "device" in (tmp_path / "r" / "results.csv").read_text().splitlines()[0].split(",")


@pytest.mark.parametrize("free, block", [(80 << 30, DEVICE_BLOCK_BYTES), (400 << 20, 100 << 20), (1 << 20, BLOCK_BYTES // 8)])
def test_a_gpu_search_block_fits_a_quarter_of_the_free_memory(monkeypatch, free, block):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 << 30))
    assert device_block_bytes(torch.device("cuda")) == block
    assert device_block_bytes(torch.device("cpu")) == DEVICE_BLOCK_BYTES  # asked only of a GPU


@pytest.mark.parametrize("failure, message", [
    (MemoryError(), "out of memory; fewer images at a time (--batch-size), a smaller search grid, or a machine with "
                    "more would do"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
                  "to allocate 8000000000 bytes. Error code 12 (Cannot allocate memory)"),
     "out of memory; fewer images at a time (--batch-size), a smaller search grid, or a machine with more would do"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79 GiB"
                                 "\nmore"),
     "the GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB); a smaller --batch-size, another "
     "process's memory freed, or --device cpu would do"),
])
def test_running_out_of_memory_is_one_line(stored, tmp_path, monkeypatch, failure, message):
    import apecli.evaluate

    def exhausted(*args, **kwargs):
        raise failure

    monkeypatch.setattr(apecli.evaluate, "evaluate_artifact", exhausted)
    result = runner.invoke(app, ["eval", str(stored), "--store", str(tmp_path / "s")])
    assert_one_line_error(result, message)
    assert result.exit_code == 1


def test_other_runtime_errors_are_not_taken_for_memory(stored, tmp_path, monkeypatch):
    import apecli.evaluate

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(apecli.evaluate, "evaluate_artifact", broken)
    result = runner.invoke(app, ["eval", str(stored), "--store", str(tmp_path / "s")])
    assert isinstance(result.exception, RuntimeError) and str(result.exception) == "a bug"
