"""torchrun: several processes extract one store, identical to a single process's (gloo on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from apecli.distributed import owns
from apecli.synthetic import coop_caltech, tiny_model_config

TORCHRUN = Path(sys.executable).parent / "torchrun"
pytestmark = pytest.mark.skipif(not TORCHRUN.is_file(), reason=f"torchrun not found beside {sys.executable}")


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_every_chunk_has_exactly_one_owner(world):
    for chunk in range(50):
        assert sum(owns(chunk, rank, world) for rank in range(world)) == 1
    assert [c for c in range(10) if owns(c, 1, 3)] == [1, 4, 7]


def test_each_process_encodes_on_its_own_gpu_and_a_cpu_run_uses_gloo(monkeypatch):
    from apecli.distributed import backend_for
    from apecli.encoder import EncoderSpec

    monkeypatch.setenv("LOCAL_RANK", "3")
    assert EncoderSpec("RN50", device="cuda").resolved_device() == "cuda:3"
    assert EncoderSpec("RN50", device="cuda:1").resolved_device() == "cuda:1"  # as the user said
    assert EncoderSpec("RN50", device="cpu").resolved_device() == "cpu"
    assert backend_for("cuda:3") == "nccl" and backend_for("cpu") == "gloo"


@pytest.fixture
def setup(tmp_path):
    coop_caltech(tmp_path / "data", classes=3, per_split=(6, 5, 5))
    tiny_model_config(tmp_path)
    return tmp_path


def _run(folder: Path, store: str, processes: int, *extra: str) -> subprocess.CompletedProcess:
    command = ([str(TORCHRUN), "--nproc_per_node", str(processes), "--master_port", str(29500 + os.getpid() % 500)]
               if processes > 1 else [sys.executable])
    args = ["-m", "apecli", "extract", "--dataset", "caltech101", "--root", "data", "--model", "apecli-tiny.json",
            "--pretrained", "none", "--shots", "1,2,4", "--views", "2", "--workers", "0", "--chunk-images", "3",
            "--batch-size", "4", "--device", "cpu", "--store", store, *extra]  # gloo, even beside a GPU
    # One thread per process in both runs: the same arithmetic, hence the same bits.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command + args, cwd=folder, capture_output=True, text=True, env=env, timeout=300)


def test_two_processes_make_the_single_process_store(setup):
    single = _run(setup, "one", 1)
    assert single.returncode == 0, single.stderr
    double = _run(setup, "two", 2)
    assert double.returncode == 0, double.stderr
    assert double.stdout.strip().splitlines() == [single.stdout.strip().replace("one/", "two/")]  # rank 0 alone speaks
    assert Path(single.stdout.strip()).name == Path(double.stdout.strip()).name  # same content id
    assert not list((setup / "two" / "caltech101").glob(".extract-*"))


def test_processes_that_take_another_seeds_evaluation_features_make_the_single_process_store(setup):
    for store in ("one", "two"):
        first = _run(setup, store, 1)
        assert first.returncode == 0, first.stderr
    single = _run(setup, "one", 1, "--seed", "2")
    assert single.returncode == 0, single.stderr
    double = _run(setup, "two", 2, "--seed", "2")
    assert double.returncode == 0, double.stderr
    assert "validation and test features: those of" in double.stderr
    assert Path(single.stdout.strip()).name == Path(double.stdout.strip()).name  # same content id
    assert not list((setup / "two" / "caltech101").glob(".extract-*"))


def test_an_interrupted_run_resumes_across_processes(setup, interrupt_encoder):
    import torch

    from apecli.datasets import read_coop
    from apecli.encoder import EncoderSpec
    from apecli.extract import ExtractSettings, extract

    whole = _run(setup, "one", 1)
    assert whole.returncode == 0, whole.stderr
    interrupt_encoder(5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(KeyboardInterrupt):  # the same request as the command line's, cut short
            extract(read_coop("caltech101", setup / "data"), EncoderSpec(str(setup / "apecli-tiny.json"), "none"),
                    setup / "two", ExtractSettings(shots=(1, 2, 4), views=2, batch_size=4, chunk_images=3))
    finally:
        torch.set_num_threads(threads)
    saved = list((setup / "two" / "caltech101").glob(".extract-*/*.npz"))
    assert saved and not list((setup / "two").rglob("*.h5"))
    resumed = _run(setup, "two", 2)
    assert resumed.returncode == 0, resumed.stderr
    assert Path(resumed.stdout.strip()).name == Path(whole.stdout.strip()).name


def test_a_failing_rank_fails_the_run_cleanly(setup):
    images = sorted((setup / "data" / "caltech-101" / "101_ObjectCategories" / "thing_1").glob("*.jpg"))
    images[-1].write_bytes(b"broken")  # a test image of the last class: in a chunk of rank 1
    result = _run(setup, "two", 2)
    assert result.returncode != 0
    assert "unreadable image" in result.stderr and "--skip-bad" in result.stderr
    assert not list((setup / "two").rglob("*.h5"))
    result = _run(setup, "two", 2, "--skip-bad")
    assert result.returncode == 0, result.stderr
