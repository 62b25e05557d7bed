"""Helpers shared by the benchmarks: machine description, timing, result files, a tiny backbone.

Run the benchmarks from outside the repository root (e.g. ``cd /tmp``): there, the bare
``scifm/`` folder would shadow the installed package (whose ``scifm.encoders`` and
``scifm.data_modules`` are mapped from ``encoders/`` and ``data_modules/``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info(packages: tuple[str, ...] = ()) -> dict[str, Any]:
    """CPU, cores, memory, OS, Python, torch and selected package versions, date."""
    import torch

    mem_gib = None
    try:
        import psutil

        mem_gib = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": mem_gib,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "packages": {p: _version(p) for p in ("scifm", *packages)},
    }


def write_results(name: str, results: dict[str, Any], packages: tuple[str, ...] = ()) -> Path:
    """Write ``results`` plus machine info to ``benchmarks/results/<name>.json``; return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {"benchmark": name, "argv": sys.argv[1:], "machine": machine_info(packages), **results}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def time_repeats(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    """A plain fixed-width table."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for k, row in enumerate(cells):
        print(
            "  "
            + "  ".join(
                c.ljust(w) if not k or not i else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if k == 0:
            print("  " + "  ".join("-" * w for w in widths))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (``ru_maxrss``), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class RssSampler:
    """Samples the RSS of this process (and its children) in a thread; ``peak`` in MiB."""

    def __init__(self, interval: float = 0.05) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak = 0.0
        self.samples: list[tuple[float, float]] = []

    def current(self) -> float:
        total = self._proc.memory_info().rss
        for child in self._proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except Exception:  # a worker that just exited
                continue
        return total / 2**20

    def _run(self) -> None:
        start = time.perf_counter()
        while not self._stop.is_set():
            rss = self.current()
            self.peak = max(self.peak, rss)
            self.samples.append((time.perf_counter() - start, rss))
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def make_tiny_backbone(directory: Path) -> Path:
    """A 2-layer random Llama (hidden 32) with a BPE tokenizer trained in place (``scifm.testing``),
    saved to ``directory`` and loaded back through ``from_pretrained`` like any model."""
    from scifm.testing import make_backbone

    return make_backbone(directory)


def check_not_shadowed() -> None:
    """Exit with a hint when run from the repository root, where ``./scifm`` shadows the package."""
    try:
        import scifm.encoders  # noqa: F401  (mapped from encoders/ only in the installed package)
    except ImportError:
        sys.exit(
            "cannot import scifm.encoders: run the benchmarks from outside the repository root (cd /tmp)"
        )
