"""Crystal featurizers, CGCNN and CHGNet encoders, the crystal data module and CIF validity.

Fixtures are built in code (Si diamond, CsCl, NaCl, a disordered alloy); files only under
``tmp_path``; the AFLOW prototypes come with pymatgen; CHGNet's weights with its wheel.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("pymatgen.core")
pytest.importorskip("torch_geometric")

from pymatgen.core import Lattice, Molecule, Structure

from scifm.config import BackboneConfig, ConnectorConfig, EncoderConfig, HeadConfig, ModelConfig
from scifm.data_modules.crystal import AFLOW_PROTOTYPES, CrystalDataModule, aflow_prototype_rows
from scifm.encoders.crystal import (
    CGCNNEncoder,
    CrystalFeaturizer,
    check_structure,
    cif_validity,
    parse_structure,
    read_structure,
)
from scifm.errors import InvalidInputError
from scifm.model import ScifmModel
from scifm.predictor import Predictor

SI_BOND = 5.431 * 3**0.5 / 4  # 2.3517 Å
CSCL_BOND = 4.12 * 3**0.5 / 2  # 3.5680 Å


def si_diamond() -> Structure:
    """Conventional cubic cell of diamond-structure silicon (8 atoms)."""
    return Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.431), ["Si"], [[0, 0, 0]])


def cscl() -> Structure:
    return Structure(Lattice.cubic(4.12), ["Cs", "Cl"], [[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]])


def nacl() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def crystal_config(
    backbone_dir: Path,
    *,
    kind: str = "cgcnn",
    head: str = "none",
    stage: str = "instruct",
    with_molecules: bool = False,
    max_length: int = 96,
) -> ModelConfig:
    params: dict[str, Any] = (
        {"hidden_dim": 16, "num_layers": 2, "num_gaussians": 16} if kind == "cgcnn" else {}
    )
    featurizer: dict[str, Any] = {"num_gaussians": 16} if kind == "cgcnn" else {}
    encoders = [EncoderConfig(modality="crystal", kind=kind, params=params, featurizer=featurizer)]
    if with_molecules:
        encoders.append(
            EncoderConfig(modality="molecule", kind="gine", params={"hidden_dim": 16, "num_layers": 2})
        )
    return ModelConfig(
        backbone=BackboneConfig(
            name=str(backbone_dir), lora_r=4, lora_alpha=8, lora_dropout=0.0, max_length=max_length
        ),
        connector=ConnectorConfig(kind="resampler", num_tokens=4, num_heads=2),
        encoders=encoders,
        head=HeadConfig(kind=head, num_outputs=1) if head != "none" else HeadConfig(),  # type: ignore[arg-type]
        stage=stage,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def cgcnn_model(llama_dir: Path) -> ScifmModel:
    torch.manual_seed(0)
    return ScifmModel.from_config(crystal_config(llama_dir))


# ---------------------------------------------------------------- graphs


def test_import_does_not_load_pymatgen(tmp_path: Path) -> None:
    code = (
        "import sys, scifm.encoders.crystal, scifm.data_modules.crystal; "
        "heavy = [m for m in ('pymatgen', 'torch_geometric', 'chgnet') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)


def _incoming(data: Any, node: int) -> torch.Tensor:
    """Sorted distances of the edges into ``node``."""
    return data.edge_dist[data.edge_index[1] == node].sort().values


def test_si_diamond_has_four_nearest_neighbours() -> None:
    data = CrystalFeaturizer(cutoff=3.0)(si_diamond(), record="Si")
    assert data.num_nodes == 8 and data.z.tolist() == [14] * 8
    assert data.edge_index.shape == (2, 32)
    for node in range(8):
        assert torch.allclose(_incoming(data, node), torch.full((4,), SI_BOND), atol=1e-3)
    # default 5 Å cutoff: 4 + 12 + 12 neighbours within 5 Å, capped to the 12 nearest
    data = CrystalFeaturizer()(si_diamond(), record="Si")
    for node in range(8):
        dists = _incoming(data, node)
        assert len(dists) == 12
        assert torch.allclose(dists[:4], torch.full((4,), SI_BOND), atol=1e-3)
        assert torch.allclose(dists[4:], torch.full((8,), 5.431 / 2**0.5), atol=1e-3)


def test_cscl_has_eight_nearest_neighbours() -> None:
    data = CrystalFeaturizer(max_neighbors=8)(cscl(), record="CsCl")
    assert data.z.tolist() == [55, 17] and data.edge_index.shape == (2, 16)
    for node in range(2):
        assert torch.allclose(_incoming(data, node), torch.full((8,), CSCL_BOND), atol=1e-3)
        sources = data.edge_index[0, data.edge_index[1] == node]
        assert (sources == 1 - node).all()  # Cs sees only Cl, Cl only Cs
    # 14 neighbours within 5 Å (8 at 3.57, 6 at 4.12): the cap keeps the 8 and 4 of the 6
    data = CrystalFeaturizer()(cscl(), record="CsCl")
    dists = _incoming(data, 0)
    assert len(dists) == 12 and (dists[:8] - CSCL_BOND).abs().max() < 1e-3
    assert (dists[8:] - 4.12).abs().max() < 1e-3


def test_edge_features_and_vectors() -> None:
    featurizer = CrystalFeaturizer(cutoff=4.0, num_gaussians=9, edge_vectors=True)
    data = featurizer(nacl(), record="NaCl")
    assert data.edge_attr.shape == (data.edge_index.shape[1], 9) and data.edge_attr.dtype == torch.float32
    assert torch.allclose(data.edge_vec.norm(dim=-1), data.edge_dist, atol=1e-4)
    # the Gaussian nearest to each distance lights up most (centres every 0.5 Å)
    assert (data.edge_attr.argmax(-1) == (data.edge_dist / 0.5).round().long()).all()
    assert "edge_vec" not in CrystalFeaturizer()(nacl(), record="NaCl")


def test_every_input_form_gives_the_same_graph(tmp_path: Path) -> None:
    structure = nacl()
    (tmp_path / "nacl.cif").write_text(structure.to(fmt="cif"))
    (tmp_path / "POSCAR").write_text(structure.to(fmt="poscar"))
    featurizer = CrystalFeaturizer()
    reference = featurizer(structure, record="ref")
    for i, value in enumerate(
        [
            structure.to(fmt="cif"),
            structure.to(fmt="poscar"),
            structure.as_dict(),
            str(tmp_path / "nacl.cif"),
            tmp_path / "POSCAR",
        ]
    ):
        data = featurizer(value, record=f"form{i}")
        assert torch.equal(data.z, reference.z), i
        assert torch.allclose(data.edge_dist.sort().values, reference.edge_dist.sort().values, atol=1e-4), i


def test_invalid_inputs_name_the_record(tmp_path: Path) -> None:
    featurizer = CrystalFeaturizer()
    disordered = Structure(Lattice.cubic(3.6), [{"Fe": 0.5, "Ni": 0.5}], [[0, 0, 0]])
    overlapping = Structure(Lattice.cubic(5.0), ["Na", "Cl"], [[0.0, 0.0, 0.0], [0.05, 0.0, 0.0]])
    (tmp_path / "empty.cif").write_text("")
    cases = [
        ("data_broken\n_cell_length_a 4.0\nloop_\n_atom_site_label\n", r"cannot read .* CIF"),
        ("", "empty"),
        ("   ", "empty"),
        (Structure(Lattice.cubic(4.0), [], []), "no atoms"),
        (disordered, r"partial occupancies.*site 0 \(Fe0.5 Ni0.5\)"),
        (overlapping, r"atoms overlap: sites 0 \(Na\) and 1 \(Cl\) are 0.250 Å apart"),
        (Structure(Lattice.cubic(0.3), ["Po"], [[0, 0, 0]]), "periodic image"),
        ("no_such_file.cif", "not an existing file"),
        (tmp_path / "missing.cif", "no such file"),
        (str(tmp_path / "empty.cif"), "is empty"),
        (None, "None"),
        (42, "got int"),
        ({"lattice": "nonsense"}, "cannot read the dict"),
        (Molecule(["H", "H"], [[0.0, 0.0, 0.0], [0.0, 0.0, 0.74]]), "Molecule"),
    ]
    for k, (value, pattern) in enumerate(cases):
        with pytest.raises(InvalidInputError, match=pattern) as info:
            featurizer(value, record=f"rows[{k}]")
        assert info.value.record == f"rows[{k}]"
        assert f"rows[{k}]" in str(info.value)
    # the threshold is configurable; a sparse cell is not an error
    check_structure(overlapping, record="x", min_distance=0.2)
    assert len(parse_structure(Structure(Lattice.cubic(20.0), ["Ar"], [[0, 0, 0]]), record="gas")) == 1


def test_multi_block_cif_is_refused() -> None:
    text = nacl().to(fmt="cif") + "\n" + cscl().to(fmt="cif").replace("data_CsCl", "data_second")
    with pytest.raises(InvalidInputError, match="2 structures"):
        read_structure(text, record="two")


def test_featurizer_and_graphs_pickle() -> None:
    featurizer = CrystalFeaturizer(cutoff=4.5, max_neighbors=6, edge_vectors=True)
    clone = pickle.loads(pickle.dumps(featurizer))
    assert clone.config() == featurizer.config() == CrystalFeaturizer(**featurizer.config()).config()
    data = featurizer(si_diamond(), record="Si")
    again = pickle.loads(pickle.dumps(data))
    assert torch.equal(again.edge_index, data.edge_index) and torch.equal(again.edge_attr, data.edge_attr)
    with pytest.raises(ValueError, match="max_neighbors"):
        CrystalFeaturizer(max_neighbors=0)


# ---------------------------------------------------------------- encoders


def test_cgcnn_shapes_masks_and_gradients() -> None:
    torch.manual_seed(0)
    featurizer = CrystalFeaturizer(num_gaussians=16)
    encoder = CGCNNEncoder(hidden_dim=16, num_layers=2, num_gaussians=16, out_dim=24)
    items = [featurizer(s, record=str(i)) for i, s in enumerate([si_diamond(), cscl()])]
    assert [CGCNNEncoder.item_tokens(it) for it in items] == [8, 2]
    tokens, mask = encoder(CGCNNEncoder.collate(items))
    assert encoder.out_dim == 24 and tokens.shape == (2, 8, 24) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [8, 2]
    assert torch.all(tokens[1, 2:] == 0)
    # a crystal encodes the same alone and in a batch; equivalent Si atoms get equal tokens
    alone, _ = encoder(CGCNNEncoder.collate(items[1:]))
    assert torch.allclose(alone[0], tokens[1, :2], atol=1e-5)
    assert torch.allclose(tokens[0], tokens[0, :1].expand(8, -1), atol=1e-4)
    tokens.sum().backward()
    assert all(p.grad is not None for p in encoder.parameters())
    with pytest.raises(ValueError, match="num_gaussians=16"):
        encoder(CGCNNEncoder.collate([CrystalFeaturizer()(cscl(), record="x")]))
    with pytest.raises(ValueError, match="empty list"):
        CGCNNEncoder.collate([])


@pytest.fixture(scope="module")
def chgnet_encoder() -> Any:
    pytest.importorskip("chgnet")
    from scifm.encoders.crystal import CHGNetEncoder

    return CHGNetEncoder()


def test_chgnet_featurizer_and_encoder(chgnet_encoder: Any) -> None:
    from scifm.encoders.crystal import CHGNetBatch, CHGNetEncoder, CHGNetFeaturizer

    featurizer = CHGNetFeaturizer()
    graphs = [featurizer(s, record=str(i)) for i, s in enumerate([si_diamond(), cscl()])]
    assert [CHGNetEncoder.item_tokens(g) for g in graphs] == [8, 2]
    # the featurizer and its graphs pickle (DataLoader workers)
    clone = pickle.loads(pickle.dumps(featurizer))
    assert clone.config() == featurizer.config()
    assert pickle.loads(pickle.dumps(graphs[0])).atomic_number.tolist() == [14] * 8
    batch = CHGNetEncoder.collate(graphs)
    assert isinstance(batch, CHGNetBatch) and batch.to("cpu").num_graphs == 2
    tokens, mask = chgnet_encoder(batch)
    assert chgnet_encoder.out_dim == 64 and tokens.shape == (2, 8, 64)
    assert mask.sum(1).tolist() == [8, 2] and torch.all(tokens[1, 2:] == 0)
    alone, _ = chgnet_encoder(CHGNetEncoder.collate(graphs[1:]))
    assert torch.allclose(alone[0], tokens[1, :2], atol=1e-4)
    penultimate = CHGNetEncoder(layer="penultimate")(batch)[0]
    assert penultimate.shape == (2, 8, 64) and not torch.allclose(penultimate, tokens)
    # invalid inputs: the shared checks, and CHGNet's own limits
    with pytest.raises(InvalidInputError, match=r"rows\[0\].*partial occupancies"):
        featurizer(Structure(Lattice.cubic(3.6), [{"Fe": 0.5, "Ni": 0.5}], [[0, 0, 0]]), record="rows[0]")
    with pytest.raises(InvalidInputError, match="up to Pu"):
        featurizer(Structure(Lattice.cubic(3.5), ["Cf"], [[0, 0, 0]]), record="cf")
    with pytest.raises(InvalidInputError, match="isolated atom"):
        featurizer(Structure(Lattice.cubic(20.0), ["Ar"], [[0, 0, 0]]), record="gas")
    with pytest.raises(ValueError, match="cutoffs"):
        chgnet_encoder(CHGNetEncoder.collate([CHGNetFeaturizer(atom_graph_cutoff=5.0)(cscl(), record="c")]))


def test_chgnet_in_a_model_frozen_save_load(chgnet_encoder: Any, llama_dir: Path, tmp_path: Path) -> None:
    cfg = crystal_config(llama_dir, kind="chgnet", stage="align")
    cfg.encoders[0].trainable = False
    model = ScifmModel.from_config(cfg)
    assert not any(p.requires_grad for p in model.encoders["crystal"].parameters())
    saved = model.save_pretrained(tmp_path / "m")
    predictor = Predictor(ScifmModel.from_pretrained(saved), device="cpu")
    emb = predictor.embed(crystals=[si_diamond(), cscl().to(fmt="cif")])
    assert emb.shape == (2, 32) and torch.isfinite(emb).all()
    out = predictor.generate(
        ["What is the Pearson symbol of <crystal>?"], crystals=[nacl()], max_new_tokens=3
    )
    assert len(out) == 1


# ---------------------------------------------------------------- data


def test_aflow_rows() -> None:
    rows = aflow_prototype_rows()
    assert len(rows) == 288
    first = rows[0]
    assert first["aflow"] == "AB_hP6_154_a_b" and first["pearson"] == "hP6"
    assert first["strukturbericht"] == "B9" and first["mineral"] == "Cinnabar"
    assert first["space_group_number"] == 154 and "Mehl" in first["references"]
    assert first["description"].startswith("AFLOW prototype AB_hP6_154_a_b; Pearson symbol hP6")
    assert sum(r["strukturbericht"] is None for r in rows) > 0  # "None" in the file -> None


def _aflow_ids_and_groups(split: str) -> dict[str, str]:
    """Record id (AFLOW label, ``#k`` for repeats) -> the group ``split`` should keep together."""
    out: dict[str, str] = {}
    seen: dict[str, int] = {}
    for row in aflow_prototype_rows():
        label = row["aflow"]
        seen[label] = seen.get(label, 0) + 1
        rid = label if seen[label] == 1 else f"{label}#{seen[label]}"
        by_formula = row["structure"].composition.reduced_formula
        out[rid] = by_formula if split == "composition" else "_".join(label.split("_")[:2])
    return out


@pytest.mark.parametrize("split", ["composition", "prototype"])
def test_grouped_splits_keep_groups_apart(split: str, cgcnn_model: ScifmModel) -> None:
    dm = CrystalDataModule(AFLOW_PROTOTYPES, template="crystal_pearson", split=split)
    dm.attach(cgcnn_model)
    dm.setup("fit")
    sizes = {k: len(v) for k, v in dm.datasets.items()}
    assert sum(sizes.values()) == 288 and min(sizes.values()) > 0, sizes
    group_of = _aflow_ids_and_groups(split)
    parts: dict[str, set[str]] = {}
    for name, dataset in dm.datasets.items():
        for sample in dataset.samples:
            parts.setdefault(group_of[sample.id], set()).add(name)
            assert sample.answer == sample.id.split("_")[1]  # the Pearson symbol is in the label
    assert all(len(p) == 1 for p in parts.values())
    assert len(parts) < 288  # groups were formed (SiO2 x10, C x7, AB_oP8 x6, ...)
    with pytest.raises(ValueError, match="prototype_column"):
        CrystalDataModule("x.csv", template="crystal_pearson", split="prototype")


def test_short_fit_on_aflow_prototypes(llama_dir: Path, tmp_path: Path) -> None:
    import lightning as L

    from scifm.module import OptimConfig, ScifmModule

    torch.manual_seed(0)
    module = ScifmModule(
        model=crystal_config(llama_dir, max_length=128), optim=OptimConfig(lr=1e-3, warmup_steps=0)
    )
    dm = CrystalDataModule(
        AFLOW_PROTOTYPES, template="crystal_description", max_records=20, batch_size=4, split="random"
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3
    assert sum(len(d) for d in dm.datasets.values()) == 20
    assert torch.isfinite(trainer.callback_metrics["train/loss_step"])
    sample = dm.datasets["train"].samples[0]
    assert "<crystal>" in sample.prompt and sample.answer and "AFLOW prototype" in sample.answer


def _write_cif_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "cifs"
    folder.mkdir()
    structures = {"si.cif": si_diamond(), "cscl.cif": cscl(), "nacl.cif": nacl()}
    for name, structure in structures.items():
        (folder / name).write_text(structure.to(fmt="cif"))
    (folder / "bad.cif").write_text("data_bad\n_cell_length_a 4\n")
    rows = ["cif_file,band_gap", "si.cif,0.61", "cscl.cif,5.1", "nacl.cif,5.0", "bad.cif,1.0", "nacl.cif,4.9"]
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


def test_cif_folder_with_labels(llama_dir: Path, tmp_path: Path) -> None:
    labels = _write_cif_folder(tmp_path)
    model = ScifmModel.from_config(crystal_config(llama_dir, head="regression"))
    kwargs: dict[str, Any] = {
        "template": "crystal_band_gap",
        "structure_column": "cif_file",
        "split": "composition",
    }
    dm = CrystalDataModule(str(labels), fractions=(0.5, 0.25, 0.25), on_error="skip", **kwargs)
    dm.attach(model)
    dm.setup("fit")
    samples = [s for d in dm.datasets.values() for s in d.samples]
    assert sorted(s.id for s in samples) == ["labels.csv:0", "labels.csv:1", "labels.csv:2", "labels.csv:4"]
    assert {s.id: s.answer for s in samples}["labels.csv:0"] == "0.61 eV"
    assert {s.id: s.target for s in samples}["labels.csv:1"] == [5.1]
    # both NaCl rows share one split (composition groups)
    owner = {s.id: name for name, d in dm.datasets.items() for s in d.samples}
    assert owner["labels.csv:2"] == owner["labels.csv:4"]
    report = next(r for src, r in dm.reports.items() if r.skipped)
    assert report.skipped == 1 and "labels.csv:3" in report.examples[0]
    # a batch trains: LM loss + regression head
    batch = model.collator()(samples)
    out = model(batch)
    assert out.loss is not None and out.head_loss is not None and torch.isfinite(out.loss)
    # on_error="raise" names the bad record
    strict = CrystalDataModule(str(labels), **kwargs)
    strict.attach(model)
    with pytest.raises(InvalidInputError, match=r"labels.csv:3.*cannot read"):
        strict.setup("fit")
    with pytest.raises(InvalidInputError, match=r"missing column\(s\) \['structure'\]"):
        CrystalDataModule(str(labels), template="crystal_band_gap").read_records(
            str(labels), columns=["band_gap"]
        )


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_json_of_pymatgen_dicts(suffix: str, cgcnn_model: ScifmModel, tmp_path: Path) -> None:
    records = [
        {"material_id": f"m{i}", "structure": s.as_dict(), "e_form": e}
        for i, (s, e) in enumerate([(si_diamond(), 0.0), (cscl(), -2.1), (nacl(), -2.05)])
    ]
    path = tmp_path / f"data{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(records))
    else:
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    template = {
        "prompt": "Formation energy of <crystal> ({formula}, {num_sites} sites)?",
        "answer": "{e_form:.2f} eV/atom",
    }
    dm = CrystalDataModule(str(path), template=template, id_column="material_id", fractions=(1.0, 0.0, 0.0))
    dm.attach(cgcnn_model)
    dm.setup("fit")
    by_id = {s.id: s for s in dm.datasets["train"].samples}
    assert by_id["m1"].prompt == "Formation energy of <crystal> (CsCl, 2 sites)?"
    assert by_id["m2"].answer == "-2.05 eV/atom" and by_id["m2"].items["crystal"][0].num_nodes == 8


# ---------------------------------------------------------------- predictor


def test_predictor_generate_and_embed_crystals(llama_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ScifmModel.from_config(crystal_config(llama_dir, head="regression"))
    saved = model.save_pretrained(tmp_path / "m")
    predictor = Predictor(ScifmModel.from_pretrained(saved), device="cpu", batch_size=2)
    prompt = "What is the band gap of <crystal> in eV?"
    (tmp_path / "nacl.cif").write_text(nacl().to(fmt="cif"))
    out = predictor.generate(
        [prompt, prompt, prompt],
        crystals=[si_diamond(), cscl().to(fmt="cif"), str(tmp_path / "nacl.cif")],
        max_new_tokens=4,
    )
    assert len(out) == 3 and all(isinstance(t, str) for t in out)
    emb = predictor.embed(crystals=[si_diamond(), cscl().to(fmt="cif"), nacl().as_dict()])
    assert emb.shape == (3, 32) and torch.isfinite(emb).all()
    assert torch.allclose(predictor.embed(crystals=[cscl()])[0], emb[1], atol=1e-5)
    values = predictor.predict([prompt, prompt], crystals=[si_diamond(), cscl()])
    assert values.shape == (2, 1)
    with pytest.raises(InvalidInputError, match=r"crystals\[1\].*partial occupancies"):
        predictor.generate(
            [prompt, prompt],
            crystals=[cscl(), Structure(Lattice.cubic(3.6), [{"Fe": 0.5, "Ni": 0.5}], [[0, 0, 0]])],
        )


# ---------------------------------------------------------------- generation


GOOD_CIF = """data_NaCl
_symmetry_space_group_name_H-M   'P 1'
_cell_length_a   5.64
_cell_length_b   5.64
_cell_length_c   5.64
_cell_angle_alpha   90
_cell_angle_beta   90
_cell_angle_gamma   90
loop_
 _symmetry_equiv_pos_as_xyz
  'x, y, z'
loop_
 _atom_site_type_symbol
 _atom_site_label
 _atom_site_fract_x
 _atom_site_fract_y
 _atom_site_fract_z
 _atom_site_occupancy
  Na  Na0  0.0  0.0  0.0  1
  Na  Na1  0.0  0.5  0.5  1
  Na  Na2  0.5  0.0  0.5  1
  Na  Na3  0.5  0.5  0.0  1
  Cl  Cl4  0.5  0.5  0.5  1
  Cl  Cl5  0.5  0.0  0.0  1
  Cl  Cl6  0.0  0.5  0.0  1
  Cl  Cl7  0.0  0.0  0.5  1
"""


def test_cif_validity_on_good_and_bad_cifs() -> None:
    overlapping = GOOD_CIF.replace("Cl  Cl4  0.5  0.5  0.5", "Cl  Cl4  0.02  0.0  0.0")
    unbalanced = GOOD_CIF.replace("Cl  Cl", "O  O")  # NaO: no neutral assignment
    fenced = "```cif\n" + GOOD_CIF + "```"
    alloy = cscl().to(fmt="cif").replace("Cs", "Cu").replace("Cl", "Zn")  # all metals count as balanced
    texts = [GOOD_CIF, fenced, overlapping, unbalanced, "data_x\nnot a cif", "", alloy]
    expected = ["NaCl", "Na4Cl4", "NaCl", "NaCl", "NaCl", None, "CuZn"]
    result = cif_validity(texts, expected_formulas=expected)
    flags = [
        (d["parsed"], d["composition_ok"], d["distance_ok"], d["charge_balanced"], d["valid"])
        for d in result["details"]
    ]
    assert flags == [
        (True, True, True, True, True),
        (True, True, True, True, True),
        (True, True, False, True, False),
        (True, False, True, False, False),
        (False, False, False, False, False),
        (False, None, False, False, False),
        (True, True, True, True, True),
    ]
    assert result["n"] == 7
    assert result["parse_rate"] == pytest.approx(5 / 7)
    assert result["composition_rate"] == pytest.approx(4 / 6)
    assert result["valid_rate"] == pytest.approx(3 / 7)
    assert result["details"][2]["min_distance"] == pytest.approx(0.02 * 5.64, abs=1e-3)
    assert result["details"][4]["error"]
    assert cif_validity([GOOD_CIF])["composition_rate"] is None
    with pytest.raises(ValueError, match="expected_formulas"):
        cif_validity([GOOD_CIF], expected_formulas=["NaCl", "KCl"])


def test_generation_targets_are_valid_cifs(cgcnn_model: ScifmModel) -> None:
    dm = CrystalDataModule(AFLOW_PROTOTYPES, template="crystal_cif_generation", max_records=12)
    records = dm._read(AFLOW_PROTOTYPES, need_answer=True)
    assert all("crystal" not in r.values for r in records)  # no <crystal> in the prompt
    cifs = [r.row["cif"] for r in records]
    result = cif_validity(cifs, expected_formulas=[r.row["formula"] for r in records])
    assert (
        result["parse_rate"] == 1.0 and result["composition_rate"] == 1.0 and result["distance_rate"] == 1.0
    )
    prompt, answer = dm.template.render(records[0].row, record=records[0].id)
    assert prompt == "Write a crystal structure of HgS as a CIF file." and answer.startswith("data_HgS")


# ---------------------------------------------------------------- synthesis


def test_synthesis_route_with_crystal_and_precursor_molecules(llama_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("rdkit")
    licoo2 = Structure.from_spacegroup(
        "R-3m", Lattice.hexagonal(2.82, 14.05), ["Li", "Co", "O"], [[0, 0, 0.5], [0, 0, 0], [0, 0, 0.26]]
    )
    rows = [
        {
            "id": "LiCoO2",
            "structure": licoo2.as_dict(),
            "precursors": ["[Li+].[Li+].[O-]C([O-])=O", "O=[Co]"],
            "route": "Grind, calcine at 900 C for 12 h in air.",
        },
        {
            "id": "NaCl",
            "structure": nacl().to(fmt="cif"),
            "precursors": ["[Na+].[OH-]", "Cl"],
            "route": "Neutralize in water, evaporate.",
        },
        {
            "id": "CsCl",
            "structure": cscl().as_dict(),
            "precursors": "[Cs+].[OH-]; Cl",
            "route": "Neutralize, dry at 120 C.",
        },
        {"id": "bad", "structure": cscl().as_dict(), "precursors": ["C1CC"], "route": "-"},
    ]
    path = tmp_path / "routes.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    model = ScifmModel.from_config(crystal_config(llama_dir, with_molecules=True, max_length=128))
    dm = CrystalDataModule(
        str(path),
        template="crystal_synthesis",
        precursor_column="precursors",
        id_column="id",
        fractions=(1.0, 0.0, 0.0),
        on_error="skip",
    )
    dm.attach(model)
    dm.setup("fit")
    samples = {s.id: s for s in dm.datasets["train"].samples}
    assert sorted(samples) == ["CsCl", "LiCoO2", "NaCl"]  # "bad": invalid precursor SMILES, skipped
    first = samples["LiCoO2"]
    assert first.prompt == (
        "Propose a solid-state synthesis route for <crystal> from the precursors <mol>, <mol>."
    )
    assert len(first.items["crystal"]) == 1 and len(first.items["molecule"]) == 2
    assert samples["CsCl"].items["molecule"][0].num_nodes == 2  # Cs+ and O (implicit H) of "[Cs+].[OH-]"
    assert "bad" in next(r for r in dm.reports.values() if r.skipped).examples[0]
    out = model(model.collator()(list(samples.values())))
    assert out.loss is not None and torch.isfinite(out.loss)
    predictor = Predictor(model, device="cpu")
    text = predictor.generate(
        ["Propose a solid-state synthesis route for <crystal> from the precursors <mol>, <mol>."],
        crystals=[licoo2],
        molecules=[["[Li+].[Li+].[O-]C([O-])=O", "O=[Co]"]],
        max_new_tokens=3,
    )
    assert len(text) == 1


# ---------------------------------------------------------------- configs


CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("crystal_*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_configs_parse(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from scifm.cli import main

    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(config), "--print_config"])
    assert info.value.code in (0, None)
    assert "CrystalDataModule" in capsys.readouterr().out


def test_templates_ship() -> None:
    from scifm.templates import load_template

    for name in (
        "crystal_pearson",
        "crystal_description",
        "crystal_band_gap",
        "crystal_cif_generation",
        "crystal_synthesis",
    ):
        assert load_template(name).prompt
