"""Errors that scifm raises for bad user input and missing optional dependencies."""

from __future__ import annotations


class InvalidInputError(ValueError):
    """A record (a SMILES, a CIF, a cell, a prompt) that scifm cannot use.

    The message always names the record and the problem, so that a user with a file of
    100k rows can find and fix the bad one.

    Args:
        record: an identifier of the bad record: a row id, a file name and index, ``"molecules[3]"``.
        problem: what is wrong with it, in words (the offending value included where short).
    """

    def __init__(self, record: str, problem: str) -> None:
        self.record = record
        self.problem = problem
        super().__init__(f"record {record!r}: {problem}")


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says which extra installs it."""

    def __init__(self, package: str, extra: str) -> None:
        self.package = package
        self.extra = extra
        super().__init__(
            f"{package!r} is required for this feature but is not installed; "
            f'install it with: pip install "scifm[{extra}]"'
        )
