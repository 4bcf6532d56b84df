"""The decoders that are timed against each other, built to one `Shape`.

* `ours`: `models.Transformer` (RMSNorm, SwiGLU, no biases, untied embeddings; fused qkv and
  fused gate/up projections; SDPA attention).
* `hf-llama-eager`, `hf-llama-sdpa`: Hugging Face `LlamaForCausalLM`, same shape, untied
  embeddings, no biases, rope_theta 10000, `attn_implementation` eager or sdpa.
* `xt-rotary`, `xt-alibi`: lucidrains' `x-transformers` `TransformerWrapper(Decoder(...))` with
  RMSNorm, SwiGLU (`ff_glu`, `ff_swish`), no feed-forward output bias, full-width rotary or
  ALiBi, SDPA (`attn_flash`), no absolute position embedding, untied embeddings. What cannot be
  matched: its GLU input projection always has a bias (`2 * intermediate` parameters per layer).

Optional packages that are not installed give a `Skipped` with the reason instead of a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bench.settings import Shape
from bipe import PEConfig
from models import ModelConfig, Transformer

Forward = Callable[[Tensor, Tensor | None], Tensor]  # (input_ids, boundary) -> logits


@dataclass
class Contender:
    """A model plus how to call it. `forward(ids, boundary)` returns logits `[B, T, V]`."""

    name: str
    model: nn.Module
    forward: Forward
    note: str = ""

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def input_embedding_params(self) -> int:
        emb = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") \
            else None
        if emb is None:
            emb = next(m for m in self.model.modules() if isinstance(m, nn.Embedding))
        return emb.weight.numel()

    @property
    def matmul_params(self) -> int:
        """Parameters that take part in matmuls: all but the input embedding table (the LM head
        counts). This is the N of the 6 N FLOPs per token rule."""
        return self.params - self.input_embedding_params


@dataclass
class Skipped:
    name: str
    reason: str


CONTENDER_NAMES: tuple[str, ...] = ("ours", "hf-llama-eager", "hf-llama-sdpa", "xt-rotary",
                                    "xt-alibi")


def ours(shape: Shape, pe: str = "rope", max_len: int = 1024, seed: int = 0) -> Contender:
    """`models.Transformer` of `shape` with the named encoding (learned intra tables of
    `max_len` rows for BiPE)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=shape.vocab, n_layers=shape.n_layers, hidden_size=shape.hidden,
                      n_heads=shape.heads, intermediate_size=shape.intermediate,
                      pe=PEConfig.named(pe, max_positions=max_len))
    model = Transformer(cfg)
    name = "ours" if pe == "rope" else f"ours-{pe}"
    return Contender(name, model, lambda ids, boundary: model(ids, boundary))


def hf_llama(shape: Shape, attn: str, max_len: int = 1024, seed: int = 0) -> Contender | Skipped:
    """Hugging Face `LlamaForCausalLM` with `attn_implementation=attn` (eager | sdpa)."""
    name = f"hf-llama-{attn}"
    try:
        import transformers
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        return Skipped(name, f"transformers not installed ({e}); pip install -r "
                             "requirements-bench.txt")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.n_layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads, max_position_embeddings=max_len, rms_norm_eps=1e-5,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attn_implementation=attn)
    model = LlamaForCausalLM(config)
    return Contender(name, model,
                     lambda ids, boundary: model(input_ids=ids, use_cache=False).logits,
                     note=f"transformers {transformers.__version__}")


def x_transformers(shape: Shape, kind: str, max_len: int = 1024,
                   seed: int = 0) -> Contender | Skipped:
    """x-transformers decoder with `kind` = rotary | alibi."""
    name = f"xt-{kind}"
    try:
        import x_transformers as xt
    except ImportError as e:
        return Skipped(name, f"x-transformers not installed ({e}); pip install -r "
                             "requirements-bench.txt")
    torch.manual_seed(seed)
    pos = (dict(rotary_pos_emb=True, rotary_emb_dim=shape.head_dim) if kind == "rotary"
           else dict(alibi_pos_bias=True))
    decoder = xt.Decoder(dim=shape.hidden, depth=shape.n_layers, heads=shape.heads,
                         attn_dim_head=shape.head_dim, attn_flash=True, ff_glu=True,
                         ff_swish=True, ff_mult=shape.intermediate / shape.hidden,
                         ff_no_bias=True, use_rmsnorm=True, **pos)
    model = xt.TransformerWrapper(num_tokens=shape.vocab, max_seq_len=max_len,
                                  attn_layers=decoder, use_abs_pos_emb=False,
                                  tie_embedding=False)
    version = getattr(xt, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version
        version = dist_version("x-transformers")
    return Contender(name, model, lambda ids, boundary: model(ids),
                     note=f"x-transformers {version}; GLU input projection has a bias "
                          "(not configurable)")


def build(name: str, shape: Shape, max_len: int) -> Contender | Skipped:
    """One of `CONTENDER_NAMES`."""
    if name == "ours":
        return ours(shape, "rope", max_len)
    if name.startswith("hf-llama-"):
        return hf_llama(shape, name.removeprefix("hf-llama-"), max_len)
    if name.startswith("xt-"):
        return x_transformers(shape, name.removeprefix("xt-"), max_len)
    raise ValueError(f"unknown contender {name!r}")
