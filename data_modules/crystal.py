"""Crystal data: a folder of CIFs + a label table, JSON/JSONL of pymatgen dicts, AFLOW prototypes.

Every record holds one structure (filling the template's ``<crystal>``, when it has one) and,
optionally, precursor molecules (filling ``<mol>`` placeholders, for synthesis routes).
Structures are read and checked once, when the file is read; a bad one is reported (or skipped
and counted, with ``on_error: skip``) under its record id.

Columns a template may read besides the file's own (computed only when a template asks):

- ``formula`` (reduced formula, ``"NaCl"``), ``full_formula`` (the cell's, ``"Na4Cl4"``),
  ``num_sites``;
- ``cif``: the structure as CIF text (symmetrized with ``cif_symprec``), for generation;
- ``spacegroup``: its international symbol (spglib, ``cif_symprec``);
- with ``precursor_column``: ``precursor_mols`` (``"<mol>, <mol>"``, one placeholder per
  precursor, in order) and ``precursor_smiles`` (``"CCO, O"``).

AFLOW prototypes (``path: aflow_prototypes``) also give ``aflow`` (AFLOW label), ``pearson``,
``strukturbericht`` and ``mineral`` (empty ones are ``None``), ``space_group_number``,
``references`` (BibTeX) and ``description`` (the non-empty designations in one sentence).
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from scifm._extras import require
from scifm.config import PLACEHOLDERS
from scifm.data_modules.base import Record, ScifmDataModule
from scifm.data_modules.readers import check_columns, read_table
from scifm.errors import InvalidInputError
from scifm.tokenization import Sample

__all__ = ["AFLOW_PROTOTYPES", "CrystalDataModule", "CrystalRecord", "aflow_prototype_rows"]

#: The ``path`` that selects the AFLOW prototypes shipped with pymatgen.
AFLOW_PROTOTYPES = "aflow_prototypes"

_CRYSTAL = PLACEHOLDERS["crystal"]
_MOL = PLACEHOLDERS["molecule"]
_JSON_LIST = re.compile(r'^\[\s*("|\])')
_DERIVED = ("formula", "full_formula", "num_sites", "cif", "spacegroup", "precursor_mols", "precursor_smiles")


@dataclass
class CrystalRecord(Record):
    """A :class:`Record` that also carries the error met while reading its structure, raised
    (or skipped and counted) when the record becomes a sample."""

    error: InvalidInputError | None = None


def aflow_prototype_rows() -> list[dict[str, Any]]:
    """The 288 AFLOW prototypes shipped with pymatgen, one row per prototype.

    Returns:
        list of dict: ``structure`` (a pymatgen ``Structure``), ``aflow``, ``pearson``,
        ``strukturbericht``, ``mineral`` (``None`` where the library has none),
        ``space_group_number``, ``references`` (BibTeX text) and ``description``.
    """
    core = require("pymatgen.core", extra="crystal")
    # Not resources.files("pymatgen.analysis.prototypes"): importing that package takes ~5 s.
    source = resources.files("pymatgen.analysis") / "prototypes" / "aflow_prototypes.json.gz"
    with source.open("rb") as raw, gzip.open(raw, "rt") as handle:
        entries = json.load(handle)
    rows = []
    for entry in entries:
        tags = entry["tags"]

        def tag(name: str, tags: dict[str, Any] = tags) -> str | None:
            value = str(tags.get(name) or "").strip()
            return None if value in ("", "None") else value

        label = str(tags["aflow"])
        parts = [f"AFLOW prototype {label}", f"Pearson symbol {tag('pearson')}"]
        if tag("strukturbericht"):
            parts.append(f"Strukturbericht designation {tag('strukturbericht')}")
        if tag("mineral"):
            parts.append(f"mineral name {tag('mineral')}")
        rows.append(
            {
                "structure": core.Structure.from_dict(entry["snl"]),
                "aflow": label,
                "pearson": tag("pearson"),
                "strukturbericht": tag("strukturbericht"),
                "mineral": tag("mineral"),
                "space_group_number": int(label.split("_")[2]),
                "references": str(entry["snl"].get("about", {}).get("references", "")).strip(),
                "description": "; ".join(parts) + ".",
            }
        )
    return rows


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _as_list(value: Any, *, record: str, column: str) -> list[Any]:
    """A list of precursors from a list, a JSON list string, or a ``;``-separated string."""
    if _is_missing(value):
        raise InvalidInputError(record, f"column {column!r} is empty")
    if isinstance(value, str):
        text = value.strip()
        if _JSON_LIST.match(text):  # '["CCO", "O"]'; a SMILES may start with "[" but not '["'
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(record, f"column {column!r} is not a JSON list: {exc}") from exc
        else:
            value = [part.strip() for part in text.split(";") if part.strip()]
    if not isinstance(value, (list, tuple)) and not hasattr(value, "tolist"):
        raise InvalidInputError(
            record, f"column {column!r} must hold a list of SMILES, got {type(value).__name__}"
        )
    items = list(value.tolist() if hasattr(value, "tolist") else value)
    if not items:
        raise InvalidInputError(record, f"column {column!r} lists no precursors")
    return items


class CrystalDataModule(ScifmDataModule):
    """Reads crystal structures with labels and turns them into instruction data through a template.

    Sources (``path``):

    - a label table (CSV / TSV / JSONL / Parquet) whose ``structure_column`` names a CIF (or
      POSCAR, ...) file, resolved against ``structure_dir`` (default: the table's folder);
    - a JSON list or JSONL of records whose ``structure_column`` holds a pymatgen
      ``Structure.as_dict()`` (or CIF text), next to label fields;
    - ``"aflow_prototypes"``: the 288 AFLOW prototypes shipped with pymatgen (see
      :func:`aflow_prototype_rows`; ids are the AFLOW labels).

    Synthesis routes: a JSONL with ``structure``, ``precursors`` (list of SMILES) and ``route``
    fields, read with ``precursor_column="precursors"`` and a template such as
    ``"Propose a synthesis of <crystal> from {precursor_mols}."`` -> ``"{route}"``; the model
    then needs both a ``crystal`` and a ``molecule`` encoder.

    Args:
        path: the table or JSON file, or ``"aflow_prototypes"``.
        template: template name, YAML path or mapping (see :mod:`scifm.templates`). With a
            ``<crystal>`` in its prompt the structure is encoded; without one (e.g. generating
            ``{cif}`` from ``{formula}``) it is only read for the computed columns.
        structure_column: the column holding each structure: a file name or path, a pymatgen
            dict, or CIF/POSCAR text (default: "structure").
        structure_dir: folder against which relative file names are resolved
            (default: the folder of ``path``).
        precursor_column: column listing precursor SMILES (a list, a JSON list string or a
            ``;``-separated string); fills ``precursor_mols`` / ``precursor_smiles``
            (default: none).
        prototype_column: column naming each record's structure prototype, for
            ``split="prototype"`` (AFLOW prototypes need none) (default: none).
        id_column: column naming each record (default: ``"<file name>:<row index from 0>"``).
        format: "auto", "csv", "tsv", "jsonl", "json" or "parquet" (default: "auto").
        split: "random"; "composition" (reduced formula; no formula in two splits); or
            "prototype" (``prototype_column``; for AFLOW prototypes, the stoichiometry and
            Pearson symbol of the AFLOW label, e.g. ``AB_cF8``, so that variants of one
            structure type stay together) (default: "random").
        min_distance: atoms closer than this (Å) make a record invalid (default: 0.5).
        cif_symprec: symmetry tolerance for the ``cif`` and ``spacegroup`` columns; ``None``
            writes the CIF in P1 (default: 0.1).

    The other arguments are :class:`~scifm.data_modules.base.ScifmDataModule`'s.
    """

    def __init__(
        self,
        path: str,
        *,
        template: str | dict[str, Any],
        structure_column: str = "structure",
        structure_dir: str | None = None,
        precursor_column: str | None = None,
        prototype_column: str | None = None,
        id_column: str | None = None,
        format: str = "auto",
        min_distance: float = 0.5,
        cif_symprec: float | None = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(path, template=template, **kwargs)
        formats = ("auto", "csv", "tsv", "jsonl", "json", "parquet")
        if format not in formats:
            raise ValueError(f"unknown format {format!r}; valid: {list(formats)}")
        crystals = self.template.prompt.count(_CRYSTAL)
        if crystals > 1:
            raise ValueError(
                f"the template prompt has {crystals} {_CRYSTAL} placeholders; CrystalDataModule "
                "reads one structure per record"
            )
        if self.split == "prototype" and prototype_column is None and path != AFLOW_PROTOTYPES:
            raise ValueError('split="prototype" needs prototype_column (AFLOW prototypes excepted)')
        self.structure_column = structure_column
        self.structure_dir = structure_dir
        self.precursor_column = precursor_column
        self.prototype_column = prototype_column
        self.id_column = id_column
        self.format = format
        self.min_distance = min_distance
        self.cif_symprec = cif_symprec
        self.encode_crystal = crystals == 1

    def valid_splits(self) -> tuple[str, ...]:
        return ("random", "composition", "prototype")

    # -- reading -------------------------------------------------------------------------------
    def _rows(self, path: str) -> tuple[list[dict[str, Any]], str]:
        """Rows of ``path`` (as dicts) and the name used in record ids."""
        if path == AFLOW_PROTOTYPES:
            return aflow_prototype_rows(), AFLOW_PROTOTYPES
        file = Path(path)
        name = file.name
        fmt = self.format
        if fmt == "json" or (fmt == "auto" and file.suffix.lower() == ".json"):
            if not file.is_file():
                raise FileNotFoundError(f"no such file: {path!r}")
            try:
                data = json.loads(file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InvalidInputError(name, f"cannot be read as JSON: {exc}") from exc
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise InvalidInputError(name, "a JSON file must hold a list of records (objects)")
            if not data:
                raise InvalidInputError(name, "the file holds no records")
            rows = [dict(r) for r in data]
        else:
            frame = read_table(path, format=fmt)  # type: ignore[arg-type]
            rows = frame.to_dict(orient="records")
        return rows, name

    def read_records(self, path: str, *, columns: list[str]) -> list[Record]:
        import pandas as pd

        rows, name = self._rows(path)
        aflow = path == AFLOW_PROTOTYPES
        structure_key = "structure" if aflow else self.structure_column
        derived = set(_DERIVED)
        if not self.precursor_column:
            derived -= {"precursor_mols", "precursor_smiles"}
        own: list[str | None] = [structure_key, self.precursor_column, self.id_column]
        if self.split == "prototype":
            own.append(self.prototype_column)
        wanted = [c for c in dict.fromkeys([*own, *columns]) if c is not None and c not in derived]
        present = set().union(*(r.keys() for r in rows))
        check_columns(pd.DataFrame(columns=sorted(map(str, present))), wanted, source=name)

        base_dir = Path(self.structure_dir) if self.structure_dir else Path(path).parent
        records: list[Record] = []
        seen: dict[str, int] = {}
        for i, row in enumerate(rows):
            if aflow:
                rid = str(row["aflow"])
            else:
                rid = str(row[self.id_column]) if self.id_column else f"{name}:{i}"
            seen[rid] = seen.get(rid, 0) + 1
            if seen[rid] > 1:
                rid = f"{rid}#{seen[rid]}"
            raw = row.pop(structure_key)
            records.append(self._record(rid, raw, dict(row), base_dir=base_dir, columns=columns, aflow=aflow))
        return records

    def _resolve(self, value: Any, base_dir: Path) -> Any:
        """A one-line string naming a file relative to ``base_dir`` -> that file's path."""
        if isinstance(value, str) and "\n" not in value.strip() and value.strip():
            candidate = Path(value.strip()).expanduser()
            if not candidate.is_absolute() and (base_dir / candidate).is_file():
                return str(base_dir / candidate)
        return value

    def _record(
        self, rid: str, raw: Any, row: dict[str, Any], *, base_dir: Path, columns: list[str], aflow: bool
    ) -> CrystalRecord:
        from scifm.encoders.crystal import parse_structure

        values: dict[str, list[Any]] = {}
        rec = CrystalRecord(id=rid, values=values, row=row)
        try:
            value = self._resolve(raw, base_dir)
            structure = parse_structure(value, record=rid, min_distance=self.min_distance)
            if self.encode_crystal:
                values["crystal"] = [structure]
            self._derive(structure, row, columns=columns)
            if self.precursor_column:
                smiles = _as_list(row[self.precursor_column], record=rid, column=self.precursor_column)
                values["molecule"] = smiles
                row.setdefault("precursor_mols", ", ".join([_MOL] * len(smiles)))
                row.setdefault("precursor_smiles", ", ".join(str(s) for s in smiles))
        except InvalidInputError as err:
            rec.error = err
            return rec
        if self.split == "composition":
            rec.group = structure.composition.reduced_formula
        elif self.split == "prototype":
            if aflow:
                rec.group = "_".join(str(row["aflow"]).split("_")[:2])
            elif self.prototype_column and not _is_missing(row.get(self.prototype_column)):
                rec.group = str(row[self.prototype_column])
        return rec

    def _derive(self, structure: Any, row: dict[str, Any], *, columns: Sequence[str]) -> None:
        """Fill the computed columns the template reads (a file's own columns win)."""
        wanted = {c for c in columns if c in _DERIVED and _is_missing(row.get(c))}
        if "formula" in wanted:
            row["formula"] = structure.composition.reduced_formula
        if "full_formula" in wanted:
            row["full_formula"] = structure.composition.formula.replace(" ", "")
        if "num_sites" in wanted:
            row["num_sites"] = len(structure)
        if "cif" in wanted:
            cif = require("pymatgen.io.cif", extra="crystal")
            # 4 decimals (~0.004 Å in a 10 Å cell) keep generation targets short.
            text = str(cif.CifWriter(structure, symprec=self.cif_symprec, significant_figures=4))
            row["cif"] = "\n".join(line for line in text.splitlines() if not line.startswith("#")).strip()
        if "spacegroup" in wanted:
            symbol, _ = structure.get_space_group_info(symprec=self.cif_symprec or 0.1)
            row["spacegroup"] = symbol

    def _sample(self, rec: Record, *, need_answer: bool) -> Sample:
        if isinstance(rec, CrystalRecord) and rec.error is not None:
            raise rec.error
        return super()._sample(rec, need_answer=need_answer)
