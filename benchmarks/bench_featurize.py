"""Featurization throughput: molecules/s, crystals/s and streamed cells/s (with peak RSS).

- molecules: scifm's ``MoleculeFeaturizer`` vs ``torch_geometric.utils.from_smiles`` on the same
  SMILES list (real data; ``--data`` CSV/Parquet files with a ``smiles`` column), one process,
  ``--repeats`` passes each, median reported.
- crystals: scifm's ``CrystalFeaturizer`` (validation + 5 Å radius graph, 12 nearest, Gaussian
  distances) vs a plain pymatgen loop (``Structure.get_neighbor_list(r=5)``, nothing else) on
  the 288 AFLOW prototypes shipped with pymatgen.
- cells: a backed ``.h5ad`` of ``--cells`` synthetic cells (CSR, integer counts, ``--genes``
  genes, ``--density`` nonzero) is written in chunks to a temporary folder, then streamed through
  ``CellDataModule(streaming=True)`` (``CellStream``: block reads, featurization, template,
  tokenizer checks; and by default the DataLoader with the model's collator). Reports cells/s
  and the peak RSS while streaming, and the peak RSS of reading the file whole
  (``anndata.read_h5ad``, in a subprocess) for comparison when that fits in memory.

Run from outside the repository root::

    cd /tmp && /work/venv/bin/python /work/main/benchmarks/bench_featurize.py
    cd /tmp && /work/venv/bin/python /work/main/benchmarks/bench_featurize.py --only cells --cells 50000
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    REPO_ROOT,
    RssSampler,
    check_not_shadowed,
    make_tiny_backbone,
    median,
    peak_rss_mib,
    print_table,
    time_repeats,
    write_results,
)

DEFAULT_DATA = REPO_ROOT / "experiments" / "data" / "freesolv.csv"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGES = ("torch-geometric", "rdkit", "pymatgen", "anndata", "h5py", "scipy", "transformers")


# ---------------------------------------------------------------------------------- molecules


def load_smiles(paths: list[str]) -> list[str]:
    """SMILES from CSV or Parquet files with a ``smiles`` column, in file order."""
    import pandas as pd

    smiles: list[str] = []
    for path in paths:
        frame = pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path)
        column = next((c for c in frame.columns if c.lower() == "smiles"), None)
        if column is None:
            raise SystemExit(f"{path}: no 'smiles' column (columns: {list(frame.columns)})")
        smiles += [str(s) for s in frame[column].dropna()]
    return smiles


def bench_molecules(paths: list[str], repeats: int) -> dict[str, Any]:
    from rdkit import RDLogger
    from torch_geometric.utils import from_smiles

    from scifm.encoders.molecule import MoleculeFeaturizer
    from scifm.errors import InvalidInputError

    RDLogger.DisableLog("rdApp.*")  # from_smiles logs nothing either; keep the comparison fair
    smiles = load_smiles(paths)
    featurizer = MoleculeFeaturizer()

    def run_scifm() -> tuple[int, int]:
        ok = bad = 0
        for i, s in enumerate(smiles):
            try:
                featurizer(s, record=f"smiles[{i}]")
                ok += 1
            except InvalidInputError:
                bad += 1
        return ok, bad

    def run_pyg() -> tuple[int, int]:
        ok = empty = 0
        for s in smiles:
            data = from_smiles(s)
            if data.num_nodes:
                ok += 1
            else:
                empty += 1
        return ok, empty

    scifm_ok, scifm_bad = run_scifm()  # warm-up pass (imports, lookup tables); also counts failures
    pyg_ok, pyg_empty = run_pyg()
    times: dict[str, list[float]] = {"scifm MoleculeFeaturizer": [], "torch_geometric from_smiles": []}
    for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
        times["scifm MoleculeFeaturizer"] += time_repeats(run_scifm, 1)
        times["torch_geometric from_smiles"] += time_repeats(run_pyg, 1)
    rows = []
    out: dict[str, Any] = {
        "data": paths,
        "num_smiles": len(smiles),
        "repeats": repeats,
        "scifm_invalid": scifm_bad,
        "from_smiles_empty_graphs": pyg_empty,
        "scifm_ok": scifm_ok,
        "from_smiles_ok": pyg_ok,
        "results": {},
    }
    for name, ts in times.items():
        rate = len(smiles) / median(ts)
        out["results"][name] = {"median_s": median(ts), "times_s": ts, "items_per_s": rate}
        rows.append([name, len(smiles), median(ts), rate])
    ratio = (
        out["results"]["scifm MoleculeFeaturizer"]["items_per_s"]
        / (out["results"]["torch_geometric from_smiles"]["items_per_s"])
    )
    out["scifm_vs_from_smiles"] = ratio
    print_table(
        f"molecules ({', '.join(Path(p).name for p in paths)}; median of {repeats}; "
        f"scifm rejects {scifm_bad}, from_smiles gives {pyg_empty} empty graphs)",
        ["featurizer", "molecules", "median s", "molecules/s"],
        rows,
    )
    print(f"  scifm / from_smiles throughput: {ratio:.2f}x")
    return out


# ---------------------------------------------------------------------------------- crystals


def bench_crystals(repeats: int, cutoff: float = 5.0) -> dict[str, Any]:
    from scifm.data_modules.crystal import aflow_prototype_rows
    from scifm.encoders.crystal import CrystalFeaturizer

    structures = [row["structure"] for row in aflow_prototype_rows()]
    featurizer = CrystalFeaturizer(cutoff=cutoff)
    sites = sum(len(s) for s in structures)

    def run_scifm() -> int:
        edges = 0
        for i, s in enumerate(structures):
            edges += int(featurizer(s, record=f"aflow[{i}]").edge_index.shape[1])
        return edges

    def run_pymatgen() -> int:
        pairs = 0
        for s in structures:
            pairs += len(s.get_neighbor_list(r=cutoff)[0])
        return pairs

    scifm_edges, pmg_pairs = run_scifm(), run_pymatgen()  # warm-up
    times: dict[str, list[float]] = {"scifm CrystalFeaturizer": [], "pymatgen get_neighbor_list(r=5)": []}
    for _ in range(repeats):
        times["scifm CrystalFeaturizer"] += time_repeats(run_scifm, 1)
        times["pymatgen get_neighbor_list(r=5)"] += time_repeats(run_pymatgen, 1)
    out: dict[str, Any] = {
        "num_structures": len(structures),
        "num_sites": sites,
        "cutoff": cutoff,
        "repeats": repeats,
        "scifm_edges_kept": scifm_edges,
        "pymatgen_pairs_within_cutoff": pmg_pairs,
        "results": {},
    }
    rows = []
    for name, ts in times.items():
        rate = len(structures) / median(ts)
        out["results"][name] = {"median_s": median(ts), "times_s": ts, "items_per_s": rate}
        rows.append([name, len(structures), median(ts), rate])
    ratio = (
        out["results"]["scifm CrystalFeaturizer"]["items_per_s"]
        / (out["results"]["pymatgen get_neighbor_list(r=5)"]["items_per_s"])
    )
    out["scifm_vs_neighbor_list"] = ratio
    print_table(
        f"crystals (288 AFLOW prototypes, {sites} sites; median of {repeats})",
        ["featurizer", "crystals", "median s", "crystals/s"],
        rows,
    )
    print(f"  scifm / plain neighbor list throughput: {ratio:.2f}x")
    return out


# ---------------------------------------------------------------------------------- cells


def write_synthetic_h5ad(
    path: Path, *, n_cells: int, n_genes: int, density: float, n_types: int, chunk: int, seed: int
) -> dict[str, Any]:
    """Write a CSR ``.h5ad`` of integer counts chunk by chunk (never the whole matrix in memory).

    Gene detection rates are log-normal around ``density`` (a few genes in most cells, most genes
    in few), each cell gets a log-normal depth factor, and nonzero counts are geometric (>= 1).
    """
    import anndata as ad
    import h5py
    import pandas as pd

    rng = np.random.default_rng(seed)
    gene_p = rng.lognormal(0.0, 1.0, n_genes)
    gene_p = np.clip(gene_p / gene_p.mean() * density, 1e-4, 0.95).astype(np.float32)
    genes = [f"GENE{i:05d}" for i in range(n_genes)]
    types = np.array([f"type_{t}" for t in range(n_types)])
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(types[rng.integers(0, n_types, n_cells)], categories=types)},
        index=pd.Index([f"cell{i:07d}" for i in range(n_cells)]),
    )
    ad.AnnData(obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)  # obs/var, no X yet
    del obs
    gc.collect()
    start = time.perf_counter()
    nnz = 0
    with h5py.File(path, "a") as f:
        group = f.create_group("X")
        group.attrs["encoding-type"] = "csr_matrix"
        group.attrs["encoding-version"] = "0.1.0"
        group.attrs["shape"] = np.array([n_cells, n_genes], dtype=np.int64)
        h5_chunk = (1 << 18,)
        data = group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=h5_chunk)
        indices = group.create_dataset(
            "indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=h5_chunk
        )
        indptr = group.create_dataset("indptr", shape=(n_cells + 1,), dtype=np.int64)
        indptr[0] = 0
        for a in range(0, n_cells, chunk):
            b = min(a + chunk, n_cells)
            depth = rng.lognormal(0.0, 0.3, (b - a, 1)).astype(np.float32)
            mask = rng.random((b - a, n_genes), dtype=np.float32) < gene_p * depth
            rows, cols = np.nonzero(mask)
            del mask
            values = rng.geometric(0.6, rows.size).astype(np.float32)
            counts = np.bincount(rows, minlength=b - a)
            indptr[a + 1 : b + 1] = nnz + np.cumsum(counts)
            data.resize((nnz + rows.size,))
            indices.resize((nnz + rows.size,))
            data[nnz:] = values
            indices[nnz:] = cols.astype(np.int32)
            nnz += rows.size
    return {
        "cells": n_cells,
        "genes": n_genes,
        "nnz": nnz,
        "density": nnz / (n_cells * n_genes),
        "file_bytes": path.stat().st_size,
        "write_s": time.perf_counter() - start,
        "gene_names": genes,
        "cell_types": list(types),
    }


def _whole_file_rss(path: Path) -> dict[str, Any]:
    """Peak RSS of ``anndata.read_h5ad(path)`` (whole file in memory), in a fresh subprocess."""
    # VmHWM, not ru_maxrss: ru_maxrss survives fork+exec and would report this process's peak.
    code = (
        "import json, sys, time\n"
        "def hwm():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmHWM:'): return int(line.split()[1]) / 1024\n"
        "import anndata as ad\n"
        "base = hwm(); t1 = time.perf_counter(); a = ad.read_h5ad(sys.argv[1]); t2 = time.perf_counter()\n"
        "print(json.dumps({'import_rss_mib': base, 'peak_rss_mib': hwm(), 'read_s': t2 - t1, "
        "'shape': list(a.shape), 'nnz': int(a.X.nnz)}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _cell_model(backbone: str, genes: list[str], n_types: int) -> Any:
    from scifm.config import BackboneConfig, ConnectorConfig, EncoderConfig, HeadConfig, ModelConfig
    from scifm.model import ScifmModel

    config = ModelConfig(
        backbone=BackboneConfig(name=backbone, lora_r=8, lora_alpha=16, max_length=64),
        connector=ConnectorConfig(kind="resampler", num_tokens=8),
        encoders=[
            EncoderConfig(
                modality="cell",
                kind="mlp",
                params={"num_genes": len(genes), "hidden_dim": 64, "num_tokens": 8},
                featurizer={"genes": genes, "data": "counts"},
            )
        ],
        head=HeadConfig(kind="classification", num_outputs=n_types),
        stage="instruct",
    )
    return ScifmModel.from_config(config)


def bench_cells(args: argparse.Namespace) -> dict[str, Any]:
    from scifm.data_modules.cell import CellDataModule

    workdir = Path(tempfile.mkdtemp(prefix="scifm-bench-cells-", dir=args.tmpdir))
    try:
        path = workdir / "synthetic.h5ad"
        print(f"\nwriting {args.cells:,} cells x {args.genes:,} genes to {path} ...", flush=True)
        info = write_synthetic_h5ad(
            path,
            n_cells=args.cells,
            n_genes=args.genes,
            density=args.density,
            n_types=args.cell_types,
            chunk=args.write_chunk,
            seed=0,
        )
        genes, types = info.pop("gene_names"), info.pop("cell_types")
        print(
            f"  {info['nnz']:,} nonzero ({info['density']:.1%}), {info['file_bytes'] / 2**30:.2f} GiB, "
            f"written in {info['write_s']:.1f} s",
            flush=True,
        )
        backbone = SMOLLM2
        if args.tiny:
            backbone = str(make_tiny_backbone(workdir / "tiny-llama"))
        model = _cell_model(backbone, genes, len(types))
        dm = CellDataModule(
            str(path),
            template="cell_type",
            streaming=True,
            block_size=args.block_size,
            buffer_blocks=args.buffer_blocks,
            fractions=(1.0, 0.0, 0.0),  # stream every cell through the training split
            batch_size=args.batch_size,
            num_workers=args.workers,
        )
        dm.attach(model)
        gc.collect()
        setup_start = time.perf_counter()
        dm.setup("fit")
        setup_s = time.perf_counter() - setup_start
        stream = dm.streams["train"]
        rss_before = RssSampler().current()
        count = 0
        next_report = 100_000
        start = time.perf_counter()
        with RssSampler() as sampler:
            if args.cells_mode == "stream":
                for _sample in stream:
                    count += 1
                    if count >= next_report:
                        print(
                            f"  {count:,} cells, {count / (time.perf_counter() - start):,.0f}/s", flush=True
                        )
                        next_report += 100_000
            else:
                for batch in dm.train_dataloader():
                    count += len(batch["ids"])
                    if count >= next_report:
                        print(
                            f"  {count:,} cells, {count / (time.perf_counter() - start):,.0f}/s", flush=True
                        )
                        next_report += 100_000
        elapsed = time.perf_counter() - start
        if count != stream.num_rows:
            raise RuntimeError(f"streamed {count} cells, expected {stream.num_rows}")
        result: dict[str, Any] = {
            "file": info,
            "mode": args.cells_mode,
            "backbone_tokenizer": "tiny" if args.tiny else SMOLLM2,
            "block_size": args.block_size,
            "buffer_blocks": args.buffer_blocks,
            "batch_size": args.batch_size,
            "num_workers": args.workers,
            "setup_s": setup_s,
            "streamed_cells": count,
            "stream_s": elapsed,
            "cells_per_s": count / elapsed,
            "rss_before_stream_mib": rss_before,
            "peak_rss_while_streaming_mib": sampler.peak,
            "peak_rss_process_lifetime_mib": peak_rss_mib(),
        }
        in_memory_bytes = info["nnz"] * 8 + (info["cells"] + 1) * 8
        if in_memory_bytes * 3 < _available_bytes():
            print(
                "  reading the whole file with anndata.read_h5ad (subprocess) for comparison ...", flush=True
            )
            result["whole_file"] = _whole_file_rss(path)
        else:
            result["whole_file"] = {
                "skipped": f"the matrix needs ~{in_memory_bytes / 2**30:.1f} GiB, over a third of the "
                f"{_available_bytes() / 2**30:.1f} GiB available"
            }
        rows = [
            [
                f"CellStream -> {'DataLoader+collator' if args.cells_mode == 'loader' else 'samples'}",
                count,
                elapsed,
                count / elapsed,
                f"{sampler.peak:,.0f} (before: {rss_before:,.0f})",
            ]
        ]
        whole = result["whole_file"]
        if "peak_rss_mib" in whole:
            rows.append(
                [
                    "anndata.read_h5ad (whole file)",
                    whole["shape"][0],
                    whole["read_s"],
                    "-",
                    f"{whole['peak_rss_mib']:,.0f} (after import: {whole['import_rss_mib']:,.0f})",
                ]
            )
        print_table(
            f"cells ({info['cells']:,} x {info['genes']:,}, {info['density']:.1%} nonzero, "
            f"{info['file_bytes'] / 2**30:.2f} GiB h5ad; block {args.block_size}, workers {args.workers})",
            ["path", "cells", "seconds", "cells/s", "peak RSS MiB"],
            rows,
        )
        if "skipped" in whole:
            print(f"  whole-file read skipped: {whole['skipped']}")
        return result
    finally:
        if not args.keep_file:
            shutil.rmtree(workdir, ignore_errors=True)


def _available_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


# ---------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only",
        choices=["molecules", "crystals", "cells"],
        action="append",
        help="run only these sections (repeatable; default: all)",
    )
    parser.add_argument(
        "--data",
        action="append",
        help=f"CSV/Parquet file(s) with a smiles column (repeatable; default: {DEFAULT_DATA})",
    )
    parser.add_argument("--repeats", type=int, default=5, help="passes per featurizer (median reported)")
    parser.add_argument("--cells", type=int, default=1_000_000, help="synthetic cells to write and stream")
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--density", type=float, default=0.075, help="fraction of nonzero entries")
    parser.add_argument("--cell-types", type=int, default=20)
    parser.add_argument(
        "--cells-mode",
        choices=["loader", "stream"],
        default="loader",
        help="loader: DataLoader with the model's collator (as training); stream: samples only",
    )
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--buffer-blocks", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (loader mode)")
    parser.add_argument("--write-chunk", type=int, default=8192, help="cells generated per write")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="use a tiny in-code backbone's tokenizer for the cell model instead of SmolLM2",
    )
    parser.add_argument("--tmpdir", default=None, help="where the synthetic h5ad goes (default: system temp)")
    parser.add_argument("--keep-file", action="store_true", help="keep the synthetic h5ad")
    parser.add_argument("--output", default="bench_featurize", help="results/<output>.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_not_shadowed()
    sections = args.only or ["molecules", "crystals", "cells"]
    results: dict[str, Any] = {}
    if "molecules" in sections:
        results["molecules"] = bench_molecules(args.data or [str(DEFAULT_DATA)], args.repeats)
    if "crystals" in sections:
        results["crystals"] = bench_crystals(args.repeats)
    if "cells" in sections:
        results["cells"] = bench_cells(args)
    path = write_results(args.output, results, PACKAGES)
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
