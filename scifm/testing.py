"""Tiny random Hugging Face backbones for tests, examples and benchmarks, built in code.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on a few sentences, the
models are 2-layer Llama / GPT-2 with hidden size 32, saved with ``save_pretrained`` so that
they load through the same ``from_pretrained`` path as any real backbone::

    from scifm.testing import make_backbone
    make_backbone(tmp_path / "tiny")          # then BackboneConfig(name=str(tmp_path / "tiny"))
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "What is the hydration free energy of this molecule in kcal/mol?",
    "The hydration free energy is -3.25 kcal/mol. Which is more soluble in water?",
    "What is the aqueous solubility of the compound? -2.18 log(mol/L) benzene ethanol",
    "What is the cell type of this cell? T cell B cell NK cell monocyte",
    "0 1 2 3 4 5 6 7 8 9 . - yes no first second molecule crystal cell",
]


def _tokenizer(with_chat: bool) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 5, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>" if with_chat else "<|endoftext|>",
        bos_token="<|endoftext|>",
    )
    if with_chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def make_backbone(directory: Path, *, kind: str = "llama") -> Path:
    """Save a 2-layer random ``kind`` ("llama" or "gpt2") model and its tokenizer into ``directory``."""
    torch.manual_seed(0)
    tokenizer = _tokenizer(with_chat=kind == "llama")
    if kind == "llama":
        cfg = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            initializer_range=0.3,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
        model: torch.nn.Module = LlamaForCausalLM(cfg)
    else:
        cfg2 = GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=512,
            initializer_range=0.3,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
        model = GPT2LMHeadModel(cfg2)
    model.save_pretrained(directory)  # type: ignore[operator]
    tokenizer.save_pretrained(directory)
    return directory
