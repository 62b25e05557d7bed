"""Connectors: encoder tokens ``(B, N, d_enc)`` -> LLM soft tokens ``(B, K, d_model)``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from scifm.config import ConnectorConfig


class MLPProjector(nn.Module):
    r"""LLaVA-style projector applied to every encoder token: :math:`W_2\,\mathrm{GELU}(W_1 h)`.

    One soft token per encoder token, so ``K = N`` and the output mask equals the input mask.

    Args:
        in_dim: encoder width ``d_enc``.
        out_dim: LLM width ``d_model``.
        hidden_dim: width of the hidden layer (default: ``out_dim``).
    """

    def __init__(self, in_dim: int, out_dim: int, *, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden = hidden_dim or out_dim
        self.in_dim, self.out_dim = in_dim, out_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return num_input_tokens

    def forward(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``tokens (B, N, d_enc)``, ``mask (B, N)`` -> ``(B, N, d_model)``, ``mask (B, N)``."""
        return self.net(tokens), mask


class Resampler(nn.Module):
    r"""K learned queries that cross-attend to the encoder tokens (Perceiver/Q-Former style).

    Each layer: :math:`q \leftarrow q + \mathrm{MHA}(\mathrm{LN}(q), \mathrm{LN}(h), \mathrm{LN}(h))`,
    :math:`q \leftarrow q + \mathrm{FFN}(\mathrm{LN}(q))`; padded encoder tokens are masked out.
    The output is always ``K`` tokens, whatever ``N`` was.

    Args:
        in_dim: encoder width ``d_enc``.
        out_dim: LLM width ``d_model``.
        num_tokens: ``K``, the number of learned queries (default: 8).
        hidden_dim: attention width (default: ``out_dim``); must divide by ``num_heads``.
        num_heads: attention heads (default: 4).
        num_layers: cross-attention blocks (default: 1).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        num_tokens: int = 8,
        hidden_dim: int | None = None,
        num_heads: int = 4,
        num_layers: int = 1,
    ) -> None:
        super().__init__()
        hidden = hidden_dim or out_dim
        if hidden % num_heads != 0:
            raise ValueError(f"resampler width {hidden} is not divisible by num_heads={num_heads}")
        self.in_dim, self.out_dim, self.num_tokens = in_dim, out_dim, num_tokens
        self.queries = nn.Parameter(torch.empty(num_tokens, hidden))
        self.kv_proj = nn.Linear(in_dim, hidden)
        self.blocks = nn.ModuleList(_CrossBlock(hidden, num_heads) for _ in range(num_layers))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, out_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.queries, std=0.02)

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return self.num_tokens

    def forward(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``tokens (B, N, d_enc)``, ``mask (B, N)`` -> ``(B, K, d_model)``, all-True ``(B, K)``."""
        b = tokens.shape[0]
        kv = self.kv_proj(tokens)
        q = self.queries.unsqueeze(0).expand(b, -1, -1)
        for block in self.blocks:
            q = block(q, kv, ~mask)
        out = self.out(q)
        return out, torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)


class _CrossBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_ff = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        # No in-projection bias: the key bias has zero gradient (softmax ignores a shift).
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True, bias=False)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, q: Tensor, kv: Tensor, key_padding_mask: Tensor) -> Tensor:
        kv = self.norm_kv(kv)
        attended, _ = self.attn(self.norm_q(q), kv, kv, key_padding_mask=key_padding_mask, need_weights=False)
        q = q + attended
        return q + self.ff(self.norm_ff(q))


Connector = MLPProjector | Resampler


def build_connector(cfg: ConnectorConfig, *, in_dim: int, out_dim: int) -> Connector:
    """Build the connector named by ``cfg.kind`` (``"mlp"`` or ``"resampler"``)."""
    if cfg.kind == "mlp":
        return MLPProjector(in_dim, out_dim, hidden_dim=cfg.hidden_dim)
    if cfg.kind == "resampler":
        return Resampler(
            in_dim,
            out_dim,
            num_tokens=cfg.num_tokens,
            hidden_dim=cfg.hidden_dim,
            num_heads=cfg.num_heads,
            num_layers=cfg.num_layers,
        )
    raise ValueError(f"unknown connector kind {cfg.kind!r}; valid: 'mlp', 'resampler'")
