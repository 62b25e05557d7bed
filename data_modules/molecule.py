"""Molecule data: CSV / TSV / JSONL / Parquet tables with SMILES columns, and SDF files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scifm.data_modules.base import Record, ScifmDataModule
from scifm.data_modules.readers import check_columns, read_table
from scifm.data_modules.splits import murcko_scaffold
from scifm.errors import InvalidInputError


class MoleculeDataModule(ScifmDataModule):
    """Reads molecule tables and turns them into instruction data through a template.

    Args:
        path: a CSV, TSV, JSONL, Parquet or SDF file (format from the suffix, or ``format``).
        template: template name, YAML path or mapping (see :mod:`scifm.templates`); its
            ``<mol>`` placeholders are filled, in order, from ``molecule_columns``.
        molecule_columns: column(s) holding SMILES (or RDKit Mols: the ``mol`` column of an SDF)
            (default: "smiles").
        id_column: column naming each record in error messages and predictions
            (default: ``"<file name>:<row index from 0>"``).
        format: "auto", "csv", "tsv", "jsonl", "parquet" or "sdf" (default: "auto").
        split: "random" or "scaffold" (Bemis-Murcko scaffolds of the first molecule column;
            no scaffold is shared between train, val and test) (default: "random").
        scaffold_column: the SMILES column the scaffold split reads instead of the first
            molecule column, e.g. for a text-only template (``molecule_columns: []``) that
            should keep the same split as its molecule twin (default: None).

    The other arguments are :class:`~scifm.data_modules.base.ScifmDataModule`'s.
    """

    def __init__(
        self,
        path: str,
        *,
        template: str | dict[str, Any],
        molecule_columns: str | list[str] = "smiles",
        id_column: str | None = None,
        format: str = "auto",
        scaffold_column: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(path, template=template, **kwargs)
        self.molecule_columns = (
            [molecule_columns] if isinstance(molecule_columns, str) else list(molecule_columns)
        )
        self.id_column = id_column
        self.format = format
        if self.split == "scaffold" and not self.molecule_columns and scaffold_column is None:
            raise ValueError("split: scaffold needs a molecule column or a scaffold_column")
        self.scaffold_column = scaffold_column

    def valid_splits(self) -> tuple[str, ...]:
        return ("random", "scaffold")

    def read_records(self, path: str, *, columns: list[str]) -> list[Record]:
        frame = read_table(path, format=self.format)  # type: ignore[arg-type]
        name = Path(path).name
        wanted = self.molecule_columns + columns
        if self.id_column:
            wanted.append(self.id_column)
        if self.split == "scaffold" and self.scaffold_column:
            wanted.append(self.scaffold_column)
        check_columns(frame, list(dict.fromkeys(wanted)), source=name)
        rows: list[dict[str, Any]] = [
            {str(k): v for k, v in r.items()} for r in frame.to_dict(orient="records")
        ]
        records = []
        for i, row in enumerate(rows):
            rid = str(row[self.id_column]) if self.id_column else f"{name}:{i}"
            values = [row[c] for c in self.molecule_columns]
            records.append(Record(id=rid, values={"molecule": values}, row=row))
        if self.split == "scaffold":
            for rec in records:
                source = rec.row[self.scaffold_column] if self.scaffold_column else rec.values["molecule"][0]
                try:
                    rec.group = murcko_scaffold(source, record=rec.id)
                except InvalidInputError:
                    rec.group = None  # reported (or skipped) when the record is featurized
        return records
