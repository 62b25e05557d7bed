"""Shared machinery of scifm's LightningDataModules: records -> samples -> splits -> loaders.

A subclass reads its files into :class:`Record` objects (raw modality values + the row's
columns); the base class fills the template, featurizes every item with the model's own
featurizers, checks each sample against the tokenizer (placeholder counts, length), splits,
and serves DataLoaders whose collation (tokenization, graph batching) runs in the workers.
"""

from __future__ import annotations

import collections
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from scifm import __version__
from scifm.cache import CachedSamples, cache_key, default_cache_dir, file_digest, read_cache, write_cache
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "skipped": self.skipped,
            "reasons": dict(self.reasons),
            "examples": list(self.examples),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SkipReport:
        return cls(
            data["total"], data["skipped"], collections.Counter(data["reasons"]), list(data["examples"])
        )

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

    def text_lengths(self) -> list[int]:
        """Characters of prompt + answer per sample: a cheap proxy of token length for batching."""
        return [len(s.prompt) + len(s.answer or "") for s in self.samples]


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
        cache: keep featurized samples on disk, keyed by the file's content, the model's
            featurizer settings, the template and these reading options, so a later run (or
            another rank) does not featurize again (default: True). See :mod:`scifm.cache`.
        cache_dir: where (default: ``$SCIFM_CACHE`` or ``~/.cache/scifm/features``).
        group_by_length: batch training samples of similar text length together, in a seeded
            random order, so padding does not dominate (default: False). See
            :class:`~scifm.sampling.GlobalBatchSampler`.
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
        cache: bool = True,
        cache_dir: str | None = None,
        group_by_length: bool = False,
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
        self.cache = cache
        self.group_by_length = group_by_length
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self._digests: dict[str, str] = {}
        self.model: ScifmModel | None = None
        self.datasets: dict[str, SampleDataset | CachedSamples] = {}
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
        self._split_records = parts
        if self.template.label is not None and not self.classes:
            self.classes = sorted({str(r.row[self.template.label]) for r in parts["train"]})
        paths = {"train": self.path, "val": self.val_path or self.path, "test": self.test_path or self.path}
        for name, recs in parts.items():
            self.datasets[name] = self._samples(
                recs, source=f"{name} ({len(recs)} records)", path=paths[name]
            )
        if self.predict_path:
            self.datasets["predict"] = self._samples(
                self._read(self.predict_path, need_answer=False),
                source="predict",
                need_answer=False,
                path=self.predict_path,
            )
        sizes = {k: len(v) for k, v in self.datasets.items()}
        rank_zero_info(f"scifm data: {sizes} samples")

    def _read(self, path: str, *, need_answer: bool) -> list[Record]:
        template = self.template if need_answer else Template(prompt=self.template.prompt)
        records = self.read_records(path, columns=template.fields())
        return records[: self.max_records] if self.max_records is not None else records

    def _samples(
        self, records: Sequence[Record], *, source: str, path: str, need_answer: bool = True
    ) -> SampleDataset | CachedSamples:
        """Featurize and check ``records`` (read from ``path``), through the cache when on.

        Under several processes rank 0 featurizes and writes the cache while the others wait,
        then the other ranks read it (rank 0 keeps what it built). If rank 0 fails (a bad
        record under ``on_error: raise``), it still reaches the barrier, so the other ranks do
        not hang: they find no entry, featurize, and raise the same error.
        """
        key = self._cache_key(records, path=path, need_answer=need_answer) if self.cache else None
        trainer = self.trainer
        if key is not None and trainer is not None and trainer.world_size > 1:
            built = None
            try:
                if trainer.is_global_zero and read_cache(self.cache_dir, key) is None:
                    built = self._featurize(records, source=source, need_answer=need_answer, key=key)
            finally:
                trainer.strategy.barrier("scifm-featurization-cache")
            if built is not None:
                return built
        entry = read_cache(self.cache_dir, key) if key is not None else None
        if entry is None:
            return self._featurize(records, source=source, need_answer=need_answer, key=key)
        report = SkipReport.from_dict(entry.report)
        self._report(report, source, cached=True)
        return CachedSamples(entry)

    def _featurize(
        self, records: Sequence[Record], *, source: str, need_answer: bool, key: str | None
    ) -> SampleDataset:
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
        self._report(report, source, cached=False)
        if key is not None and not write_cache(self.cache_dir, key, samples, report=report.to_dict()):
            log.info("%s: items of this data set are not cacheable; featurized in memory only", source)
        return SampleDataset(samples)

    def _report(self, report: SkipReport, source: str, *, cached: bool) -> None:
        self.reports[source] = report
        message = report.summary(source) + (" (featurized earlier: read from the cache)" if cached else "")
        (rank_zero_warn if report.skipped else rank_zero_info)(message)
        if report.total and report.skipped == report.total:
            raise InvalidInputError(source, "every record was skipped; see the report above")

    def _cache_key(self, records: Sequence[Record], *, path: str, need_answer: bool) -> str:
        """Everything the featurized samples depend on: the file's bytes, which records (ids, in
        order), the model's featurizers and text settings, the template and reading options."""
        assert self.model is not None
        if path not in self._digests:
            self._digests[path] = file_digest(path) if Path(path).exists() else f"name:{path}"
        options = {
            k: v
            for k, v in vars(self).items()
            if not k.startswith("_")
            and k not in {"batch_size", "num_workers", "cache", "cache_dir", "trainer", "model", "datasets"}
            and isinstance(v, (str, int, float, bool, list, tuple, type(None)))
        }
        cfg = self.model.config
        return cache_key(
            {
                "scifm": __version__,
                "class": f"{type(self).__module__}.{type(self).__qualname__}",
                "file": self._digests[path],
                "records": hashlib.sha256("\n".join(r.id for r in records).encode()).hexdigest(),
                "featurizers": {m: f.config() for m, f in self.model.featurizers.items()},
                "text": [asdict(cfg.backbone), asdict(cfg.connector), len(self.model.tokenizer)],
                "template": asdict(self.template),
                "need_answer": need_answer,
                "classes": self.classes,
                "options": options,
            }
        )

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
            answer, target = self._reference(rec)
        return Sample(id=rec.id, prompt=prompt, answer=answer, items=items, target=target)

    def split_records(self, split: str) -> list[Record]:
        """The records behind ``datasets[split]``, in its order (skipped records left out): their
        raw values and table rows, e.g. to fit a baseline on exactly the same split.

        Raises:
            RuntimeError: called before ``setup``, or there is no such split.
        """
        if split not in self.datasets or split not in self._split_records:
            raise RuntimeError(f"no {split!r} split: call setup() first (splits: {sorted(self.datasets)})")
        by_id = {r.id: r for r in self._split_records[split]}
        dataset = self.datasets[split]
        return [by_id[dataset[i].id] for i in range(len(dataset))]

    def _reference(self, rec: Record) -> tuple[str | None, list[float] | int | None]:
        """The answer and target of a prompt-only record (``predict_path``) when its row happens
        to hold every column the template's answer reads, so ``scifm predict`` can score itself;
        else ``(None, None)``. Never raises: prompts are what ``predict`` needs."""
        try:  # render refuses absent or empty columns
            _, answer = self.template.render(rec.row, record=rec.id)
            target: list[float] | int | None = self.template.target(rec.row, record=rec.id)
            if self.template.label is not None:
                label = str(rec.row[self.template.label])
                target = self.classes.index(label) if label in self.classes else None
        except InvalidInputError:
            return None, None
        return answer, target

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
            lengths=self.datasets[split].text_lengths() if self.group_by_length and shuffle else None,
        )
        if split == "train":  # its position goes into checkpoints (state_dict)
            if self._resume_position is not None:
                sampler.skip_to(*self._resume_position)
                self._resume_position = None
            self._train_sampler = sampler
        return DataLoader(
            self.datasets[split],
            batch_sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate,
        )

    # -- exact resume ---------------------------------------------------------------------------
    # Set by _loader / load_state_dict (class-level defaults keep __init__ untouched).
    _train_sampler: GlobalBatchSampler | None = None
    _resume_position: tuple[int, int] | None = None
    _split_records: dict[str, list[Record]] = {}  # noqa: RUF012 - replaced per instance by _build

    def state_dict(self) -> dict[str, Any]:
        """The training data position, saved in Lightning checkpoints: the sampler's epoch and
        the global batches of it that the training loop has *consumed* (finished training
        steps), not those the DataLoader's workers have already prefetched."""
        sampler, trainer = self._train_sampler, self.trainer
        if sampler is None or trainer is None:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current  # a _ProcessedTracker
        consumed = int(getattr(progress, "processed"))  # noqa: B009
        epoch = sampler.epoch
        if consumed >= sampler.num_global_batches():
            epoch, consumed = epoch + 1, 0
        return {"epoch": epoch, "batches_consumed": consumed, "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training order where :meth:`state_dict` left it (Lightning calls this
        before it builds the training DataLoader)."""
        if not state_dict:
            return
        if int(state_dict["seed"]) != self.seed:
            raise ValueError(
                f"the checkpoint's data order was drawn with data seed {state_dict['seed']}, this run "
                f"uses {self.seed}: resume with the same data.seed"
            )
        self._resume_position = (int(state_dict["epoch"]), int(state_dict["batches_consumed"]))
        if self._train_sampler is not None:  # the loader exists already
            self._train_sampler.skip_to(*self._resume_position)
            self._resume_position = None

    def train_dataloader(self) -> DataLoader[Any]:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader[Any]:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader[Any]:
        split = "predict" if "predict" in self.datasets else "test"
        return self._loader(split, shuffle=False, for_generation=True)
