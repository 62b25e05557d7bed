"""Placeholder expansion, answer-only labels, the splice and the connectors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scifm import InvalidInputError
from scifm.backbone import load_tokenizer
from scifm.config import BackboneConfig, ConnectorConfig
from scifm.connectors import MLPProjector, Resampler, build_connector
from scifm.splice import splice
from scifm.tokenization import IGNORE_INDEX, Collator, PromptProcessor, Sample, TokenCount


def _processor(backbone_dir: Path, *, k: int = 3, max_length: int = 96, chat: bool = True) -> PromptProcessor:
    tok = load_tokenizer(BackboneConfig(name=str(backbone_dir)))
    return PromptProcessor(
        tok,
        placeholders={"molecule": "<mol>", "cell": "<cell>"},
        token_counts={"molecule": TokenCount(fixed=k), "cell": TokenCount(per_item=len)},
        use_chat_template=chat,
        max_length=max_length,
    )


def test_placeholders_expand_to_token_counts(llama_dir: Path) -> None:
    proc = _processor(llama_dir, k=3)
    mol_id, cell_id = proc.placeholder_ids["molecule"], proc.placeholder_ids["cell"]
    sample = Sample(
        id="r0",
        prompt="Compare <mol> with <mol> in <cell>",
        answer="yes",
        items={"molecule": ["a", "b"], "cell": [[0] * 5]},
    )
    enc = proc.encode(sample)
    assert enc["input_ids"].count(mol_id) == 6  # two molecules x K=3
    assert enc["input_ids"].count(cell_id) == 5  # per-item count: len([0]*5)


def test_labels_cover_only_the_answer(llama_dir: Path) -> None:
    proc = _processor(llama_dir)
    tok = proc.tokenizer
    enc = proc.encode(
        Sample(id="r", prompt="What is <mol>?", answer="-3.25 kcal/mol", items={"molecule": ["x"]})
    )
    answer_ids = tok("-3.25 kcal/mol", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    labelled = [t for t in enc["labels"] if t != IGNORE_INDEX]
    assert labelled == answer_ids
    n = len(answer_ids)
    assert enc["input_ids"][-n:] == answer_ids
    assert all(t == IGNORE_INDEX for t in enc["labels"][:-n])
    # chat template wraps the user turn
    assert tok.decode(enc["input_ids"]).startswith("<|im_start|>user")


def test_prompt_without_chat_template_gets_no_template(gpt2_dir: Path) -> None:
    proc = _processor(gpt2_dir, chat=True)  # GPT-2 tokenizer has no chat template
    assert not proc.use_chat_template
    enc = proc.encode(Sample(id="r", prompt="What is <mol>?", answer="1", items={"molecule": ["x"]}))
    assert "<|im_start|>" not in proc.tokenizer.decode(enc["input_ids"])


@pytest.mark.parametrize(
    ("prompt", "items", "message"),
    [
        ("What is <mol> and <mol>?", {"molecule": ["a"]}, "2 <mol> placeholder(s) but 1 molecule"),
        ("What is this?", {"molecule": ["a"]}, "0 <mol> placeholder(s) but 1 molecule"),
        ("What is <mol>?", {}, "1 <mol> placeholder(s) but 0 molecule"),
        ("What is <crystal>?", {"crystal": ["a"]}, "no 'crystal' encoder"),
    ],
)
def test_placeholder_item_mismatch_names_the_record(
    llama_dir: Path, prompt: str, items: dict, message: str
) -> None:
    proc = _processor(llama_dir)
    with pytest.raises(InvalidInputError, match="rec-7") as err:
        proc.encode(Sample(id="rec-7", prompt=prompt, answer="x", items=items))
    assert message in str(err.value)


def test_overlong_prompt_is_refused_and_long_answer_cut(llama_dir: Path) -> None:
    proc = _processor(llama_dir, k=20, max_length=30)
    with pytest.raises(InvalidInputError, match="over max_length=30"):
        proc.encode(
            Sample(id="long", prompt="What is <mol> and <mol>?", answer="x", items={"molecule": ["a", "b"]})
        )
    proc = _processor(llama_dir, k=2, max_length=30)
    enc = proc.encode(Sample(id="ok", prompt="<mol>?", answer="benzene " * 40, items={"molecule": ["a"]}))
    assert len(enc["input_ids"]) == 30
    assert enc["input_ids"].count(proc.placeholder_ids["molecule"]) == 2


def test_collator_pads_right_for_training_and_left_for_generation(llama_dir: Path) -> None:
    proc = _processor(llama_dir, k=2)
    samples = [
        Sample(id="a", prompt="<mol>?", answer="yes", items={"molecule": ["m1"]}, target=[1.0]),
        Sample(
            id="b",
            prompt="What is the aqueous solubility of <mol>?",
            answer="no",
            items={"molecule": ["m2"]},
            target=[2.0],
        ),
    ]
    right = Collator(proc, {"molecule": list})(samples)
    left = Collator(proc, {"molecule": list}, padding_side="left", with_answers=False)(samples)
    assert right["attention_mask"][0, 0] == 1 and right["attention_mask"][0, -1] == 0
    assert left["attention_mask"][0, -1] == 1 and left["attention_mask"][0, 0] == 0
    assert (left["labels"] == IGNORE_INDEX).all()
    assert right["items"]["molecule"] == ["m1", "m2"]
    assert torch.equal(right["target"], torch.tensor([[1.0], [2.0]]))
    # the head reads the last prompt token: just before the answer when right padded
    for row, s in enumerate(samples):
        idx = int(right["last_prompt_index"][row])
        assert right["labels"][row, idx] == IGNORE_INDEX and right["labels"][row, idx + 1] != IGNORE_INDEX
        assert int(left["last_prompt_index"][row]) == left["input_ids"].shape[1] - 1, s.id


def test_splice_writes_features_in_order_and_checks_counts() -> None:
    ids = torch.tensor([[5, 9, 9, 5, 0], [9, 9, 5, 5, 5]])
    embeds = torch.zeros(2, 5, 3)
    feats = torch.arange(2 * 2 * 3, dtype=torch.float).view(2, 2, 3)
    out = splice(embeds, ids, {9: (feats, torch.ones(2, 2, dtype=torch.bool))})
    assert torch.equal(out[0, 1], feats[0, 0]) and torch.equal(out[0, 2], feats[0, 1])
    assert torch.equal(out[1, 0], feats[1, 0]) and torch.equal(out[1, 1], feats[1, 1])
    assert out[0, 0].abs().sum() == 0
    with pytest.raises(ValueError, match="3 placeholder positions in the text but 4 soft tokens"):
        splice(
            embeds[:, :3],
            torch.tensor([[9, 9, 9], [5, 5, 5]]),
            {9: (feats, torch.ones(2, 2, dtype=torch.bool))},
        )
    with pytest.raises(ValueError, match="no item was given"):
        splice(embeds, ids, {}, placeholder_ids=[9])


def test_splice_uses_only_valid_tokens_of_variable_length_items() -> None:
    ids = torch.tensor([[7, 7, 7, 1], [7, 1, 1, 1]])
    feats = torch.randn(2, 3, 4)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    out = splice(torch.zeros(2, 4, 4), ids, {7: (feats, mask)})
    assert torch.equal(out[1, 0], feats[1, 0])


def test_connectors_shapes_and_masking() -> None:
    tokens, mask = torch.randn(3, 5, 16), torch.ones(3, 5, dtype=torch.bool)
    mask[0, 2:] = False
    mlp = build_connector(ConnectorConfig(kind="mlp"), in_dim=16, out_dim=32)
    assert isinstance(mlp, MLPProjector)
    out, out_mask = mlp(tokens, mask)
    assert out.shape == (3, 5, 32) and torch.equal(out_mask, mask)
    res = build_connector(ConnectorConfig(kind="resampler", num_tokens=4, num_heads=2), in_dim=16, out_dim=32)
    assert isinstance(res, Resampler)
    out, out_mask = res(tokens, mask)
    assert out.shape == (3, 4, 32) and bool(out_mask.all())
    # padded encoder tokens do not change the resampler's output
    changed = tokens.clone()
    changed[0, 2:] = 100.0
    out2, _ = res(changed, mask)
    assert torch.allclose(out[0], out2[0], atol=1e-5)
    cfg = ConnectorConfig()
    cfg.kind = "qformer"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="unknown connector kind"):
        build_connector(cfg, in_dim=16, out_dim=32)
