"""A Llama-style decoder with a pluggable positional encoding.

RMSNorm, SwiGLU, no biases, untied embeddings, init std 0.02 (docs/methods.md section 1). Positions
reach attention through `bipe.PositionalEncoding`: the absolute part is added to the token
embeddings, the relative part rotates q/k or adds a bias, and one `AttentionContext` per forward
pass is shared by all layers.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from bipe.attention import AttentionContext, AttentionOptions
from bipe.encoding import PositionalEncoding
from bipe.rope import apply_rotary
from models.config import ModelConfig
from models.pretrained import PretrainedMixin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, ctx: AttentionContext, cache: Any = None,
                layer: int = 0) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if ctx.lm_infinite is not None:  # rotates per attended pair, from unrotated q and k
            y = ctx.attend_lambda(q, k, v, cache, layer)
        else:
            if ctx.cos is not None:
                cos, sin = ctx.rotary(q.dtype)
                q = apply_rotary(q, cos, sin)
                if ctx.k_cos is None:  # keys turn as queries do (RoPE): cached turned
                    k = apply_rotary(k, cos, sin)
            if cache is not None:
                k, v = cache.update(layer, k, v)
            if ctx.k_cos is not None:  # xPos: every key, cached ones too, in this pass's frame
                k = apply_rotary(k, *ctx.key_rotary(q.dtype))
            y = ctx.attend(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, ctx: AttentionContext, cache: Any = None,
                layer: int = 0) -> Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), ctx, cache, layer))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Transformer(nn.Module, PretrainedMixin):
    """Decoder-only LM. `forward(input_ids, boundary)` -> logits `[B, T, vocab]`;
    `Transformer.from_pretrained(path)` / `model.save_pretrained(folder)` (`models.pretrained`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pe = PositionalEncoding(config.pe, config.hidden_size, config.n_heads,
                                     config.init_std)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # Inference-time attention settings (query chunking, LM-Infinite); not part of the weights.
        self.attention = AttentionOptions()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def num_parameters(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n

    def forward(self, input_ids: Tensor, boundary: Tensor | None = None, *,
                cache: Any = None) -> Tensor:
        """`input_ids` long `[B, T]`, `boundary` bool `[B, T]` (True = last token of a segment;
        None = no segments) -> logits `[B, T, vocab]`. With a `models.generation.KVCache` the
        tokens continue the cached sequence, and the cache is updated in place."""
        B, T = input_ids.shape
        past = 0 if cache is None else cache.length
        start = None if cache is None else cache.bilevel_start(B, input_ids.device)
        pos = self.pe.positions(boundary, B, T, past, start, device=input_ids.device)
        q_pos = self.pe.relative_positions(pos)
        if q_pos is None and self.attention.lm_infinite is not None:
            q_pos = pos.token  # no relative part: Lambda masks by token index only
        k_pos = q_pos
        if cache is not None:
            cached = cache.extend(pos, q_pos, boundary)
            k_pos = q_pos if cached is None else cached  # a window cache keeps its own
        ctx = self.pe.context(q_pos, k_pos, past, T, self.attention)
        x = self.drop(self.pe.embed(self.embed(input_ids), pos))
        for i, block in enumerate(self.blocks):
            x = block(x, ctx, cache, i)
        return self.lm_head(self.norm(x))
