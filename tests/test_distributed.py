"""DDP on 2 CPU processes (gloo) gives the single-process result for the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from scifm.cli import main
from scifm.export import checkpoint_kind
from scifm.model import ScifmModel
from scifm.sampling import GlobalBatchSampler

SCRIPT = Path(__file__).with_name("_ddp_train.py")
SMILES = [
    "CCO",
    "c1ccccc1",
    "c1ccccc1O",
    "Cc1ccccc1",
    "CC(=O)O",
    "C1CCCCC1",
    "OC1CCCCC1",
    "CCCC",
    "c1ccncc1",
    "CC(C)O",
    "c1ccc2ccccc2c1",
    "CCN",
    "CCCl",
    "OCCO",
    "CC#N",
    "NC(=O)N",
]


def _run(
    tmp_path: Path,
    backbone: Path,
    data: Path,
    *,
    devices: int,
    batch_size: int,
    strategy: str = "ddp",
    extra: tuple[str, ...] = (),
) -> tuple[dict, float]:
    """Train in a subprocess, save with save_pretrained_from, and return the reloaded weights + loss."""
    out = tmp_path / f"weights-{strategy}-{devices}.safetensors"
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--backbone",
        str(backbone),
        "--data",
        str(data),
        "--devices",
        str(devices),
        "--batch_size",
        str(batch_size),
        "--out",
        str(out),
        "--strategy",
        strategy,
        "--save_dir",
        str(tmp_path / f"saved-{strategy}-{devices}"),
        "--ckpt",
        str(tmp_path / f"ckpt-{strategy}-{devices}.ckpt"),
        *extra,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(out)), json.loads(out.with_suffix(".json").read_text())["loss"]


@pytest.mark.parametrize(("strategy", "nan_at_step"), [("ddp", None), ("fsdp", None), ("ddp", 1)])
def test_two_processes_match_one_process(
    strategy: str, nan_at_step: int | None, llama_dir: Path, tmp_path: Path
) -> None:
    """DDP, and FSDP2 (ModelParallelStrategy + configure_model), on 2 CPU processes (gloo):
    same weights and loss as one process with the same global batch; the sharded run's
    weights are gathered into a directory that loads on a single device. With a NaN loss on
    one rank at one step, every rank skips that step, as one process does."""
    data = tmp_path / "mols.csv"
    rows = [(s, float(i % 5) - 2.0, "yes" if i % 2 else "no") for i, s in enumerate(SMILES)]
    pd.DataFrame(rows, columns=["smiles", "expt", "label"]).to_csv(data, index=False)
    extra = ("--nan_at_step", str(nan_at_step)) if nan_at_step is not None else ()
    single, loss_single = _run(tmp_path, llama_dir, data, devices=1, batch_size=4, extra=extra)
    ddp, loss_ddp = _run(tmp_path, llama_dir, data, devices=2, batch_size=2, strategy=strategy, extra=extra)
    assert single.keys() == ddp.keys() and single
    for name, value in single.items():
        assert torch.allclose(value, ddp[name], atol=2e-5, rtol=1e-4), name
    assert abs(loss_single - loss_ddp) < 1e-5
    # and training did something
    assert any(float(v.abs().sum()) > 0 for n, v in single.items() if "lora_B" in n)
    # the Lightning checkpoints (one file; a sharded directory under FSDP2) export, on one
    # process, to the same model that the end-of-fit save wrote
    for devices, kind in ((1, "file"), (2, "fsdp" if strategy == "fsdp" else "file")):
        ckpt = tmp_path / f"ckpt-{strategy if devices > 1 else 'ddp'}-{devices}.ckpt"
        assert checkpoint_kind(ckpt) == kind
        main(["export", str(ckpt), "--output_dir", str(tmp_path / f"exported-{devices}")])
        exported = dict(ScifmModel.from_pretrained(tmp_path / f"exported-{devices}").named_parameters())
        saved = single if devices == 1 else ddp
        for name, value in saved.items():
            assert torch.equal(exported[name].detach(), value), name
    if nan_at_step is not None:  # the fault was real: without it the weights differ
        clean, _ = _run(tmp_path, llama_dir, data, devices=1, batch_size=4)
        assert any(not torch.equal(clean[n], single[n]) for n in clean)


def test_global_batches_are_the_same_for_any_world_size() -> None:
    one = list(GlobalBatchSampler(10, batch_size=4, shuffle=True, seed=1))
    ranks = [
        list(GlobalBatchSampler(10, batch_size=2, shuffle=True, seed=1, rank=r, world_size=2)) for r in (0, 1)
    ]
    assert [a + b for a, b in zip(*ranks, strict=True)] == one
    assert sorted({i for batch in one for i in batch}) == list(range(10))
    sampler = GlobalBatchSampler(10, batch_size=4, shuffle=True, seed=1)
    sampler.set_epoch(1)
    assert list(sampler) != one  # a new order each epoch
    sampler.load_state_dict({"epoch": 0, "start_batch": 2, "seed": 1})
    assert list(sampler) == one[2:]


def test_export_refuses_what_is_not_a_scifm_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a Lightning checkpoint"):
        main(["export", str(tmp_path / "missing.ckpt"), "--output_dir", str(tmp_path / "out")])
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}, "hyper_parameters": {"lr": 1}}, foreign)
    with pytest.raises(ValueError, match="no scifm model config"):
        main(["export", str(foreign), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
