"""Single cells: preprocessing checks, gene alignment, both encoders, in-memory and streamed
data modules, the predict API, and drug response. Every AnnData is built in code."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CELL_GENES, cell_config, train_steps

from scifm.config import EncoderConfig, HeadConfig
from scifm.data_modules.cell import CellDataModule, CellStream, DrugResponseDataModule, drug_response_r2
from scifm.encoders.cell import (
    CellFeaturizer,
    CellItem,
    CellMLPEncoder,
    CellTransformerEncoder,
    as_cell_rows,
    check_expression,
    read_anndata,
    read_gene_list,
)
from scifm.errors import InvalidInputError
from scifm.model import ScifmModel
from scifm.predictor import Predictor

if TYPE_CHECKING:
    from anndata import AnnData

ad = pytest.importorskip("anndata")
sc = pytest.importorskip("scanpy")
sp = pytest.importorskip("scipy.sparse")

GENES = list(CELL_GENES)
TEMPLATE = {"prompt": "What is the cell type of <cell>?", "answer": "{cell_type}", "label": "cell_type"}
ROOT = Path(__file__).resolve().parents[1]


def make_counts(n: int = 20, *, seed: int = 0, genes: list[str] = GENES) -> AnnData:
    """``n`` cells x 50 genes of Poisson counts; "T cell"s express the first half (markers: the
    first 5 genes), "B cell"s the second half (markers: the last 5)."""
    rng = np.random.default_rng(seed)
    types = np.array(["T cell", "B cell"])[np.arange(n) % 2]
    half = len(genes) // 2
    t_rates = np.r_[np.full(5, 20.0), np.full(half - 5, 3.0), np.full(len(genes) - half, 0.2)]
    rates = np.where((types == "T cell")[:, None], t_rates, t_rates[::-1])
    x = sp.csr_matrix(rng.poisson(rates).astype(np.float32))
    obs = pd.DataFrame(
        {"cell_type": types, "donor": [f"d{i % 4}" for i in range(n)]}, index=[f"c{i}" for i in range(n)]
    )
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=list(genes)))


@pytest.fixture
def counts() -> AnnData:
    return make_counts()


@pytest.fixture
def featurizer() -> CellFeaturizer:
    return CellFeaturizer(genes=GENES, data="counts")


# ---------------------------------------------------------------------------- import, real data


def test_import_does_not_load_anndata(tmp_path: Path) -> None:
    code = (
        "import sys, scifm.encoders.cell, scifm.data_modules.cell; "
        "assert 'anndata' not in sys.modules and 'scanpy' not in sys.modules, sorted(sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)


def test_bundled_datasets_load_offline_and_are_checked() -> None:
    pbmc = read_anndata("scanpy:pbmc68k_reduced")
    assert pbmc.shape == (700, 765) and pbmc.obs["bulk_labels"].nunique() == 10
    ok = CellFeaturizer(genes="scanpy:pbmc68k_reduced", use_raw=True, data="log_normalized")
    assert ok.num_genes == 765 and len(ok.rows(pbmc, source="pbmc")) == 700
    scaled = CellFeaturizer(genes="scanpy:pbmc68k_reduced", data="log_normalized")
    with pytest.raises(InvalidInputError, match=r"pbmc.*negative value.*scaled"):
        scaled.rows(pbmc, source="pbmc")
    krumsiek = read_anndata("scanpy:krumsiek11")
    assert krumsiek.shape == (640, 11) and krumsiek.obs["cell_type"].nunique() == 5
    CellFeaturizer(genes="scanpy:krumsiek11", data="processed").rows(krumsiek, source="krumsiek11")
    with pytest.raises(ValueError, match="unknown bundled dataset"):
        read_anndata("scanpy:pbmc3k")


# ---------------------------------------------------------------------------- preprocessing


def test_counts_are_normalized_as_scanpy_does(counts: AnnData, featurizer: CellFeaturizer) -> None:
    expected = counts.copy()
    sc.pp.normalize_total(expected, target_sum=1e4)
    sc.pp.log1p(expected)
    got = torch.stack(
        [featurizer(r, record=str(i)).values for i, r in enumerate(featurizer.rows(counts, source="x"))]
    )
    assert torch.allclose(got, torch.from_numpy(expected.X.toarray()), atol=1e-5)
    # a one-cell AnnData, a mapping and a Series featurize alike
    dense = counts.X[3].toarray()[0]
    for value in (counts[3], dict(zip(GENES, dense, strict=True)), pd.Series(dense, index=GENES)):
        assert torch.allclose(featurizer(value, record="r").values, got[3], atol=1e-6)


def test_log_normalized_and_layers(counts: AnnData) -> None:
    counts.layers["counts"] = counts.X.copy()
    sc.pp.normalize_total(counts, target_sum=1e4)
    sc.pp.log1p(counts)
    from_x = CellFeaturizer(genes=GENES, data="log_normalized")
    from_layer = CellFeaturizer(genes=GENES, data="counts", layer="counts")
    a = from_x(counts[5], record="r").values
    assert torch.allclose(a, from_layer(counts[5], record="r").values, atol=1e-5)
    with pytest.raises(InvalidInputError, match=r"no layer 'spliced'; layers: \['counts'\]"):
        CellFeaturizer(genes=GENES, layer="spliced")(counts[0], record="r")


@pytest.mark.parametrize(
    ("data", "edit", "message"),
    [
        ("counts", (2, 7, np.nan), r"'pbmc.h5ad'.*1 NaN.*cell c2, gene G7"),
        ("counts", (4, 1, -1.0), r"'pbmc.h5ad'.*negative value.*cell c4, gene G1.*scaled"),
        ("processed", (2, 7, np.inf), r"NaN or infinite"),
        ("counts", (0, 0, 1.5), r"declares raw counts.*non-integer.*1\.5.*data: log_normalized"),
        ("log_normalized", (0, 0, 3.0), r"log_normalized was declared.*look like raw counts.*data: counts"),
    ],
)
def test_bad_matrices_are_refused(
    counts: AnnData, data: str, edit: tuple[int, int, float], message: str
) -> None:
    row, col, value = edit
    x = counts.X.toarray()
    x[row, col] = value
    bad = counts.copy()
    bad.X = sp.csr_matrix(x)
    feat = CellFeaturizer(genes=GENES, data=data)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=message):
        feat.rows(bad, source="pbmc.h5ad")
    # the same checks guard single cells (the predict API), naming the record
    with pytest.raises(InvalidInputError, match=r"'cells\[0\]'"):
        feat(bad[row], record="cells[0]")


def test_negative_values_are_fine_when_processed(counts: AnnData) -> None:
    x = counts.X.toarray() - 1.0
    check_expression(x, data="processed", source="scaled")
    with pytest.raises(InvalidInputError, match="negative"):
        check_expression(x, data="log_normalized", source="scaled")


def test_duplicate_genes_and_empty_cells_are_refused(counts: AnnData, featurizer: CellFeaturizer) -> None:
    dup = counts.copy()
    dup.var_names = ["G1", *GENES[1:]]
    with pytest.raises(
        InvalidInputError, match=r"'ds'.*duplicate gene name.*\['G1'\].*var_names_make_unique"
    ):
        featurizer.rows(dup, source="ds")
    with pytest.raises(ValueError, match="duplicate gene"):
        CellFeaturizer(genes=["A", "B", "A"])
    with pytest.raises(InvalidInputError, match="no counts"):
        featurizer({"G1": 0.0, "G2": 0.0}, record="empty")
    with pytest.raises(InvalidInputError, match=r"'r'.*AnnData of 20 cells.*adata\[i\]"):
        featurizer(counts, record="r")
    with pytest.raises(InvalidInputError, match="bare vector has no gene names"):
        featurizer(np.ones(50), record="r")
    with pytest.raises(ValueError, match="needs genes="):
        CellFeaturizer()


def test_missing_obs_column_names_the_file(llama_dir: Path, tmp_path: Path, counts: AnnData) -> None:
    counts.write_h5ad(tmp_path / "cells.h5ad")
    model = ScifmModel.from_config(cell_config(llama_dir))
    dm = CellDataModule(
        str(tmp_path / "cells.h5ad"), template={**TEMPLATE, "label": "celltype", "answer": "{celltype}"}
    )
    dm.attach(model)
    with pytest.raises(InvalidInputError, match=r"'cells.h5ad'.*no column\(s\) \['celltype'\].*'cell_type'"):
        dm.setup("fit")


# ---------------------------------------------------------------------------- gene vocabulary


def test_alignment_by_name_zero_fills_and_reports(counts: AnnData, featurizer: CellFeaturizer) -> None:
    # the model knows 40 of the data's genes plus 10 it lacks
    model_genes = GENES[10:] + [f"X{i}" for i in range(10)]
    feat = CellFeaturizer(genes=model_genes, min_coverage=0.9)
    with pytest.warns(UserWarning, match=r"40 of the model's 50 genes found \(80.0%\).*below min_coverage"):
        item = feat(counts[0], record="r")
    full = featurizer(counts[0], record="r").values
    # normalization uses all the cell's genes, then alignment picks and zero-fills
    assert torch.allclose(item.values[:40], full[10:]) and (item.values[40:] == 0).all()
    assert feat.coverage(GENES) == pytest.approx(0.8)
    with pytest.raises(InvalidInputError, match=r"none of its 2 genes.*gene_column"):
        feat({"ENSG1": 1.0, "ENSG2": 2.0}, record="r")


def test_gene_order_does_not_matter(counts: AnnData, featurizer: CellFeaturizer) -> None:
    perm = np.random.default_rng(1).permutation(len(GENES))
    shuffled = counts[:, perm].copy()
    a = torch.stack([featurizer(counts[i], record="r").values for i in range(5)])
    b = torch.stack([featurizer(shuffled[i], record="r").values for i in range(5)])
    assert torch.equal(a, b)


def test_ensembl_ids_match_across_versions() -> None:
    feat = CellFeaturizer(genes=["ENSG00000141510.17", "ENSG00000012048.20"], data="log_normalized")
    item = feat({"ENSG00000141510.16": 1.5, "ENSG00000012048": 0.5}, record="r")
    assert item.values.tolist() == [1.5, 0.5]


def test_gene_lists_from_files_and_config_round_trip(tmp_path: Path, counts: AnnData) -> None:
    (tmp_path / "genes.txt").write_text("# HVGs\nG3\nG1\n\nG2  # a comment\n")
    assert read_gene_list(tmp_path / "genes.txt") == ["G3", "G1", "G2"]
    counts.var["gene_ids"] = [f"ENSG{i:011d}" for i in range(50)]
    counts.write_h5ad(tmp_path / "ref.h5ad")
    assert read_gene_list(str(tmp_path / "ref.h5ad")) == GENES
    feat = CellFeaturizer(genes=str(tmp_path / "ref.h5ad"), gene_column="gene_ids")
    assert feat.genes[0] == "ENSG00000000000"
    hvg = CellFeaturizer(genes=str(tmp_path / "ref.h5ad"), n_top_genes=10)
    assert hvg.num_genes == 10 and set(hvg.genes) <= set(GENES)
    config = hvg.config()
    assert config["genes"] == hvg.genes and config["n_top_genes"] is None
    json.dumps(config)  # plain data: lands in config.json
    clone = CellFeaturizer(**config)
    assert clone.genes == hvg.genes
    clone(counts[0], record="r")
    restored = pickle.loads(pickle.dumps(clone))
    assert torch.equal(restored(counts[0], record="r").values, clone(counts[0], record="r").values)


# ---------------------------------------------------------------------------- encoders


def test_mlp_encoder_shapes(featurizer: CellFeaturizer, counts: AnnData) -> None:
    items = [featurizer(counts[i], record="r") for i in range(4)]
    enc = CellMLPEncoder(num_genes=50, hidden_dim=16, num_tokens=3)
    tokens, mask = enc(CellMLPEncoder.collate(items))
    assert tokens.shape == (4, 3, 16) and mask.shape == (4, 3) and mask.all()
    assert enc.out_dim == 16
    with pytest.raises(ValueError, match=r"50 genes per cell but the encoder was built with num_genes=40"):
        CellMLPEncoder(num_genes=40)(CellMLPEncoder.collate(items))


def test_transformer_encoder_masks_unexpressed_genes(featurizer: CellFeaturizer) -> None:
    enc = CellTransformerEncoder(num_genes=50, hidden_dim=16, top_k=6, num_heads=2, num_layers=1).eval()
    few = featurizer({"G3": 5.0, "G7": 1.0}, record="few")  # two expressed genes
    many = featurizer({g: float(i + 1) for i, g in enumerate(GENES)}, record="many")
    batch = CellTransformerEncoder.collate([few, many])
    tokens, mask = enc(batch)
    assert tokens.shape == (2, 6, 16)
    assert mask.tolist() == [[True, True, False, False, False, False], [True] * 6]
    assert (tokens[0, 2:] == 0).all()
    genes, _, _ = enc.select(batch["values"])
    assert genes[0, :2].tolist() == [3, 7] and genes[1].tolist() == [49, 48, 47, 46, 45, 44]
    # a cell alone encodes the same as within a batch
    alone, _ = enc(CellTransformerEncoder.collate([few]))
    assert torch.allclose(alone[0], tokens[0], atol=1e-5)
    with pytest.raises(ValueError, match="tokens_per_cell"):
        CellTransformerEncoder.item_tokens(few)
    counted = CellItem(few.values, num_tokens=6)
    assert CellTransformerEncoder.item_tokens(counted) == 2 and CellMLPEncoder.item_tokens(counted) == 6


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_mlp_connector_needs_token_counts(kind: str, llama_dir: Path, counts: AnnData) -> None:
    tokens = 3 if kind == "mlp" else 6
    cfg = cell_config(llama_dir, kind=kind, connector="mlp", featurizer={"tokens_per_cell": tokens})
    predictor = Predictor(ScifmModel.from_config(cfg), device="cpu")
    out = predictor.generate(["What is <cell>?"] * 2, cells=counts[:2], max_new_tokens=2)
    assert len(out) == 2
    wrong = cell_config(llama_dir, kind=kind, connector="mlp", featurizer={"tokens_per_cell": tokens + 1})
    with pytest.raises(ValueError, match=r"tokens_per_cell=\d but the encoder's"):
        Predictor(ScifmModel.from_config(wrong), device="cpu").embed(cells=counts[:2])


# ---------------------------------------------------------------------------- training, predicting


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_cell_type_classification_and_gene_order_invariant_predict(
    kind: str, llama_dir: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    make_counts(24).write_h5ad(tmp_path / "cells.h5ad")
    head = HeadConfig(kind="classification", num_outputs=2, labels=["B cell", "T cell"])
    model = ScifmModel.from_config(cell_config(llama_dir, kind=kind, head=head, lm_loss_weight=0.1))
    dm = CellDataModule(
        str(tmp_path / "cells.h5ad"),
        template=TEMPLATE,
        batch_size=12,
        split="group",
        group_column="donor",
        fractions=(0.5, 0.25, 0.25),
    )
    dm.attach(model)
    dm.setup("fit")
    assert dm.classes == ["B cell", "T cell"]
    train_donors = {s.id for s in dm.datasets["train"].samples}
    assert len(train_donors) == 12 and not train_donors & {s.id for s in dm.datasets["test"].samples}
    losses = train_steps(model, list(dm.train_dataloader()), steps=40, lr=3e-3)
    assert losses[-1] < 0.5 * losses[0], losses

    saved = model.save_pretrained(tmp_path / "model")
    stored = json.loads((saved / "config.json").read_text())["model"]["encoders"][0]["featurizer"]
    assert stored["genes"] == GENES
    predictor = Predictor(ScifmModel.from_pretrained(saved), device="cpu", batch_size=4)
    test = make_counts(10, seed=5)
    probs = predictor.predict(["What is the cell type of <cell>?"] * 10, cells=test)
    accuracy = (probs.argmax(1).numpy() == (test.obs["cell_type"] == "T cell").to_numpy()).mean()
    assert accuracy >= 0.9
    # the same cells with the genes in another order (and a file path) give the same answer
    perm = np.random.default_rng(2).permutation(len(GENES))
    test[:, perm].copy().write_h5ad(tmp_path / "shuffled.h5ad")
    again = predictor.predict(
        ["What is the cell type of <cell>?"] * 10, cells=str(tmp_path / "shuffled.h5ad")
    )
    assert torch.allclose(probs, again, atol=1e-6)


def test_predictor_accepts_anndata_paths_and_mixed_prompts(
    llama_dir: Path, tmp_path: Path, counts: AnnData
) -> None:
    mol = EncoderConfig(modality="molecule", kind="gine", params={"hidden_dim": 16, "num_layers": 2})
    cfg = cell_config(llama_dir, extra=[mol], head=HeadConfig(kind="regression", num_outputs=1))
    model = ScifmModel.from_config(cfg)
    model.save_pretrained(tmp_path / "m")
    predictor = Predictor(ScifmModel.from_pretrained(tmp_path / "m"), device="cpu", batch_size=3)
    counts.write_h5ad(tmp_path / "cells.h5ad")

    emb = predictor.embed(cells=counts)
    assert emb.shape == (20, 32)
    assert torch.allclose(predictor.embed(cells=str(tmp_path / "cells.h5ad")), emb, atol=1e-5)
    assert torch.allclose(predictor.embed(cells=[counts[4]])[0], emb[4], atol=1e-5)

    prompts = ["Does <mol> change <cell>?", "Compare <cell> and <cell>.", "What is <mol>?"]
    cells = [counts[0], counts[1:3], None]
    out = predictor.generate(prompts, cells=cells, molecules=["CCO", None, "c1ccccc1O"], max_new_tokens=3)
    assert len(out) == 3
    values = predictor.predict(prompts, cells=cells, molecules=["CCO", None, "c1ccccc1O"])
    assert values.shape == (3, 1)
    with pytest.raises(InvalidInputError, match=r"cells\[0\].*negative"):
        predictor.embed(cells=[{"G1": -1.0, "G2": 3.0}])
    with pytest.raises(ValueError, match="2 prompts but 20 entries"):
        predictor.generate(["<cell>", "<cell>"], cells=counts)
    with pytest.raises(TypeError, match="wrap a single cell in a list"):
        as_cell_rows({"G1": 1.0})


# ---------------------------------------------------------------------------- streaming


@pytest.fixture
def big_file(tmp_path: Path) -> Path:
    path = tmp_path / "atlas.h5ad"
    make_counts(600, seed=3).write_h5ad(path)
    return path


def _no_whole_file_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Fail on any in-memory read of an h5ad; record the rows of each block read."""
    sizes: list[int] = []
    original = CellStream._read_rows

    def spy(self: CellStream, start: int, stop: int) -> Any:
        sizes.append(stop - start)
        return original(self, start, stop)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("streaming must not read the whole file")

    monkeypatch.setattr(CellStream, "_read_rows", spy)
    monkeypatch.setattr(ad, "read_h5ad", refuse)
    monkeypatch.setattr("scifm.data_modules.cell.read_anndata", refuse)
    return sizes


def test_streaming_reads_blocks_and_shards(
    llama_dir: Path, big_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = _no_whole_file_reads(monkeypatch)
    model = ScifmModel.from_config(cell_config(llama_dir))
    dm = CellDataModule(
        str(big_file), template=TEMPLATE, streaming=True, block_size=64, buffer_blocks=2, batch_size=16
    )
    dm.attach(model)
    dm.setup("fit")
    stream = dm.streams["train"]
    assert stream.num_rows == 8 * 64 - 64 + 24 or stream.num_rows % 64 in (0, 24)
    first = [s.id for s in stream]
    second = [s.id for s in stream]
    assert len(first) == len(set(first)) == stream.num_rows and set(first) == set(second)
    assert first != second  # reshuffled each pass
    assert sizes and max(sizes) <= 64 and sum(sizes) == 2 * stream.num_rows
    assert all(s.target in (0, 1) and s.answer in ("T cell", "B cell") for s in stream)

    # every block goes to exactly one of 2 ranks x 2 workers; ranks get equal full blocks
    shards = {
        (r, w): stream.shard(worker=w, num_workers=2, rank=r, world_size=2, epoch=0)
        for r in (0, 1)
        for w in (0, 1)
    }
    flat = [b for blocks in shards.values() for b in blocks]
    assert len(flat) == len(set(flat)) and all(b - a == 64 for a, b in flat)
    per_rank = [sum(b - a for w in (0, 1) for a, b in shards[(r, w)]) for r in (0, 1)]
    assert per_rank[0] == per_rank[1] > 0

    # DataLoader workers each open the file and read disjoint blocks
    monkeypatch.undo()
    dm.num_workers = 2
    ids = [i for batch in dm.train_dataloader() for i in batch["ids"]]
    assert sorted(ids) == sorted(first)


def test_training_on_a_streamed_file(
    llama_dir: Path, big_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lightning as L

    from scifm.module import ScifmModule

    sizes = _no_whole_file_reads(monkeypatch)
    torch.manual_seed(0)
    head = HeadConfig(kind="classification", num_outputs=2)
    module = ScifmModule(model=cell_config(llama_dir, head=head))
    dm = CellDataModule(str(big_file), template=TEMPLATE, streaming=True, block_size=64, batch_size=8)
    trainer = L.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        val_check_interval=4,
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 4
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert "val/loss" in trainer.callback_metrics
    assert max(sizes) <= 64


def test_streaming_refuses_column_major_files(llama_dir: Path, tmp_path: Path) -> None:
    adata = make_counts(40)
    adata.X = adata.X.tocsc()
    adata.write_h5ad(tmp_path / "csc.h5ad")
    dm = CellDataModule(str(tmp_path / "csc.h5ad"), template=TEMPLATE, streaming=True, block_size=8)
    dm.attach(ScifmModel.from_config(cell_config(llama_dir)))
    with pytest.raises(InvalidInputError, match=r"CSC.*tocsr"):
        dm.setup("fit")


# ---------------------------------------------------------------------------- drug response

DRUGS = {"CCO": (0, 1, 2), "c1ccccc1O": (3, 4, 5), "CC(=O)O": (6, 7, 8)}  # genes up, up, down
DR_GENES = [f"G{i}" for i in range(12)]


def make_screen(*, cells_per_condition: int = 6, seed: int = 0) -> tuple[AnnData, dict[str, np.ndarray]]:
    """Counts of two cell lines under three drugs at two doses, and the true log-fold changes."""
    rng = np.random.default_rng(seed)
    base = {"A": np.full(12, 30.0), "B": np.linspace(15.0, 45.0, 12)}
    rows, obs = [], []
    for line, rate in base.items():
        for _ in range(3 * cells_per_condition):
            rows.append(rng.poisson(rate))
            obs.append({"smiles": "CS(C)=O", "dose": 0.0, "time": 24, "control": True, "cell_line": line})
        for smiles, (u1, u2, d) in DRUGS.items():
            for dose in (1.0, 10.0):
                lfc = np.zeros(12)
                lfc[[u1, u2]], lfc[d] = 1.5 * dose / 10 + 0.5, -(1.5 * dose / 10 + 0.5)
                for _ in range(cells_per_condition):
                    rows.append(rng.poisson(rate * np.exp(lfc)))
                    obs.append(
                        {"smiles": smiles, "dose": dose, "time": 24, "control": False, "cell_line": line}
                    )
    frame = pd.DataFrame(obs, index=[f"cell{i}" for i in range(len(obs))])
    return ad.AnnData(
        X=sp.csr_matrix(np.asarray(rows, dtype=np.float32)), obs=frame, var=pd.DataFrame(index=DR_GENES)
    ), base


def test_drug_response_r2_against_baselines() -> None:
    rng = np.random.default_rng(0)
    control = rng.normal(2.0, 1.0, 40)
    effect = np.zeros(40)
    effect[:5] = 2.0
    true = control + effect + rng.normal(0, 0.05, (30, 40))
    perfect = drug_response_r2(true, true, control, top_de=5)
    assert perfect["r2_all"] == pytest.approx(1.0) and perfect["r2_de"] == pytest.approx(1.0)
    unchanged = drug_response_r2(np.broadcast_to(control, true.shape), true, control, top_de=5)
    assert unchanged["r2_de"] == pytest.approx(unchanged["r2_de_no_change"]) and unchanged["r2_de"] < 0
    groups = ["a"] * 15 + ["b"] * 15
    assert drug_response_r2(true, true, control, groups=groups)["num_conditions"] == 2


def test_drug_response_training_beats_no_change(llama_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    screen, _ = make_screen()
    screen.write_h5ad(tmp_path / "screen.h5ad")
    mol = EncoderConfig(modality="molecule", kind="gine", params={"hidden_dim": 16, "num_layers": 2})
    cfg = cell_config(
        llama_dir,
        genes=DR_GENES,
        extra=[mol],
        stage="full",
        lm_loss_weight=0.1,
        head=HeadConfig(kind="regression", num_outputs=12),
    )
    model = ScifmModel.from_config(cfg)
    dm = DrugResponseDataModule(
        str(tmp_path / "screen.h5ad"),
        template="cell_drug_response",
        top_genes=2,
        fractions=(0.75, 0.25, 0.0),
        batch_size=12,
    )
    dm.attach(model)
    dm.setup("fit")
    train_set, val_set = dm.datasets["train"].samples, dm.datasets["val"].samples
    assert len(train_set) + len(val_set) == 72 and len(train_set[0].target) == 12
    first = train_set[0]
    assert first.answer is not None and first.answer.startswith("Up: ") and "Down: " in first.answer
    assert (
        "after 24 h of <mol>" in first.prompt
        and len(first.items["cell"]) == len(first.items["molecule"]) == 1
    )

    train_steps(model, list(dm.train_dataloader()), steps=30, lr=3e-3)
    with torch.no_grad():
        batch = model.collator()(val_set)
        pred_delta = model(batch).head_output.numpy()
    true_delta = np.asarray([s.target for s in val_set])
    control = np.stack([dm.control_means[dm.cell_line_of[s.id]] for s in val_set])
    conditions = [dm.condition_of[s.id] for s in val_set]
    scores = drug_response_r2(
        control + pred_delta, control + true_delta, control, top_de=6, groups=conditions
    )
    mse, mse_zero = float(((pred_delta - true_delta) ** 2).mean()), float((true_delta**2).mean())
    assert mse < 0.5 * mse_zero, (mse, mse_zero)
    assert scores["r2_de"] > scores["r2_de_no_change"] + 0.3, scores
    assert scores["r2_de"] > scores["r2_de_mean_effect"], scores


def test_drug_response_needs_a_matching_head(llama_dir: Path, tmp_path: Path) -> None:
    screen, _ = make_screen(cells_per_condition=1)
    screen.write_h5ad(tmp_path / "s.h5ad")
    mol = EncoderConfig(modality="molecule", kind="gine", params={"hidden_dim": 16, "num_layers": 1})
    cfg = cell_config(
        llama_dir, genes=DR_GENES, extra=[mol], head=HeadConfig(kind="regression", num_outputs=3)
    )
    dm = DrugResponseDataModule(str(tmp_path / "s.h5ad"))
    with pytest.raises(ValueError, match="num_outputs = 12"):
        dm.attach(ScifmModel.from_config(cfg))


# ---------------------------------------------------------------------------- configs


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("cell_*.yaml")))
def test_cell_configs_parse(
    config: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from scifm.cli import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["scifm"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", f"configs/{config}", "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "scifm.data_modules.cell." in capsys.readouterr().out
