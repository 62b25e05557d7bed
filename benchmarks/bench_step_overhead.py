"""Training-step overhead of a multimodal batch over a text-only batch of the same length.

The model is built with ``ScifmModel.from_config``: SmolLM2-135M-Instruct (offline GGUF) with
LoRA (stage ``instruct``, the quickstart's settings), a GINE molecule encoder and a resampler
connector with K = 8 soft tokens. The multimodal batch is ``model.collator()`` over FreeSolv
prompts (the ``freesolv`` template) with one ``<mol>`` each, as the data module builds it. The
text-only batch is the same batch with every placeholder id replaced by an ordinary text token
and no items: identical shape, attention mask and labels, so both have exactly the same number
of tokens (soft tokens counted as tokens), and only the encoder + connector + splice differ.

A step is ``zero_grad`` + forward + backward + gradient clipping (1.0) + ``AdamW.step`` over the
trainable parameters (grouped as ``ScifmModule.configure_optimizers`` does). After ``--warmup``
steps of each kind, ``--steps`` steps of each are timed, interleaved; medians are compared.
Then the encoder + connector alone are timed (forward, and forward + backward) and one step of
each kind is profiled with ``torch.profiler`` to show where the difference goes.

    cd /tmp && /work/venv/bin/python /work/main/benchmarks/bench_step_overhead.py
    cd /tmp && /work/venv/bin/python /work/main/benchmarks/bench_step_overhead.py --tiny
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import REPO_ROOT, check_not_shadowed, make_tiny_backbone, median, print_table, write_results

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
FREESOLV = REPO_ROOT / "experiments" / "data" / "freesolv.csv"
PACKAGES = ("transformers", "peft", "torch-geometric", "rdkit")
TARGET_RATIO = 1.10


def build_model(backbone: str, *, tiny: bool, num_tokens: int) -> Any:
    from scifm.config import BackboneConfig, ConnectorConfig, EncoderConfig, ModelConfig
    from scifm.model import ScifmModel

    if tiny:
        enc_params: dict[str, Any] = {"hidden_dim": 16, "num_layers": 2}
        connector = ConnectorConfig(kind="resampler", num_tokens=num_tokens, num_heads=2)
    else:  # configs/quickstart.yaml
        enc_params = {"hidden_dim": 128, "num_layers": 3}
        connector = ConnectorConfig(kind="resampler", num_tokens=num_tokens)
    config = ModelConfig(
        backbone=BackboneConfig(
            name=backbone,
            dtype="float32",
            lora_r=8,
            lora_alpha=16,
            lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            max_length=128,
        ),
        connector=connector,
        encoders=[EncoderConfig(modality="molecule", kind="gine", params=enc_params)],
        stage="instruct",
    )
    model = ScifmModel.from_config(config)
    model.train()  # as ScifmModule does: adapters' dropout trains
    return model


def build_batches(model: Any, batch_size: int, offset: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The multimodal batch (``model.collator()``) and its text-only twin of identical length."""
    import pandas as pd

    from scifm.templates import load_template
    from scifm.tokenization import Sample

    template = load_template("freesolv")
    frame = pd.read_csv(FREESOLV).iloc[offset : offset + batch_size]
    samples = []
    for i, row in enumerate(frame.to_dict(orient="records")):
        rid = f"freesolv:{offset + i}"
        prompt, answer = template.render(row, record=rid)
        item = model.featurize("molecule", row["smiles"], record=rid)
        samples.append(Sample(id=rid, prompt=prompt, answer=answer, items={"molecule": [item]}))
    multimodal = model.collator()(samples)

    placeholder = model.placeholder_ids["molecule"]
    filler = model.tokenizer(" molecule", add_special_tokens=False)["input_ids"][0]
    text = dict(multimodal)
    text["input_ids"] = torch.where(
        multimodal["input_ids"] == placeholder,
        torch.full_like(multimodal["input_ids"], filler),
        multimodal["input_ids"],
    )
    text["items"] = {}
    return multimodal, text


def make_optimizer(model: Any, lr: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, grouped as ``ScifmModule.configure_optimizers``."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )


def train_step(model: Any, optimizer: torch.optim.Optimizer, batch: dict[str, Any]) -> float:
    optimizer.zero_grad(set_to_none=True)
    out = model(batch)
    out.loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return float(out.loss.detach())


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def encoder_times(model: Any, batch: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median seconds of the encoder + connector alone: forward, and forward + backward."""
    items = batch["items"]

    def forward() -> None:
        with torch.no_grad():
            model.encode_items(items)

    def forward_backward() -> None:
        tokens, mask = model.encode_items(items)["molecule"]
        (tokens[mask].float().pow(2).mean()).backward()
        model.zero_grad(set_to_none=True)

    forward(), forward_backward()
    return {
        "encoder_connector_forward_s": median([timed(forward) for _ in range(repeats)]),
        "encoder_connector_forward_backward_s": median([timed(forward_backward) for _ in range(repeats)]),
    }


def profile_steps(
    model: Any, optimizer: torch.optim.Optimizer, batch: dict[str, Any], *, steps: int, top: int
) -> dict[str, Any]:
    """Operators by self CPU time per step over ``steps`` profiled steps, and the inclusive time
    of the encoder + connector forward (``ScifmModel.encode_items``)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    original = model.encode_items

    def encode_items(items: dict[str, Any]) -> Any:
        with record_function("scifm.encode_items"):
            return original(items)

    model.encode_items = encode_items
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                train_step(model, optimizer, batch)
    finally:
        del model.encode_items
    averages = prof.key_averages()
    events = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
    encode = [e for e in averages if e.key == "scifm.encode_items"]
    return {
        "top_ops": [[e.key, e.count // steps, e.self_cpu_time_total / 1e3 / steps] for e in events[:top]],
        "encode_items_forward_ms": encode[0].cpu_time_total / 1e3 / steps if encode else 0.0,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tiny", action="store_true", help="a 2-layer random Llama (hidden 32) built in code"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="samples per batch (quickstart: 8)")
    parser.add_argument("--num-tokens", type=int, default=8, help="K, the resampler's soft tokens")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each kind")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each kind")
    parser.add_argument("--offset", type=int, default=0, help="first FreeSolv row of the batch")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--profile-steps", type=int, default=5, help="steps per kind under torch.profiler")
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler breakdown")
    parser.add_argument("--output", default=None, help="results/<output>.json")
    args = parser.parse_args(argv)
    check_not_shadowed()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory(prefix="scifm-bench-step-") as tmp:
        backbone = str(make_tiny_backbone(Path(tmp) / "tiny-llama")) if args.tiny else SMOLLM2
        load_start = time.perf_counter()
        model = build_model(backbone, tiny=args.tiny, num_tokens=args.num_tokens)
        load_s = time.perf_counter() - load_start
    multimodal, text = build_batches(model, args.batch_size, args.offset)
    assert multimodal["input_ids"].shape == text["input_ids"].shape
    assert torch.equal(multimodal["attention_mask"], text["attention_mask"])
    optimizer = make_optimizer(model, lr=1e-4)
    batches = {"multimodal": multimodal, "text-only": text}

    for _ in range(args.warmup):
        for batch in batches.values():
            train_step(model, optimizer, batch)
    times: dict[str, list[float]] = {k: [] for k in batches}
    for step in range(args.steps):  # interleaved, so drift in machine load hits both alike
        for name, batch in batches.items():
            times[name].append(timed(lambda b=batch: train_step(model, optimizer, b)))
        if (step + 1) % 5 == 0:
            print(f"  {step + 1}/{args.steps} timed steps of each kind", flush=True)

    shape = tuple(multimodal["input_ids"].shape)
    tokens = int(multimodal["attention_mask"].sum())
    soft = int((multimodal["input_ids"] == model.placeholder_ids["molecule"]).sum())
    med = {k: median(v) for k, v in times.items()}
    ratio = med["multimodal"] / med["text-only"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    encoder_params = sum(p.numel() for p in model.encoders.parameters())
    connector_params = sum(p.numel() for p in model.connectors.parameters())
    breakdown = encoder_times(model, multimodal, repeats=max(args.steps, 5))

    print_table(
        f"training step, {'tiny Llama' if args.tiny else 'SmolLM2-135M'} + LoRA + GINE + resampler "
        f"(K={args.num_tokens}); batch {shape[0]} x {shape[1]}, {tokens} tokens ({soft} soft); "
        f"median of {args.steps} after {args.warmup} warm-up",
        ["batch", "median ms", "min ms", "max ms", "tokens/s"],
        [[k, med[k] * 1e3, min(v) * 1e3, max(v) * 1e3, tokens / med[k]] for k, v in times.items()],
    )
    verdict = "meets" if ratio <= TARGET_RATIO else "MISSES"
    print(f"  multimodal / text-only step time: {ratio:.3f} ({verdict} the {TARGET_RATIO:.2f} target)")
    ratio_min = min(times["multimodal"]) / min(times["text-only"])
    print(f"  ratio of the fastest steps (robust when other jobs share the CPU): {ratio_min:.3f}")
    extra_ms = (med["multimodal"] - med["text-only"]) * 1e3
    print(
        f"  difference {extra_ms:.1f} ms; encoder + connector alone: forward "
        f"{breakdown['encoder_connector_forward_s'] * 1e3:.1f} ms, forward + backward "
        f"{breakdown['encoder_connector_forward_backward_s'] * 1e3:.1f} ms"
    )

    profiles: dict[str, Any] = {}
    if not args.no_profile:
        for name, batch in batches.items():
            profiles[name] = profile_steps(model, optimizer, batch, steps=args.profile_steps, top=12)
            print_table(
                f"top operators by self CPU time, mean of {args.profile_steps} profiled {name} steps"
                f" (encode_items forward, inclusive: {profiles[name]['encode_items_forward_ms']:.1f} ms)",
                ["op", "calls/step", "self ms/step"],
                profiles[name]["top_ops"],
            )

    results = {
        "config": {
            "backbone": "tiny-llama (2 layers, hidden 32)" if args.tiny else SMOLLM2,
            "stage": "instruct",
            "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "encoder": "gine " + str(model.config.encoders[0].params),
            "connector": f"resampler K={args.num_tokens}",
            "batch_size": args.batch_size,
            "warmup": args.warmup,
            "steps": args.steps,
            "torch_threads": torch.get_num_threads(),
        },
        "model_load_s": load_s,
        "batch_shape": list(shape),
        "tokens_per_batch": tokens,
        "soft_tokens_per_batch": soft,
        "trainable_params": trainable,
        "encoder_params": encoder_params,
        "connector_params": connector_params,
        "step_times_s": times,
        "median_step_s": med,
        "ratio_multimodal_over_text": ratio,
        "ratio_of_min_step_times": ratio_min,
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
        "breakdown": breakdown,
        "profile": profiles,
    }
    path = write_results(
        args.output or ("bench_step_overhead_tiny" if args.tiny else "bench_step_overhead"), results, PACKAGES
    )
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
