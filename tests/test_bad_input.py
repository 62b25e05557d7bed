"""Bad user input through the data modules and the featurizers: every problem is an
:class:`~scifm.InvalidInputError` naming the record (or file), or, with ``on_error="skip"``,
a skipped and counted record; unicode text works. Files only under ``tmp_path``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import cell_config, tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scifm import InvalidInputError
from scifm.config import BackboneConfig, ConnectorConfig, EncoderConfig, HeadConfig, ModelConfig
from scifm.data_modules.molecule import MoleculeDataModule
from scifm.model import ScifmModel

GOOD = [("CCO", -5.0, "ethanol"), ("c1ccccc1", -0.9, "benzene"), ("CCCC", 2.1, "butane")]
MOL_ONE = {"prompt": "Energy of <mol>?", "answer": "{expt:.2f}", "targets": ["expt"]}


@pytest.fixture(scope="module")
def mol_model(llama_dir: Path) -> ScifmModel:
    return ScifmModel.from_config(tiny_config(llama_dir))


def _write_csv(path: Path, rows: list[tuple[Any, ...]], columns: list[str]) -> Path:
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)
    return path


def _mol_dm(path: Path, model: ScifmModel, **kwargs: Any) -> MoleculeDataModule:
    kwargs.setdefault("template", "freesolv")
    dm = MoleculeDataModule(str(path), fractions=(1.0, 0.0, 0.0), **kwargs)
    dm.attach(model)
    dm.setup("fit")
    return dm


def _skipped(dm: Any) -> int:
    return sum(r.skipped for r in dm.reports.values())


# ---------------------------------------------------------------------------- molecules


def _empty_header_only(tmp_path: Path) -> tuple[Path, dict[str, Any], str]:
    path = tmp_path / "header_only.csv"
    path.write_text("smiles,expt\n")
    return path, {}, "header_only.csv"


def _zero_bytes(tmp_path: Path) -> tuple[Path, dict[str, Any], str]:
    path = tmp_path / "zero.csv"
    path.write_bytes(b"")
    return path, {}, "zero.csv"


def _wrong_columns(tmp_path: Path) -> tuple[Path, dict[str, Any], str]:
    path = _write_csv(tmp_path / "cols.csv", [("CCO", 1.0)], ["SMILES", "energy"])
    return path, {}, "cols.csv"


FILE_LEVEL = {"header_only": _empty_header_only, "zero_bytes": _zero_bytes, "wrong_columns": _wrong_columns}


@pytest.mark.parametrize("case", sorted(FILE_LEVEL))
@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_file_level_problems_name_the_file(
    case: str, on_error: str, tmp_path: Path, mol_model: ScifmModel
) -> None:
    path, kwargs, name = FILE_LEVEL[case](tmp_path)
    # no record to skip: the file itself is refused in both modes
    with pytest.raises(InvalidInputError) as info:
        _mol_dm(path, mol_model, on_error=on_error, **kwargs)
    assert name in str(info.value)


def _invalid_smiles(tmp_path: Path) -> tuple[Path, dict[str, Any], str]:
    path = _write_csv(tmp_path / "m.csv", [*GOOD, ("C1CC(", 1.0, "broken")], ["smiles", "expt", "name"])
    return path, {}, "m.csv:3"


def _no_placeholder(tmp_path: Path) -> tuple[Path, dict[str, Any], str]:
    path = _write_csv(tmp_path / "m.csv", GOOD, ["smiles", "expt", "name"])
    template = {"prompt": "What is the energy?", "answer": "{expt:.2f}", "targets": ["expt"]}
    return path, {"template": template}, "m.csv:0"


def _two_placeholders_one_column(tmp_path: Path) -> tuple[Path, dict[str, Any], str]:
    path = _write_csv(tmp_path / "m.csv", GOOD, ["smiles", "expt", "name"])
    template = {"prompt": "Compare <mol> with <mol>.", "answer": "{name}"}
    return path, {"template": template}, "m.csv:0"


def _overlong_prompt(tmp_path: Path) -> tuple[Path, dict[str, Any], str]:
    rows = [*GOOD, ("CCO", 1.0, " ".join(["verylongword"] * 60))]
    path = _write_csv(tmp_path / "m.csv", rows, ["smiles", "expt", "name"])
    template = {"prompt": "Describe {name}: <mol>?", "answer": "{expt:.2f}", "targets": ["expt"]}
    return path, {"template": template}, "m.csv:3"


RECORD_LEVEL = {
    "invalid_smiles": (_invalid_smiles, 1),
    "no_placeholder": (_no_placeholder, None),  # every record is bad
    "two_placeholders_one_column": (_two_placeholders_one_column, None),
    "overlong_prompt": (_overlong_prompt, 1),
}


@pytest.mark.parametrize("case", sorted(RECORD_LEVEL))
def test_record_level_problems_raise_or_are_skipped(case: str, tmp_path: Path, llama_dir: Path) -> None:
    cfg = tiny_config(llama_dir)
    cfg.backbone.max_length = 48
    model = ScifmModel.from_config(cfg)
    make, bad = RECORD_LEVEL[case]
    path, kwargs, record = make(tmp_path)
    with pytest.raises(InvalidInputError) as info:
        _mol_dm(path, model, **kwargs)
    assert record in str(info.value) and info.value.record == record
    if bad is None:  # every record bad: skip mode says so instead of training on nothing
        with pytest.raises(InvalidInputError, match="every record was skipped"):
            _mol_dm(path, model, on_error="skip", **kwargs)
        return
    dm = _mol_dm(path, model, on_error="skip", **kwargs)
    assert _skipped(dm) == bad
    assert len(dm.datasets["train"]) == len(GOOD)
    assert any(record in e for r in dm.reports.values() for e in r.examples)


def test_overlong_prompt_refused_at_setup_never_cut(tmp_path: Path, llama_dir: Path) -> None:
    cfg = tiny_config(llama_dir)
    cfg.backbone.max_length = 48
    model = ScifmModel.from_config(cfg)
    path, kwargs, _ = _overlong_prompt(tmp_path)
    dm = _mol_dm(path, model, on_error="skip", batch_size=2, **kwargs)
    # every kept sample trains: each row keeps all of its placeholder tokens
    mol_id = model.tokenizer.convert_tokens_to_ids("<mol>")
    for batch in dm.train_dataloader():
        assert batch["input_ids"].shape[1] <= 48
        per_row = (batch["input_ids"] == mol_id).sum(dim=1)
        assert per_row.tolist() == [cfg.connector.num_tokens] * batch["input_ids"].shape[0]
        out = model(batch)
        assert out.loss is not None and torch.isfinite(out.loss)


def test_unicode_ids_and_answers_work(tmp_path: Path, mol_model: ScifmModel) -> None:
    rows = [("CCO", "Δ-éthanol", "日本語の答え"), ("c1ccccc1", "ベンゼン", "Δ𝛼 ✓")]
    path = tmp_path / "ユニコード.csv"
    pd.DataFrame(rows, columns=["smiles", "id", "answer"]).to_csv(path, index=False)
    template = {"prompt": "Name of <mol> (Δ)?", "answer": "{answer}"}
    dm = _mol_dm(path, mol_model, template=template, id_column="id")
    samples = {s.id: s for s in dm.datasets["train"].samples}
    assert samples["Δ-éthanol"].answer == "日本語の答え" and samples["ベンゼン"].answer == "Δ𝛼 ✓"
    batch = next(iter(dm.train_dataloader()))
    out = mol_model(batch)
    assert out.loss is not None and torch.isfinite(out.loss)
    # a bad record named in unicode is named in the error
    _write_csv(path, [*rows, ("C1CC(", "壊れた", "x")], ["smiles", "id", "answer"])
    with pytest.raises(InvalidInputError, match="壊れた"):
        _mol_dm(path, mol_model, template=template, id_column="id")


# ---------------------------------------------------------------------------- crystals


def _crystal_model(llama_dir: Path) -> ScifmModel:
    cfg = ModelConfig(
        backbone=BackboneConfig(name=str(llama_dir), lora_r=4, lora_alpha=8, lora_dropout=0.0, max_length=96),
        connector=ConnectorConfig(kind="resampler", num_tokens=4, num_heads=2),
        encoders=[
            EncoderConfig(
                modality="crystal",
                kind="cgcnn",
                params={"hidden_dim": 16, "num_layers": 2, "num_gaussians": 16},
                featurizer={"num_gaussians": 16},
            )
        ],
        head=HeadConfig(),
    )
    return ScifmModel.from_config(cfg)


def test_broken_cif_file_raises_or_is_skipped(tmp_path: Path, llama_dir: Path) -> None:
    pytest.importorskip("pymatgen.core")
    from pymatgen.core import Lattice, Structure

    from scifm.data_modules.crystal import CrystalDataModule

    folder = tmp_path / "cifs"
    folder.mkdir()
    good = {
        "cscl.cif": Structure(Lattice.cubic(4.12), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
        "po.cif": Structure(Lattice.cubic(3.35), ["Po"], [[0, 0, 0]]),
    }
    for name, structure in good.items():
        (folder / name).write_text(structure.to(fmt="cif"))
    (folder / "broken.cif").write_text("data_broken\n_cell_length_a 4.0\nloop_\n_atom_site_label\n")
    labels = folder / "labels.csv"
    labels.write_text("cif_file,band_gap\ncscl.cif,5.1\nbroken.cif,1.0\npo.cif,0.0\n")
    model = _crystal_model(llama_dir)
    kwargs: dict[str, Any] = {
        "template": "crystal_band_gap",
        "structure_column": "cif_file",
        "fractions": (1.0, 0.0, 0.0),
    }
    strict = CrystalDataModule(str(labels), **kwargs)
    strict.attach(model)
    with pytest.raises(InvalidInputError) as info:
        strict.setup("fit")
    assert info.value.record == "labels.csv:1" and "labels.csv:1" in str(info.value)
    dm = CrystalDataModule(str(labels), on_error="skip", **kwargs)
    dm.attach(model)
    dm.setup("fit")
    assert _skipped(dm) == 1 and len(dm.datasets["train"]) == 2


# ---------------------------------------------------------------------------- cells

GENES = [f"G{i}" for i in range(20)]


def _cell_model(llama_dir: Path) -> ScifmModel:
    return ScifmModel.from_config(cell_config(llama_dir, genes=GENES))


@pytest.mark.parametrize(("bad_value", "problem"), [(np.nan, "NaN"), (-3.0, "negative")])
def test_bad_h5ad_values_raise_or_are_skipped(
    bad_value: float, problem: str, tmp_path: Path, llama_dir: Path
) -> None:
    ad = pytest.importorskip("anndata")
    from scifm.data_modules.cell import CellDataModule

    rng = np.random.default_rng(0)
    x = rng.poisson(3.0, size=(6, len(GENES))).astype(np.float32) + 1
    x[2, 5] = bad_value
    obs = pd.DataFrame({"cell_type": ["T", "B"] * 3}, index=[f"c{i}" for i in range(6)])
    path = tmp_path / "bad.h5ad"
    ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=GENES)).write_h5ad(path)
    model = _cell_model(llama_dir)
    template = {"prompt": "Cell type of <cell>?", "answer": "{cell_type}", "label": "cell_type"}
    strict = CellDataModule(str(path), template=template, fractions=(1.0, 0.0, 0.0))
    strict.attach(model)
    with pytest.raises(InvalidInputError, match=problem) as info:
        strict.setup("fit")
    assert "bad.h5ad" in str(info.value) and "c2" in str(info.value)
    dm = CellDataModule(str(path), template=template, fractions=(1.0, 0.0, 0.0), on_error="skip")
    dm.attach(model)
    dm.setup("fit")
    assert _skipped(dm) == 1 and len(dm.datasets["train"]) == 5
    assert "c2" in " ".join(e for r in dm.reports.values() for e in r.examples)


# ---------------------------------------------------------------------------- properties

SPECIES = ["H", "Si", "Fe", "Cs", "Og", "U", "X", "D", "Xx", "Na+", "O2-", "", "1"]
PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _cif(lengths: list[float], angles: list[float], sites: list[tuple[str, list[float]]]) -> str:
    lines = ["data_h"]
    lines += [f"_cell_length_{k} {v:.6f}" for k, v in zip("abc", lengths, strict=True)]
    lines += [f"_cell_angle_{k} {v:.6f}" for k, v in zip(("alpha", "beta", "gamma"), angles, strict=True)]
    lines += ["_symmetry_space_group_name_H-M 'P 1'", "loop_", "_symmetry_equiv_pos_as_xyz", "  'x, y, z'"]
    lines += ["loop_", "_atom_site_type_symbol", "_atom_site_label"]
    lines += ["_atom_site_fract_x", "_atom_site_fract_y", "_atom_site_fract_z", "_atom_site_occupancy"]
    for i, (sp, xyz) in enumerate(sites):
        lines.append(f"{sp or '?'} {sp or 'Q'}{i} {xyz[0]:.6f} {xyz[1]:.6f} {xyz[2]:.6f} 1")
    return "\n".join(lines) + "\n"


@PROPERTY
@given(
    lengths=st.lists(st.floats(0.5, 20.0), min_size=3, max_size=3),
    angles=st.lists(st.floats(30.0, 150.0), min_size=3, max_size=3),
    sites=st.lists(
        st.tuples(st.sampled_from(SPECIES), st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3)),
        min_size=1,
        max_size=6,
    ),
    as_structure=st.booleans(),
)
def test_crystal_featurizer_only_raises_invalid_input(
    lengths: list[float], angles: list[float], sites: list[tuple[str, list[float]]], as_structure: bool
) -> None:
    pytest.importorskip("pymatgen.core")
    from scifm.encoders.crystal import CrystalFeaturizer

    value: Any = _cif(lengths, angles, sites)
    if as_structure:
        from pymatgen.core import Lattice, Structure

        try:  # pymatgen itself refusing the inputs is not the featurizer's business
            value = Structure(
                Lattice.from_parameters(*lengths, *angles), [s for s, _ in sites], [x for _, x in sites]
            )
        except Exception:
            return
    try:
        data = CrystalFeaturizer(num_gaussians=8)(value, record="hyp")
    except InvalidInputError as err:
        assert "hyp" in str(err)
        return
    assert 1 <= data.num_nodes <= len(sites)  # CIF parsing may merge co-located sites (see below)
    assert torch.isfinite(data.edge_dist).all() and torch.isfinite(data.edge_attr).all()


@pytest.mark.xfail(
    strict=True,
    reason="a CIF with two different species on the same position (H and O at 0,0,0) is read as "
    "one O atom: pymatgen's CIF parser merges them and the featurizer's overlap check never sees "
    "the H, so an atom is dropped silently instead of raising InvalidInputError",
)
def test_co_located_cif_sites_are_refused_not_merged() -> None:
    pytest.importorskip("pymatgen.core")
    from scifm.encoders.crystal import CrystalFeaturizer

    text = _cif([5.0] * 3, [90.0] * 3, [("H", [0.0, 0.0, 0.0]), ("O", [0.0, 0.0, 0.0])])
    with pytest.raises(InvalidInputError, match="overlap"):
        CrystalFeaturizer()(text, record="merged")


_FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -1.0, 1.0, 3.0, 1e308, -1e308, math.nan, math.inf, -math.inf, 2.5]),
    st.integers(0, 10**6).map(float),
)
_GENE_NAMES = st.sampled_from([*GENES, "unknown", "G1.2", ""])


@PROPERTY
@given(
    kind=st.sampled_from(["dict", "series", "array"]),
    values=st.dictionaries(_GENE_NAMES, _FLOATS, max_size=25),
    data=st.sampled_from(["counts", "log_normalized", "processed"]),
)
def test_cell_featurizer_only_raises_invalid_input(kind: str, values: dict[str, float], data: str) -> None:
    from scifm.encoders.cell import CellFeaturizer

    featurizer = CellFeaturizer(genes=GENES, data=data)  # type: ignore[arg-type]
    value: Any = values
    if kind == "series":
        value = pd.Series(values, dtype=np.float64)
    elif kind == "array":
        value = np.asarray(list(values.values()), dtype=np.float64)
    try:
        item = featurizer(value, record="hyp-cell")
    except InvalidInputError as err:
        assert "hyp-cell" in str(err)
        return
    assert item.values.shape == (len(GENES),)


def test_values_beyond_float32_are_refused_not_inf() -> None:
    from scifm.encoders.cell import CellFeaturizer

    featurizer = CellFeaturizer(genes=GENES, data="processed")
    with pytest.raises(InvalidInputError, match=r"huge.*beyond float32"):
        featurizer({g: 1e39 for g in GENES}, record="huge")
    assert torch.isfinite(featurizer({g: 3.0e38 for g in GENES}, record="big").values).all()
