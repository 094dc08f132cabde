"""apecli's training-free search on a quiet machine and on one where another process keeps a core busy.

The command measured is ``apecli eval REFINEMENT --mode training-free`` (the whole command, start to
end, as a user runs it) on generated features of Caltech101's shape (C = 100, K = 16, D = 512, 1,700
validation images, the grid of 200 × 20 × 20 settings, k = 300), each time in a fresh process:

- baseline: ``GOMP_SPINCOUNT=300000``, GNU OpenMP's own default, which earlier releases ran under (with
  it set, apecli leaves OpenMP's waiting as the user set it);
- apecli: nothing set, so the command line has OpenMP's threads sleep while they wait where it finds
  another process running as it starts (on the busy machine), and leaves them as they are otherwise;
- one thread: ``OMP_NUM_THREADS=1``, for reference.

Busy: one competing process spins on one core for the whole measurement. Each time is the median of
--repeats runs; the ratios are the baseline's time over apecli's.

    python benchmarks/busy_machine.py [--repeats 6] [--mode training-free]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = {"baseline": {"GOMP_SPINCOUNT": "300000"}, "apecli": {}, "one thread": {"OMP_NUM_THREADS": "1"}}


def clean_environment() -> dict[str, str]:
    """This environment without any OpenMP or thread setting of its own."""
    return {name: value for name, value in os.environ.items()
            if not name.startswith(("OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_"))}


def apecli(*args: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "apecli", *args], env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"apecli {' '.join(args)} failed: {done.stderr.strip()}")
    return took


@contextlib.contextmanager
def competing(busy: bool):
    """One process spinning on one core while the block runs (or nothing, for a quiet machine)."""
    if not busy:
        yield
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        spinner.kill()
        spinner.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--mode", default="training-free", help="the eval mode measured")
    args = parser.parse_args()

    from apecli import store
    from apecli.kinds.features import save_features
    from apecli.synthetic import synthetic_features

    env = {**clean_environment(), "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as folder:
        features = synthetic_features(num_classes=100, dim=512, shots=(16,), val_per_class=17, test_per_class=25,
                                      views=1, seed=3, dataset="caltech101")
        saved = save_features(features, store.in_store(folder, "caltech101", "features"))
        refined = subprocess.run([sys.executable, "-m", "apecli", "refine", str(saved.artifact.path), "--k", "300",
                                  "--store", folder], env=env, capture_output=True, text=True, check=True).stdout.strip()
        source = refined if args.mode == "training-free" else str(saved.artifact.path)
        times: dict[tuple[str, str], float] = {}
        for machine in ("quiet", "busy"):
            with competing(machine == "busy"):
                runs: dict[str, list[float]] = {name: [] for name in VARIANTS}
                names = list(VARIANTS)
                for repeat in range(args.repeats):  # in turn, each first as often: the second of two runs in a
                    # row was measured about 5 % slower, whichever it was
                    for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                        runs[name].append(apecli("eval", source, "--mode", args.mode, "--store", folder,
                                                 env={**env, **VARIANTS[name]}))
                for name in VARIANTS:
                    times[machine, name] = statistics.median(runs[name])
                    print(f"{machine:5}  {name:10}  {times[machine, name]:6.2f} s  (runs: "
                          f"{', '.join(f'{run:.2f}' for run in runs[name])})", flush=True)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, apecli eval --mode {args.mode}, "
          f"median of {args.repeats}")
    for machine in ("quiet", "busy"):
        print(f"{machine}: baseline {times[machine, 'baseline']:.2f} s, apecli {times[machine, 'apecli']:.2f} s, "
              f"one thread {times[machine, 'one thread']:.2f} s; baseline / apecli = "
              f"{times[machine, 'baseline'] / times[machine, 'apecli']:.2f}×")


if __name__ == "__main__":
    main()
