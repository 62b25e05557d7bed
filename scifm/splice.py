"""Write connector outputs into the placeholder positions of the LLM's input embeddings."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor


def splice(
    inputs_embeds: Tensor,
    input_ids: Tensor,
    features: dict[int, tuple[Tensor, Tensor]],
    *,
    placeholder_ids: Iterable[int] = (),
) -> Tensor:
    """Replace the embeddings at placeholder positions by soft tokens.

    Args:
        inputs_embeds: ``(B, L, D)`` token embeddings of ``input_ids``.
        input_ids: ``(B, L)``; each item's placeholder id appears once per soft token.
        features: placeholder id -> ``(tokens (M, K, D), mask (M, K))`` for the ``M`` items of
            that modality, in the order their placeholders appear scanning the batch row by row.
        placeholder_ids: every placeholder id the model knows; one that appears in
            ``input_ids`` without features is an error too.

    Returns:
        ``(B, L, D)`` embeddings with the placeholder rows replaced, in ``inputs_embeds.dtype``.

    Raises:
        ValueError: when the number of placeholder positions differs from the number of
            valid soft tokens, or a placeholder has no features.
    """
    out = inputs_embeds
    for token_id, (tokens, mask) in features.items():
        positions = input_ids == token_id
        flat = tokens[mask]
        n_pos, n_feat = int(positions.sum()), flat.shape[0]
        if n_pos != n_feat:
            raise ValueError(
                f"placeholder id {token_id}: {n_pos} placeholder positions in the text but "
                f"{n_feat} soft tokens from the connector; every placeholder must be expanded to "
                "its item's token count at tokenization"
            )
        out = out.masked_scatter(positions.unsqueeze(-1), flat.to(out.dtype))
    for token_id in placeholder_ids:
        if token_id not in features and bool((input_ids == token_id).any()):
            raise ValueError(f"placeholder id {token_id} appears in the text but no item was given for it")
    return out
