"""Train/validation/test splits: random, by group, and by Bemis–Murcko scaffold.

Every function returns three sorted lists of indices that together hold each index of
``range(n)`` exactly once, and gives the same split for the same inputs and seed.
"""

from __future__ import annotations

import math
import numbers
import random
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

from scifm._extras import require

if TYPE_CHECKING:
    from rdkit import Chem

__all__ = ["group_split", "random_split", "scaffold_split"]

Split = tuple[list[int], list[int], list[int]]


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(fractions)
    if (
        len(values) != 3
        or not all(isinstance(f, numbers.Real) and math.isfinite(f) and f >= 0 for f in values)
        or abs(sum(values) - 1.0) > 1e-6
    ):
        raise ValueError(
            "fractions must be three non-negative numbers (train, val, test) that sum to 1; "
            f"got {fractions!r}"
        )
    return float(values[0]), float(values[1]), float(values[2])


def random_split(n: int, *, fractions: tuple[float, float, float], seed: int) -> Split:
    """Split ``range(n)`` at random into train/val/test.

    Args:
        n: number of records.
        fractions: the train, val and test fractions; non-negative, summing to 1.
        seed: seed of the permutation.

    Returns:
        ``(train, val, test)`` sorted index lists of sizes ``round(f_train * n)``,
        ``round((f_train + f_val) * n) - round(f_train * n)`` and the rest.

    Raises:
        ValueError: ``n`` is negative or ``fractions`` are invalid.
    """
    f_train, f_val, _ = _check_fractions(fractions)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    end_train = round(f_train * n)
    end_val = min(n, round((f_train + f_val) * n))
    return (
        sorted(order[:end_train]),
        sorted(order[end_train:end_val]),
        sorted(order[end_val:]),
    )


def group_split(groups: Sequence[Hashable], *, fractions: tuple[float, float, float], seed: int) -> Split:
    """Split records so that no group spans two splits ("balanced" group split).

    Groups larger than half the target validation or test size come first, largest first;
    the remaining groups follow in a seeded random order. Each group goes to train if it still
    fits there (or train is empty), else to validation if it fits, else to test. Large groups
    thus land in train and validation/test get many small groups (a variant of chemprop's
    balanced scaffold split, which also shuffles the large groups and so may put the largest
    one in test). The split sizes only approximate ``fractions``: groups are never divided.

    Args:
        groups: the group of each record (a scaffold, a composition, ...); record ``i`` is
            ``groups[i]``.
        fractions: the train, val and test fractions; non-negative, summing to 1.
        seed: seed of the order of the small groups.

    Returns:
        ``(train, val, test)`` sorted index lists.

    Raises:
        ValueError: ``fractions`` are invalid.
    """
    f_train, f_val, f_test = _check_fractions(fractions)
    n = len(groups)
    members: dict[Hashable, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    train_size, val_size, test_size = f_train * n, f_val * n, f_test * n

    def is_big(indices: list[int]) -> bool:
        return len(indices) > val_size / 2 or len(indices) > test_size / 2

    # Big groups largest first (stable: ties keep first-appearance order), so they land in
    # train while it has room; small groups in a seeded random order fill the rest.
    big = sorted((m for m in members.values() if is_big(m)), key=len, reverse=True)
    small = [m for m in members.values() if not is_big(m)]
    random.Random(seed).shuffle(small)

    train: list[int] = []
    val: list[int] = []
    test: list[int] = []
    for indices in big + small:
        # An empty train takes any group: a group bigger than the whole train share must not
        # swell the test set instead.
        if not train or len(train) + len(indices) <= train_size:
            train += indices
        elif len(val) + len(indices) <= val_size:
            val += indices
        else:
            test += indices
    return sorted(train), sorted(val), sorted(test)


def murcko_scaffold(value: str | Chem.Mol, *, record: str) -> str:
    """Bemis–Murcko scaffold SMILES of a molecule, without chirality (``""`` if acyclic).

    Raises:
        InvalidInputError: ``value`` is not a valid molecule (see ``parse_molecule``).
    """
    from scifm.encoders.molecule import parse_molecule

    scaffold_mod = require("rdkit.Chem.Scaffolds.MurckoScaffold", extra="molecule")
    mol = parse_molecule(value, record=record)
    return str(scaffold_mod.MurckoScaffoldSmiles(mol=mol, includeChirality=False))


def scaffold_split(
    smiles: Sequence[str | Chem.Mol], *, fractions: tuple[float, float, float], seed: int
) -> Split:
    """Split molecules so that no Bemis–Murcko scaffold spans two splits.

    Acyclic molecules share the empty scaffold. See :func:`group_split` for how scaffold groups
    are assigned.

    Args:
        smiles: SMILES strings (or RDKit ``Mol``\\ s), one per record.
        fractions: the train, val and test fractions; non-negative, summing to 1.
        seed: seed of the scaffold-group order.

    Returns:
        ``(train, val, test)`` sorted index lists.

    Raises:
        ValueError: ``fractions`` are invalid.
        InvalidInputError: a SMILES is invalid; the record is ``"smiles[i]"``.
    """
    _check_fractions(fractions)
    scaffolds = [murcko_scaffold(s, record=f"smiles[{i}]") for i, s in enumerate(smiles)]
    return group_split(scaffolds, fractions=fractions, seed=seed)
