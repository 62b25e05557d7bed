"""Shared machinery of scifm's LightningDataModules: records -> samples -> splits -> loaders.

A subclass reads its files into :class:`Record` objects (raw modality values + the row's
columns); the base class fills the template, featurizes every item with the model's own
featurizers, checks each sample against the tokenizer (placeholder counts, length), splits,
and serves DataLoaders whose collation (tokenization, graph batching) runs in the workers.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from scifm.data_modules.splits import group_split, random_split
from scifm.errors import InvalidInputError
from scifm.sampling import GlobalBatchSampler
from scifm.templates import Template, load_template
from scifm.tokenization import Sample

if TYPE_CHECKING:
    from scifm.model import ScifmModel

log = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]


@dataclass
class Record:
    """One row of a user's file before featurization.

    ``values[modality]`` holds the raw items (SMILES, Mol, Structure, ...) in placeholder order;
    ``row`` the columns the template reads; ``group`` a key for group splits (a scaffold).
    """

    id: str
    values: dict[str, list[Any]]
    row: dict[str, Any]
    group: str | None = None


@dataclass
class SkipReport:
    """Records skipped under ``on_error: skip``, counted by problem, with a few examples."""

    total: int = 0
    skipped: int = 0
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, error: InvalidInputError) -> None:
        self.skipped += 1
        self.reasons[error.problem.split(":")[0][:80]] += 1
        if len(self.examples) < 5:
            self.examples.append(str(error))

    def summary(self, source: str) -> str:
        if not self.skipped:
            return f"{source}: all {self.total} records used"
        lines = [f"{source}: skipped {self.skipped} of {self.total} records"]
        lines += [f"  {n} x {reason}" for reason, n in self.reasons.most_common()]
        lines += ["  e.g. " + e for e in self.examples]
        return "\n".join(lines)


class SampleDataset(Dataset[Sample]):
    def __init__(self, samples: Sequence[Sample]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]


class ScifmDataModule(L.LightningDataModule):
    """Base class; subclasses implement :meth:`read_records`.

    Args:
        path: the training file (or the only file, split by ``split``).
        template: a template name in ``configs/templates/``, a YAML path, or a mapping.
        val_path, test_path: separate files for validation/test; when given, ``path`` is not split.
        predict_path: prompts to answer in ``scifm predict`` (default: the test split).
        split: how ``path`` is divided ("random", or a subclass's grouped split) (default: "random").
        fractions: train/val/test fractions (default: (0.8, 0.1, 0.1)).
        seed: seed of the split and of the training order (default: 0).
        batch_size: samples per batch (default: 8).
        num_workers: DataLoader worker processes; collation runs there (default: 0).
        on_error: "raise" stops at the first bad record with :class:`InvalidInputError`;
            "skip" drops it and counts it in a report printed at the end of setup (default: "raise").
        max_records: read only the first N records of each file (default: all).
    """

    def __init__(
        self,
        path: str,
        *,
        template: str | dict[str, Any],
        val_path: str | None = None,
        test_path: str | None = None,
        predict_path: str | None = None,
        split: str = "random",
        fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
        seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 0,
        on_error: OnError = "raise",
        max_records: int | None = None,
    ) -> None:
        super().__init__()
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.path, self.val_path, self.test_path, self.predict_path = path, val_path, test_path, predict_path
        self.template: Template = load_template(template)
        if len(fractions) != 3:
            raise ValueError(f"fractions must be (train, val, test), got {fractions}")
        self.split, self.seed = split, seed
        self.fractions: tuple[float, float, float] = (
            float(fractions[0]),
            float(fractions[1]),
            float(fractions[2]),
        )
        self.batch_size, self.num_workers = batch_size, num_workers
        self.on_error: OnError = on_error
        self.max_records = max_records
        self.model: ScifmModel | None = None
        self.datasets: dict[str, SampleDataset] = {}
        self.reports: dict[str, SkipReport] = {}
        self.classes: list[str] = list(self.template.classes)

    # -- to implement --------------------------------------------------------------------------
    def read_records(self, path: str, *, columns: list[str]) -> list[Record]:
        """Read a file into records; a missing column of ``columns`` (those the template reads)
        or of the subclass's own raises :class:`InvalidInputError`."""
        raise NotImplementedError

    def valid_splits(self) -> tuple[str, ...]:
        return ("random",)

    # -- wiring --------------------------------------------------------------------------------
    def attach(self, model: ScifmModel) -> None:
        """Use ``model``'s featurizers and tokenizer (done by ``setup`` under a Trainer)."""
        self.model = model

    def setup(self, stage: str | None = None) -> None:
        if self.model is None:
            if self.trainer is None or self.trainer.lightning_module is None:
                raise RuntimeError("call attach(model) before setup() when not running under a Trainer")
            self.attach(self.trainer.lightning_module.model)  # type: ignore[union-attr,arg-type]
        if self.split not in self.valid_splits():
            raise ValueError(f"unknown split {self.split!r}; valid: {list(self.valid_splits())}")
        if not self.datasets:
            self._build()

    def _build(self) -> None:
        records = self._read(self.path, need_answer=True)
        if self.val_path or self.test_path:
            parts = {"train": records}
            if self.val_path:
                parts["val"] = self._read(self.val_path, need_answer=True)
            if self.test_path:
                parts["test"] = self._read(self.test_path, need_answer=True)
        else:
            if self.split == "random":
                idx = random_split(len(records), fractions=self.fractions, seed=self.seed)
            else:
                groups = [r.group if r.group is not None else r.id for r in records]
                idx = group_split(groups, fractions=self.fractions, seed=self.seed)
            parts = {
                name: [records[i] for i in ids]
                for name, ids in zip(("train", "val", "test"), idx, strict=True)
            }
        if self.template.label is not None and not self.classes:
            self.classes = sorted({str(r.row[self.template.label]) for r in parts["train"]})
        for name, recs in parts.items():
            self.datasets[name] = SampleDataset(self._samples(recs, source=f"{name} ({len(recs)} records)"))
        if self.predict_path:
            self.datasets["predict"] = SampleDataset(
                self._samples(
                    self._read(self.predict_path, need_answer=False), source="predict", need_answer=False
                )
            )
        sizes = {k: len(v) for k, v in self.datasets.items()}
        rank_zero_info(f"scifm data: {sizes} samples")

    def _read(self, path: str, *, need_answer: bool) -> list[Record]:
        template = self.template if need_answer else Template(prompt=self.template.prompt)
        records = self.read_records(path, columns=template.fields())
        return records[: self.max_records] if self.max_records is not None else records

    def _samples(self, records: Sequence[Record], *, source: str, need_answer: bool = True) -> list[Sample]:
        assert self.model is not None
        processor = self.model.processor()
        report = SkipReport(total=len(records))
        samples: list[Sample] = []
        for rec in records:
            try:
                sample = self._sample(rec, need_answer=need_answer)
                processor.encode(sample)  # placeholder counts and length, checked now, not mid-epoch
            except InvalidInputError as err:
                if self.on_error == "raise":
                    raise
                report.add(err)
                continue
            samples.append(sample)
        self.reports[source] = report
        message = report.summary(source)
        (rank_zero_warn if report.skipped else rank_zero_info)(message)
        if not samples and records:
            raise InvalidInputError(source, "every record was skipped; see the report above")
        return samples

    def _sample(self, rec: Record, *, need_answer: bool) -> Sample:
        assert self.model is not None
        items = {
            modality: [
                self.model.featurize(modality, value, record=rec.id if len(values) == 1 else f"{rec.id}[{k}]")
                for k, value in enumerate(values)
            ]
            for modality, values in rec.values.items()
        }
        if need_answer:
            prompt, answer = self.template.render(rec.row, record=rec.id)
            target: list[float] | int | None = self.template.target(rec.row, record=rec.id)
            if self.template.label is not None:
                label = str(rec.row[self.template.label])
                if label not in self.classes:
                    raise InvalidInputError(
                        rec.id, f"label {label!r} is not one of the classes {self.classes}"
                    )
                target = self.classes.index(label)
        else:
            prompt, _ = Template(prompt=self.template.prompt).render(rec.row, record=rec.id)
            answer, target = None, None
        return Sample(id=rec.id, prompt=prompt, answer=answer, items=items, target=target)

    # -- loaders -------------------------------------------------------------------------------
    def _loader(self, split: str, *, shuffle: bool, for_generation: bool = False) -> DataLoader[Any]:
        if split not in self.datasets:
            raise RuntimeError(f"no {split!r} data: give a {split}_path or split the training file")
        assert self.model is not None
        collate = self.model.collator(for_generation=for_generation)
        if for_generation:  # Lightning re-samples predict loaders itself (to track indices)
            return DataLoader(
                self.datasets[split],
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                collate_fn=collate,
            )
        rank, world = 0, 1
        if self.trainer is not None and self.trainer.world_size > 1:
            if self.trainer._accelerator_connector.use_distributed_sampler:
                raise ValueError(
                    "scifm's data modules shard batches across processes themselves: "
                    "set Trainer(use_distributed_sampler=False) (`--trainer.use_distributed_sampler false`)"
                )
            rank, world = self.trainer.global_rank, self.trainer.world_size
        sampler = GlobalBatchSampler(
            len(self.datasets[split]),
            batch_size=self.batch_size,
            shuffle=shuffle,
            seed=self.seed,
            rank=rank,
            world_size=world,
        )
        return DataLoader(
            self.datasets[split],
            batch_sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader[Any]:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader[Any]:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader[Any]:
        split = "predict" if "predict" in self.datasets else "test"
        return self._loader(split, shuffle=False, for_generation=True)
