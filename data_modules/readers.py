"""Read users' tables (CSV, TSV, JSON lines, Parquet, SDF) into a pandas ``DataFrame``.

Readers do not validate records: an SDF record that RDKit cannot read comes back as a row whose
``mol`` is ``None``, so that the caller can report it by name (or skip it and count it).
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from scifm._extras import require
from scifm.errors import InvalidInputError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["FORMATS", "check_columns", "read_table"]

TableFormat = Literal["auto", "csv", "tsv", "jsonl", "parquet", "sdf"]
FORMATS: tuple[str, ...] = ("csv", "tsv", "jsonl", "parquet", "sdf")

_SUFFIX_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".sdf": "sdf",
}
# pandas reads these compressions of text formats transparently; SDF is read here, gzip only.
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zip", ".zst")
# Columns the SDF reader computes; SD properties of the same name are kept with this suffix.
_SDF_COMPUTED = ("_Name", "smiles", "mol")
_SD_COLLISION_SUFFIX = "_sd"
_SD_PROPERTY_HEADER = re.compile(r"^>.*?<([^>]*)>")


def _detect_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in _COMPRESSIONS else ""
    fmt = _SUFFIX_FORMATS.get(suffixes[-1]) if suffixes else None
    unsupported_compression = (fmt == "parquet" and compression) or (
        fmt == "sdf" and compression not in ("", ".gz")
    )
    if fmt is None or unsupported_compression:
        known = ", ".join(sorted(_SUFFIX_FORMATS))
        raise ValueError(
            f"cannot tell the format of {str(path)!r} from its name; valid suffixes are {known} "
            f"(text formats may end in {', '.join(_COMPRESSIONS)}; SDF in .gz only), or pass "
            f"format= one of {list(FORMATS)}"
        )
    return fmt


def read_table(
    path: str | os.PathLike[str],
    *,
    format: TableFormat = "auto",
) -> pd.DataFrame:
    """Read a file of records into a ``DataFrame``, one row per record, in file order.

    Args:
        path: the file. Compressed text files (``.csv.gz``, ``.jsonl.bz2``, ...) are read
            transparently; ``.sdf.gz`` too.
        format: ``"auto"`` picks the format from the suffix (``.csv``, ``.tsv``,
            ``.jsonl``/``.ndjson``, ``.parquet``, ``.sdf``). (default: ``"auto"``)

    Returns:
        The table. For SDF: the SD properties (numeric where every value parses as a number,
        strings otherwise), plus ``"_Name"`` (the title line), ``"smiles"`` (canonical SMILES) and
        ``"mol"`` (the RDKit ``Mol``); both are ``None`` for a record RDKit cannot read, whose
        name and properties are still read from its text. An SD property named ``smiles`` or
        ``mol`` is kept as ``smiles_sd`` / ``mol_sd``.

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a file.
        ValueError: ``format`` is not a known format, or ``"auto"`` cannot tell it from the name.
        InvalidInputError: the file is empty, holds no records, or cannot be parsed as ``format``.
    """
    path = Path(path)
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; valid formats are {['auto', *FORMATS]}")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {str(path)!r}")
    fmt = _detect_format(path) if format == "auto" else format
    source = str(path)
    if path.stat().st_size == 0:
        raise InvalidInputError(source, "the file holds no records")

    import pandas as pd

    try:
        if fmt == "csv":
            frame = pd.read_csv(path)
        elif fmt == "tsv":
            frame = pd.read_csv(path, sep="\t")
        elif fmt == "jsonl":
            # dtype/convert_dates off: keep values as JSON typed them ("007" stays a string).
            frame = pd.read_json(path, lines=True, dtype=False, convert_dates=False)
        elif fmt == "parquet":
            frame = pd.read_parquet(path)
        else:
            frame = _read_sdf(path)
    except pd.errors.EmptyDataError:
        raise InvalidInputError(source, "the file holds no records") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidInputError(source, f"cannot be read as {fmt}: {exc}") from exc
    if len(frame) == 0:
        raise InvalidInputError(source, "the file holds no records")
    return frame


def _sd_text_fields(text: str) -> tuple[str, dict[str, str]]:
    """Title line and SD properties of one record's raw text (for records RDKit rejects)."""
    lines = text.splitlines()
    name = lines[0].strip() if lines else ""
    props: dict[str, str] = {}
    key: str | None = None
    values: list[str] = []
    for line in lines[1:]:
        match = _SD_PROPERTY_HEADER.match(line)
        if match:
            key, values = match.group(1), []
        elif key is not None:
            if line.strip() == "" or line.startswith("$$$$"):
                props[key] = "\n".join(values)
                key = None
            else:
                values.append(line)
    if key is not None:
        props[key] = "\n".join(values)
    return name, props


def _read_sdf(path: Path) -> pd.DataFrame:
    Chem = require("rdkit.Chem", extra="molecule")
    rdBase = require("rdkit.rdBase", extra="molecule")
    import pandas as pd

    blocker = rdBase.BlockLogs()  # bad records are reported by the caller, not on stderr
    try:
        if path.suffix.lower() == ".gz":
            with gzip.open(path, "rt") as handle:
                supplier = Chem.SDMolSupplier()
                supplier.SetData(handle.read())
        else:
            supplier = Chem.SDMolSupplier(str(path))
        names: list[str] = []
        mols: list[Any] = []
        smiles: list[str | None] = []
        props: list[dict[str, str]] = []
        for i in range(len(supplier)):
            mol = supplier[i]
            if mol is None:
                name, record_props = _sd_text_fields(supplier.GetItemText(i))
                smiles.append(None)
            else:
                name = mol.GetProp("_Name") if mol.HasProp("_Name") else ""
                record_props = {key: mol.GetProp(key) for key in mol.GetPropNames()}
                smiles.append(Chem.MolToSmiles(mol))
            names.append(name)
            mols.append(mol)
            props.append(record_props)
    finally:
        del blocker

    columns: dict[str, list[Any]] = {}
    for record_props in props:
        for key in record_props:
            columns.setdefault(key, [])
    table: dict[str, Any] = {"_Name": names}
    for key in columns:
        column = key + _SD_COLLISION_SUFFIX if key in _SDF_COMPUTED else key
        series = pd.Series([p.get(key) for p in props], dtype=object)
        try:
            table[column] = pd.to_numeric(series)
        except (ValueError, TypeError):
            table[column] = series
    table["smiles"] = smiles
    table["mol"] = pd.Series(mols, dtype=object)
    return pd.DataFrame(table)


def check_columns(frame: pd.DataFrame, columns: Sequence[str], *, source: str) -> None:
    """Check that ``frame`` has every column in ``columns``.

    Args:
        frame: the table read from ``source``.
        columns: the required column names.
        source: the file (or other origin) of ``frame``, used as the record in the error.

    Raises:
        InvalidInputError: one or more columns are missing; the message lists them and the
            columns the file does have.
    """
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InvalidInputError(
            source,
            f"missing column(s) {missing}; the file has columns {[str(c) for c in frame.columns]}",
        )
