"""The Hugging Face Llama format, both ways: its `config.json` and weight names against this
project's `ModelConfig` and `Transformer` state dict.

The BiPE release (github zhenyuhe00/BiPE, `my_modeling_llama_bipe_{rope,alibi}.py`) stores its four
variants as `LlamaForCausalLM`-style state dicts:

* RoPE: a plain Llama checkpoint.
* ALiBi: the same weights, no rotary, plus a persistent buffer per layer
  `model.layers.N.self_attn.alibi` `[1, H, 1, max_position_embeddings]` holding `slope_h * j`
  (recomputed here from the head count, only checked against the file).
* BiPE-RoPE / BiPE-ALiBi: plus the intra-segment table `model.embeds.0.weight`
  `[train_scale, hidden]` (`LlamaModel.embeds`, a ModuleList of `hier = 1` embeddings built with
  `padding_idx=pad_token_id=-1`, so its last row, the clip bucket, is zero and was never trained;
  copied as is, so the converted model computes what the released one does).

`models.convert_hf` reads such folders into this project's checkpoints; `models.export_hf` writes
a `rope` model as a transformers `LlamaForCausalLM` folder (`llama_config`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from bipe.alibi import alibi_slopes
from bipe.config import PEConfig
from bipe.errors import CheckpointError, ConfigError
from bipe.rope import rope_frequencies
from models.config import ModelConfig
from models.transformer import Transformer

log = logging.getLogger(__name__)

PE_CHOICES = ("rope", "alibi", "bipe_rope", "bipe_alibi")
RELEASED_SEPARATOR_IDS = (13, 869)  # LLaMA "\n" (<0x0A>) and " ." (docs/methods.md section 1)
INTRA_TABLE_KEY = "model.embeds.0.weight"  # released LlamaModel.embeds[0]
OUR_INTRA_TABLE_KEY = "pe.absolute.table.weight"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")

# One-to-one renames (HF -> ours); per-layer names follow `model.layers.{i}.` / `blocks.{i}.`.
# q/k/v and gate/up are concatenated along the output dimension, in that order.
_TOP_LEVEL = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "lm_head.weight"}
_PER_LAYER = {"input_layernorm.weight": "attn_norm.weight",
              "post_attention_layernorm.weight": "mlp_norm.weight",
              "self_attn.o_proj.weight": "attn.proj.weight",
              "mlp.down_proj.weight": "mlp.down.weight"}
_FUSED = {"attn.qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                              "self_attn.v_proj.weight"),
          "mlp.gate_up.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}
# Buffers some writers persist; they carry no weights (checked where they could disagree).
_BUFFER_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached",
                    "self_attn.alibi")


# -- config ----------------------------------------------------------------------------------------


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = cfg.get(key, default)
    return default if value is None else value


def _require_int(cfg: Mapping[str, Any], key: str) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"config.json: {key}={value!r} must be a positive integer")
    return value


def _rope_params(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """RoPE settings in one dict: transformers 5 writes `rope_parameters`, 4.x `rope_theta` and
    `rope_scaling` (type under `type` or `rope_type`)."""
    params: dict[str, Any] = dict(cfg.get("rope_parameters") or {})
    params.update(cfg.get("rope_scaling") or {})
    if cfg.get("rope_theta") is not None:
        params.setdefault("rope_theta", cfg["rope_theta"])
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    params.pop("type", None)
    return params


def _map_rope_scaling(params: Mapping[str, Any], head_dim: int, base: float,
                      max_position: int) -> dict[str, Any] | None:
    """HF rope scaling -> `pe.relative.scaling`, only where both compute the same frequencies."""
    kind = params["rope_type"]
    if kind == "default":
        return None
    factor = params.get("factor")
    if kind == "linear":
        return {"type": "linear", "factor": float(factor)}
    if kind == "yarn":
        original = params.get("original_max_position_embeddings") or max_position
        if factor is None:  # HF then derives it from the two lengths
            factor = max_position / original
        if params.get("truncate", True) is not True:
            raise CheckpointError("config.json: rope_scaling.truncate=false (unrounded YaRN ramp) "
                                  "is not supported; pe.relative.scaling yarn rounds the ramp")
        beta_fast = params.get("beta_fast") or 32.0
        beta_slow = params.get("beta_slow") or 1.0
        out: dict[str, Any] = {"type": "yarn", "factor": float(factor),
                               "original_max_position": int(original),
                               "beta_fast": float(beta_fast), "beta_slow": float(beta_slow)}
        attention = params.get("attention_factor")
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        if attention is None and mscale and mscale_all and factor > 1:
            # HF's DeepSeek-style ratio; our default is HF's plain 0.1 ln(s) + 1 (mscale = 1).
            attention = (0.1 * mscale * math.log(factor) + 1) / (
                0.1 * mscale_all * math.log(factor) + 1)
        if attention is not None:
            out["attention_factor"] = float(attention)
        return out
    if kind == "dynamic":  # HF's dynamic NTK, the same formula as pe.relative.scaling dynamic
        return {"type": "dynamic", "factor": float(factor or 1.0),
                "original_max_position": int(max_position)}
    raise CheckpointError(f"config.json: rope_scaling type {kind!r} is not supported; "
                          "supported: default, linear, dynamic, yarn")


def _check_architecture(cfg: Mapping[str, Any], pe: str, n_heads: int, hidden: int) -> None:
    """Reject config features our Llama-style model cannot represent (one-line errors)."""
    model_type = cfg.get("model_type", "llama")
    if model_type != "llama":
        raise CheckpointError(f"config.json: model_type={model_type!r}; only Llama-format "
                              "checkpoints convert")
    kv_heads = _get(cfg, "num_key_value_heads", n_heads)
    if kv_heads != n_heads:
        raise CheckpointError(f"config.json: num_key_value_heads={kv_heads} != "
                              f"num_attention_heads={n_heads} (grouped-query attention); this "
                              "project's model has one key/value head per query head")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim * n_heads != hidden:
        raise CheckpointError(f"config.json: head_dim={head_dim} != hidden_size/"
                              f"num_attention_heads={hidden // n_heads}; not supported")
    act = _get(cfg, "hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"config.json: hidden_act={act!r}; this project's SwiGLU uses silu")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise CheckpointError(f"config.json: {key}=true; this project's model has no biases")
    partial = _get(cfg, "partial_rotary_factor", _rope_params(cfg).get("partial_rotary_factor"))
    if partial is not None and partial != 1:
        raise CheckpointError(f"config.json: partial_rotary_factor={partial}; RoPE here rotates "
                              "the whole head")
    if cfg.get("log_scale"):  # released code: queries scaled by log(pos + 1) / log(train_scale)
        raise CheckpointError("config.json: log_scale=true (released BiPE query scaling) is not "
                              "supported")
    rpe = cfg.get("rpe_type")
    if rpe is not None and rpe != pe:
        raise CheckpointError(f"config.json: rpe_type={rpe!r} but --pe {pe}; the released "
                              f"code built this checkpoint as {rpe!r}, convert with --pe {rpe}")


def model_config_from_hf(hf_config: Mapping[str, Any], pe: str,
                         intra_rows: int | None = None) -> ModelConfig:
    """Our `ModelConfig` for an HF Llama `config.json` dict and a PE name.

    `intra_rows`: rows of the BiPE intra table (default `train_scale`, else
    `max_position_embeddings`); ignored for rope/alibi.
    """
    if pe not in PE_CHOICES:
        raise ConfigError(f"--pe {pe!r} is unknown; choose one of {list(PE_CHOICES)}")
    hidden = _require_int(hf_config, "hidden_size")
    n_heads = _require_int(hf_config, "num_attention_heads")
    if hidden % n_heads:
        raise CheckpointError(f"config.json: hidden_size={hidden} is not divisible by "
                              f"num_attention_heads={n_heads}")
    _check_architecture(hf_config, pe, n_heads, hidden)
    max_position = _require_int(hf_config, "max_position_embeddings")
    relative: dict[str, Any] = {}
    if pe.endswith("rope"):
        params = _rope_params(hf_config)
        base = float(params.get("rope_theta") or 10000.0)  # released code: fixed 10000
        relative = {"base": base, "scaling": _map_rope_scaling(params, hidden // n_heads, base,
                                                               max_position)}
    elif _rope_params(hf_config)["rope_type"] != "default":
        log.warning("config.json sets rope scaling, which --pe %s has no rotary part to use "
                    "(the released ALiBi code ignores it too)", pe)
    rows = None
    if pe.startswith("bipe"):
        rows = intra_rows or _get(hf_config, "train_scale", max_position)
    try:
        pe_config = PEConfig.named(pe, max_positions=rows, **relative)
        return ModelConfig(
            vocab_size=_require_int(hf_config, "vocab_size"),
            n_layers=_require_int(hf_config, "num_hidden_layers"),
            hidden_size=hidden, n_heads=n_heads,
            intermediate_size=_require_int(hf_config, "intermediate_size"),
            norm_eps=float(_get(hf_config, "rms_norm_eps", 1e-6)),  # HF Llama's default
            dropout=0.0, init_std=float(_get(hf_config, "initializer_range", 0.02)), pe=pe_config)
    except ConfigError as exc:
        raise CheckpointError(f"config.json cannot be represented: {exc}") from None


# -- weights ---------------------------------------------------------------------------------------


def _check_alibi_buffer(key: str, buf: Tensor, cfg: ModelConfig) -> None:
    """A released ALiBi buffer holds `slope_h * j` `[1, H, 1, L]`; its slopes must be ours."""
    if buf.dim() != 4 or buf.shape[1] != cfg.n_heads or buf.shape[-1] < 2:
        raise CheckpointError(f"{key} has shape {list(buf.shape)}, not the released ALiBi "
                              f"buffer [1, {cfg.n_heads}, 1, L]")
    ours = alibi_slopes(cfg.n_heads) * cfg.pe.relative.slope_multiplier
    theirs = buf[0, :, 0, 1].float()  # position 1: the slope itself
    if not torch.allclose(theirs, ours, rtol=2e-3, atol=0.0):  # fp16 checkpoints: ~1e-3
        ratio = (theirs / ours).mean().item()
        raise CheckpointError(f"{key}: the file's ALiBi slopes are {ratio:.3g}x the slopes of "
                              f"--pe {cfg.pe.name} (multiplier {cfg.pe.relative.slope_multiplier:g}"
                              "); was it trained as the other ALiBi variant?")


def _check_inv_freq(key: str, buf: Tensor, cfg: ModelConfig) -> None:
    """A persisted rotary `inv_freq` must match the base we rebuild it from."""
    ours, _ = rope_frequencies(cfg.head_dim, cfg.pe.relative.base, cfg.pe.relative.scaling)
    if buf.shape != ours.shape or not torch.allclose(buf.float(), ours, rtol=2e-3, atol=1e-7):
        raise CheckpointError(f"{key} does not match rope_theta={cfg.pe.relative.base:g} "
                              "of config.json; set rope_theta to the base it was trained with")


def convert_llama_state_dict(hf_state: Mapping[str, Tensor], hf_config: Mapping[str, Any],
                             pe: str) -> tuple[ModelConfig, dict[str, Tensor]]:
    """HF Llama state dict + `config.json` dict -> `(ModelConfig, our Transformer state dict)`.

    q/k/v `[C, C]` each fuse into `attn.qkv` `[3C, C]`, gate/up `[F, C]` into `mlp.gate_up`
    `[2F, C]`; no permutation (our RoPE is HF's half-split layout). Tensors keep their dtype.
    Raises a one-line `CheckpointError` naming the key for anything we cannot represent.
    """
    state = dict(hf_state)
    for key in state:
        if key.endswith(".bias"):
            raise CheckpointError(f"{key}: the checkpoint has biases; this project's model has "
                                  "none (attention_bias/mlp_bias must be false)")
    table = state.pop(INTRA_TABLE_KEY, None)
    if pe.startswith("bipe") and table is None:
        raise CheckpointError(f"--pe {pe} needs the BiPE intra-segment table {INTRA_TABLE_KEY}, "
                              "which the checkpoint lacks; is it a plain RoPE/ALiBi model?")
    if table is not None and not pe.startswith("bipe"):
        raise CheckpointError(f"{INTRA_TABLE_KEY} is a BiPE intra-segment table, but --pe {pe} "
                              f"has none; use --pe bipe_{pe}")
    cfg = model_config_from_hf(hf_config, pe, None if table is None else table.shape[0])
    if table is not None:
        rows = hf_config.get("train_scale")
        if rows is not None and rows != table.shape[0]:
            raise CheckpointError(f"{INTRA_TABLE_KEY} has {table.shape[0]} rows but config.json "
                                  f"train_scale={rows}")
        if table.dim() != 2 or table.shape[1] != cfg.hidden_size:
            raise CheckpointError(f"{INTRA_TABLE_KEY} has shape {list(table.shape)}, expected "
                                  f"[rows, hidden_size={cfg.hidden_size}]")
        if not bool(table[-1].any()):
            log.info("%s: last row (the clip bucket) is zero, as the released code's "
                     "padding_idx=-1 left it; kept so the model computes what it did",
                     INTRA_TABLE_KEY)

    tied = bool(hf_config.get("tie_word_embeddings", False))
    embed = state.get("model.embed_tokens.weight")
    if tied and embed is not None:
        head = state.get("lm_head.weight")
        if head is not None and not torch.equal(head, embed):
            raise CheckpointError("lm_head.weight differs from model.embed_tokens.weight but "
                                  "config.json says tie_word_embeddings=true; which one is meant "
                                  "is ambiguous")
        state["lm_head.weight"] = embed  # our head is untied: a copy computes the same logits

    out: dict[str, Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> Tensor:
        if key not in state:
            raise CheckpointError(f"the checkpoint lacks {key}")
        used.add(key)
        return state[key]

    for hf_key, ours in _TOP_LEVEL.items():
        out[ours] = take(hf_key)
    for i in range(cfg.n_layers):
        prefix = f"model.layers.{i}."
        for hf_key, ours in _PER_LAYER.items():
            out[f"blocks.{i}.{ours}"] = take(prefix + hf_key)
        for ours, parts in _FUSED.items():
            out[f"blocks.{i}.{ours}"] = torch.cat([take(prefix + p) for p in parts], dim=0)
    if table is not None:
        out[OUR_INTRA_TABLE_KEY] = table

    for key in sorted(set(state) - used):
        if key.endswith(_BUFFER_SUFFIXES) and key.startswith("model."):
            if key.endswith("self_attn.alibi"):
                if cfg.pe.relative.type != "alibi":
                    raise CheckpointError(f"{key} is an ALiBi buffer, but --pe {pe} uses RoPE; "
                                          "use --pe alibi or bipe_alibi")
                _check_alibi_buffer(key, state[key], cfg)
            elif key.endswith("inv_freq") and cfg.pe.relative.type == "rope":
                _check_inv_freq(key, state[key], cfg)
            continue
        raise CheckpointError(f"{key}: not a weight of a {cfg.n_layers}-layer Llama model this "
                              "converter knows (an extra layer, adapter or BiPE table?)")
    _check_shapes(out, cfg)
    return cfg, out


def _check_shapes(state: Mapping[str, Tensor], cfg: ModelConfig) -> None:
    """Compare against a meta-device model, so a wrong config.json fails here, naming the key."""
    with torch.device("meta"):
        expected = Transformer(cfg).state_dict()
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{key} has shape {list(tensor.shape)}, but config.json implies "
                                  f"{list(expected[key].shape)}")


# (absolute type, its index, relative type, its index, ALiBi slope multiplier) of each variant
# the released code can run; anything else has no Llama-format equivalent.
_RELEASED_LAYOUTS = {("none", None, "rope", "token", None): "rope",
                     ("none", None, "alibi", "token", 1.0): "alibi",
                     ("learned", "intra", "rope", "inter", None): "bipe_rope",
                     ("learned", "intra", "alibi", "inter", 96.0): "bipe_alibi"}


def released_variant(pe: PEConfig) -> str:
    """The released variant (`rope`, `alibi`, `bipe_rope`, `bipe_alibi`) a PE config is."""
    a, r = pe.absolute, pe.relative
    layout = (a.type, None if a.type == "none" else a.index, r.type, r.index,
              float(r.slope_multiplier) if r.type == "alibi" else None)
    if layout not in _RELEASED_LAYOUTS:
        raise CheckpointError(f"pe={pe.name!r} ({a.type}/{a.index} + {r.type}/{r.index}) has no "
                              f"Llama-format equivalent; only {list(PE_CHOICES)} export")
    return _RELEASED_LAYOUTS[layout]


def to_llama_state_dict(model: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our Transformer (or its state dict) -> HF Llama names; BiPE keeps `model.embeds.0.weight`.

    The inverse of `convert_llama_state_dict`: `attn.qkv` `[3C, C]` splits into q/k/v `[C, C]`,
    `mlp.gate_up` `[2F, C]` into gate/up `[F, C]`. A model is checked to be one of the four
    released variants; a bare state dict is trusted (its `pe.absolute.table` taken as intra).
    """
    if isinstance(model, nn.Module):
        config = getattr(model, "config", None)
        if config is not None:
            released_variant(config.pe)
        state = model.state_dict()
    else:
        state = dict(model)
    out: dict[str, Tensor] = {hf: state[ours] for hf, ours in _TOP_LEVEL.items()}
    n_layers = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(n_layers):
        prefix = f"model.layers.{i}."
        for hf_key, ours in _PER_LAYER.items():
            out[prefix + hf_key] = state[f"blocks.{i}.{ours}"]
        for ours, parts in _FUSED.items():
            chunks = state[f"blocks.{i}.{ours}"].chunk(len(parts), dim=0)
            out.update({prefix + p: c.contiguous() for p, c in zip(parts, chunks, strict=True)})
    if OUR_INTRA_TABLE_KEY in state:
        out[INTRA_TABLE_KEY] = state[OUR_INTRA_TABLE_KEY]
    leftover = sorted(set(state) - {*_TOP_LEVEL.values(), OUR_INTRA_TABLE_KEY}
                      - {k for k in state if k.startswith("blocks.")})
    if leftover:  # e.g. a sinusoidal scale: no Llama-format name exists for it
        raise CheckpointError(f"{leftover[0]} has no Llama-format equivalent; only rope, alibi, "
                              "bipe_rope and bipe_alibi models export")
    return out


