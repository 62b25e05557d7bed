"""The featurization cache: exact round trip, lazy memory-mapped reads, keys that invalidate."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from scifm.cache import CachedSamples, cache_key, file_digest, read_cache, write_cache
from scifm.encoders.molecule import MoleculeFeaturizer
from scifm.tokenization import Sample


def _samples() -> list[Sample]:
    feat = MoleculeFeaturizer()
    return [
        Sample(
            id="a",
            prompt="<mol>?",
            answer="1.00",
            items={"molecule": [feat("CCO", record="a")]},
            target=[1.0],
        ),
        Sample(
            id="b",
            prompt="<mol> or <mol>?",
            answer="first",
            target=2,
            items={"molecule": [feat("[Na+].[Cl-]", record="b0"), feat("c1ccccc1O", record="b1")]},
        ),
        Sample(id="c", prompt="no item", answer=None, items={}, target=None),
    ]


def test_round_trip_is_exact_and_lazy(tmp_path: Path) -> None:
    samples = _samples()
    assert write_cache(tmp_path, "k1", samples, report={"skipped": 0})
    entry = read_cache(tmp_path, "k1")
    assert entry is not None and entry.report == {"skipped": 0}
    cached = CachedSamples(entry)
    assert len(cached) == 3
    for original, loaded in zip(samples, cached.samples, strict=True):
        assert (loaded.id, loaded.prompt, loaded.answer, loaded.target) == (
            original.id,
            original.prompt,
            original.answer,
            original.target,
        )
        assert loaded.items.keys() == original.items.keys()
        for a, b in zip(original.items.get("molecule", []), loaded.items.get("molecule", []), strict=True):
            assert a.num_nodes == b.num_nodes
            for key in ("x", "edge_index", "edge_attr"):
                assert torch.equal(a[key], b[key]) and a[key].dtype == b[key].dtype
    # picklable for workers: the open file handle is not carried along
    clone = pickle.loads(pickle.dumps(cached))
    assert clone._handle is None and torch.equal(
        clone[1].items["molecule"][1].x, samples[1].items["molecule"][1].x
    )


def test_uncacheable_items_write_nothing(tmp_path: Path) -> None:
    odd = [Sample(id="x", prompt="<mol>", items={"molecule": [object()]})]
    assert not write_cache(tmp_path, "k2", odd, report={})
    assert read_cache(tmp_path, "k2") is None and not list(tmp_path.iterdir())


def test_keys_follow_content_and_settings(tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("smiles\nCCO\n")
    first = file_digest(data)
    data.write_text("smiles\nCCN\n")
    assert file_digest(data) != first
    base = {"file": first, "featurizers": {"molecule": {"largest_fragment": False}}}
    changed = {"file": first, "featurizers": {"molecule": {"largest_fragment": True}}}
    assert cache_key(base) == cache_key(dict(reversed(list(base.items()))))
    assert cache_key(base) != cache_key(changed)


def test_data_module_featurizes_once_and_invalidates_on_changes(
    llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pandas as pd
    from conftest import tiny_config

    import scifm.data_modules.base as base
    from scifm.data_modules.molecule import MoleculeDataModule
    from scifm.model import ScifmModel

    path = tmp_path / "mols.csv"
    pd.DataFrame({"smiles": ["CCO", "c1ccccc1", "C1CC", "CCN"], "expt": [1.0, 2.0, 3.0, 4.0]}).to_csv(
        path, index=False
    )
    model = ScifmModel.from_config(tiny_config(llama_dir))
    calls = []
    real = base.ScifmDataModule._featurize

    def counting(self: base.ScifmDataModule, *args: object, **kwargs: object) -> object:
        if args[0]:  # the (empty) val and test splits aside
            calls.append(1)
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(base.ScifmDataModule, "_featurize", counting)

    def build(**kwargs: object) -> MoleculeDataModule:
        dm = MoleculeDataModule(
            str(path),
            template="freesolv",
            fractions=(1.0, 0.0, 0.0),
            on_error="skip",
            cache_dir=str(tmp_path / "cache"),
            **kwargs,
        )  # type: ignore[arg-type]
        dm.attach(model)
        dm.setup("fit")
        return dm

    first = build()
    n_first = len(calls)
    second = build()
    assert len(calls) == n_first  # nothing featurized again
    assert isinstance(second.datasets["train"], CachedSamples)
    assert second.reports["train (4 records)"].skipped == 1  # the skip report survives the cache
    a, b = first.datasets["train"].samples, second.datasets["train"].samples
    assert [s.id for s in a] == [s.id for s in b]
    assert all(
        torch.equal(x.items["molecule"][0].x, y.items["molecule"][0].x) for x, y in zip(a, b, strict=True)
    )

    model.featurizers["molecule"] = MoleculeFeaturizer(largest_fragment=True)  # a featurizer setting
    build()
    assert len(calls) == n_first + 1
    path.write_text(path.read_text().replace("CCN", "CCCN"))  # the file's content
    build()
    assert len(calls) == n_first + 2
    build(cache=False)
    assert len(calls) == n_first + 3
