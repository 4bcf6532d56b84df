"""Load Hugging Face Llama-format checkpoints (as released with the BiPE paper) into our model.

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

Segments in the released code end at LLaMA ids 13 (newline) and 869 (" ."); the command records
that rule in the checkpoint. Usage:

    python -m models.convert_hf --hf-dir BiPE_RoPE-151M --pe bipe_rope \
        --tokenizer llama_tokenizer/tokenizer.json --out bipe_rope_151m.ckpt
    python eval.py ckpt=bipe_rope_151m.ckpt
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bipe.alibi import alibi_slopes
from bipe.encoding import PEConfig
from bipe.errors import BipeError, CheckpointError, ConfigError, first_line
from bipe.rope import _yarn_correction_dim, rope_frequencies
from models.checkpoint import CHECKPOINT_KEY, FORMAT_VERSION, STATE_PREFIX, save_atomic, to_plain
from models.transformer import ModelConfig, Transformer

log = logging.getLogger(__name__)

PE_CHOICES = ("rope", "alibi", "bipe_rope", "bipe_alibi")
RELEASED_SEPARATOR_IDS = (13, 869)  # LLaMA "\n" (<0x0A>) and " ." (PAPERS.md section 1)
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
        # HF clamps the ramp's top at head_dim - 1, we at head_dim/2 - 1 (the last pair); they
        # agree whenever the ramp ends inside the pairs, which holds for real configs.
        high = math.ceil(_yarn_correction_dim(beta_slow, head_dim, base, original))
        if high > head_dim // 2 - 1:
            raise CheckpointError(f"config.json: rope_scaling yarn with beta_slow={beta_slow} "
                                  f"ramps past the last frequency pair of head size {head_dim}; "
                                  "Hugging Face and this project clamp it differently")
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
    if kind == "dynamic":
        raise CheckpointError("config.json: rope_scaling type 'dynamic' is not supported: "
                              "Hugging Face's dynamic NTK base formula differs from "
                              "pe.relative.scaling type dynamic; remove it and set "
                              "eval.rope_scaling instead")
    raise CheckpointError(f"config.json: rope_scaling type {kind!r} is not supported; "
                          "supported: default, linear, yarn")


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


# -- files -----------------------------------------------------------------------------------------


def _is_lfs_pointer(path: Path) -> bool:
    if path.stat().st_size > 1024:
        return False
    return path.read_bytes().startswith(b"version https://git-lfs")


def _load_weight_file(path: Path) -> dict[str, Tensor]:
    if _is_lfs_pointer(path):
        raise CheckpointError(f"{path} is a git-lfs pointer, not the weights; run "
                              "`git lfs pull` in that folder")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise CheckpointError(f"{path} needs the safetensors package: pip install "
                              "safetensors") from None
    except Exception as exc:  # truncated, corrupted or pickled with arbitrary objects
        raise CheckpointError(f"{path} cannot be read: {first_line(exc)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def load_hf_folder(hf_dir: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """`(config.json dict, state dict)` of a local HF folder (safetensors or .bin, sharded or not;
    .bin read with `weights_only=True`). No network."""
    folder = Path(hf_dir).expanduser()
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"--hf-dir {hf_dir}: no config.json there")
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from None
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError):
                raise CheckpointError(f"{path} is not a shard index (no weight_map)") from None
            state: dict[str, Tensor] = {}
            for shard in shards:
                state.update(_load_weight_file(folder / shard))
            return hf_config, state
        return hf_config, _load_weight_file(path)
    raise CheckpointError(f"--hf-dir {hf_dir}: no weights ({', '.join(WEIGHT_FILES)})")


def load_tokenizer(path: str | Path) -> Any:
    """A `tokenizers.Tokenizer` from a tokenizer.json; a SentencePiece model gets a how-to."""
    from tokenizers import Tokenizer

    p = Path(path).expanduser()
    if p.suffix == ".model":
        raise CheckpointError(
            f"--tokenizer {path} is a SentencePiece model; pass a tokenizer.json instead (the "
            "BiPE repo ships llama_tokenizer/tokenizer.json, or convert with transformers: "
            "LlamaTokenizerFast.from_pretrained(DIR).save_pretrained(OUT), needs sentencepiece)")
    if not p.is_file():
        raise CheckpointError(f"--tokenizer {path} does not exist")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as exc:  # tokenizers raises plain Exceptions
        raise CheckpointError(f"--tokenizer {path} is not a tokenizer.json: "
                              f"{first_line(exc)}") from None


def _eod_token(tokenizer: Any, hf_config: Mapping[str, Any]) -> str:
    """The end-of-document token our data pipeline appends: the model's EOS (LLaMA `</s>`)."""
    eos = hf_config.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    token = tokenizer.id_to_token(eos) if isinstance(eos, int) else None
    return token or "</s>"


def build_checkpoint(cfg: ModelConfig, state: Mapping[str, Tensor], tokenizer: Any, *,
                     hf_config: Mapping[str, Any], block_size: int,
                     separator_ids: Sequence[int], max_segments_per_block: int | None = None,
                     source: str = "") -> dict[str, Any]:
    """A checkpoint in train.py's format (`state_dict` with the `model.` prefix, fp32, and the
    `"bipe"` metadata) that `build_model_from_checkpoint` and `eval.py` read."""
    model = Transformer(cfg)
    model.load_state_dict(dict(state))  # strict: every weight mapped, nothing left over
    weights = {STATE_PREFIX + k: v.detach().float().contiguous()
               for k, v in model.state_dict().items()}
    # Upper bound when the training data's real count is unknown: one segment per token.
    segments = block_size if max_segments_per_block is None else max_segments_per_block
    data = {
        # The released models were pretrained on the Pile (uncopyrighted) in blocks of
        # `block_size` tokens, segmented by the separator-id rule.
        "name": "pile", "hf_path": "monology/pile-uncopyrighted", "subset": None,
        "block_size": block_size, "segmenter": "separators",
        "separators": ["\n", " ."], "separator_match": "exact",
        "separator_ids": [int(i) for i in separator_ids],
        "tokenizer": {"path": None, "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
                      "eod_token": _eod_token(tokenizer, hf_config)},
    }
    meta = {
        "format_version": FORMAT_VERSION,
        "model_config": to_plain(cfg.to_dict(), "model_config"),
        "tokenizer": tokenizer.to_str(),
        "data_stats": {"max_segments_per_block": int(segments),
                       "max_segments_per_block_source": (
                           "measured" if max_segments_per_block is not None
                           else "upper bound (block_size); pass --max-segments-per-block")},
        "run_config": to_plain({"data": data, "converted_from": {
            "format": "huggingface-llama", "source": source, "pe": cfg.pe.name,
            "hf_config": dict(hf_config)}}, "run_config"),
        "global_step": 0,
    }
    return {"state_dict": weights, "epoch": 0, "global_step": 0,
            "pytorch-lightning_version": importlib.metadata.version("lightning"),
            CHECKPOINT_KEY: meta}


def convert_folder(hf_dir: str | Path, out: str | Path, *, pe: str | None = None,
                   tokenizer: str | Path | None = None,
                   separator_ids: Sequence[int] = RELEASED_SEPARATOR_IDS,
                   block_size: int | None = None,
                   max_segments_per_block: int | None = None) -> Path:
    """Convert a local HF Llama folder into one of our checkpoints at `out` (written atomically)."""
    hf_config, hf_state = load_hf_folder(hf_dir)
    pe = pe or hf_config.get("rpe_type")
    if pe is None:
        raise ConfigError("--pe is required: config.json has no rpe_type; choose one of "
                          f"{list(PE_CHOICES)}")
    if pe not in PE_CHOICES:
        raise ConfigError(f"--pe {pe!r} is unknown; choose one of {list(PE_CHOICES)}")
    cfg, state = convert_llama_state_dict(hf_state, hf_config, pe)
    if tokenizer is None:
        tokenizer = Path(hf_dir) / "tokenizer.json"
        if not tokenizer.is_file():
            raise ConfigError(f"--tokenizer is required: {hf_dir} has no tokenizer.json (the "
                              "BiPE repo ships llama_tokenizer/tokenizer.json)")
    tok = load_tokenizer(tokenizer)
    n_tokens = tok.get_vocab_size(with_added_tokens=True)
    if n_tokens > cfg.vocab_size:
        raise CheckpointError(f"--tokenizer {tokenizer} has {n_tokens} tokens but the model's "
                              f"vocab_size is {cfg.vocab_size}; is it the matching tokenizer?")
    bad = [i for i in separator_ids if not 0 <= i < n_tokens]
    if bad:
        raise ConfigError(f"--separator-ids {bad[0]} is not a token id of --tokenizer "
                          f"({n_tokens} tokens)")
    log.info("separators: %s", ", ".join(f"{i}={tok.id_to_token(i)!r}" for i in separator_ids))
    length = block_size or int(hf_config["max_position_embeddings"])
    if length < 2:
        raise ConfigError(f"--block-size {length} must be at least 2")
    ckpt = build_checkpoint(cfg, state, tok, hf_config=hf_config, block_size=length,
                            separator_ids=separator_ids,
                            max_segments_per_block=max_segments_per_block,
                            source=str(Path(hf_dir).expanduser().resolve()))
    out_path = Path(out).expanduser()
    save_atomic(ckpt, out_path)
    return out_path


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m models.convert_hf ...`; exit status 2 with one `error:` line on bad input."""
    parser = argparse.ArgumentParser(
        prog="python -m models.convert_hf",
        description="Convert a Hugging Face Llama-format checkpoint (e.g. a released BiPE model) "
                    "into this project's checkpoint format for eval.py.")
    parser.add_argument("--hf-dir", required=True, help="local folder with config.json and "
                        "model.safetensors or pytorch_model.bin")
    parser.add_argument("--pe", choices=PE_CHOICES, default=None,
                        help="positional encoding (default: config.json's rpe_type)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json (default: HF_DIR/tokenizer.json)")
    parser.add_argument("--out", required=True, help="checkpoint to write (.ckpt)")
    parser.add_argument("--separator-ids", type=int, nargs="*",
                        default=list(RELEASED_SEPARATOR_IDS),
                        help="token ids that end a segment (released BiPE: 13 869)")
    parser.add_argument("--block-size", type=int, default=None,
                        help="training length in tokens (default: max_position_embeddings)")
    parser.add_argument("--max-segments-per-block", type=int, default=None,
                        help="largest segment count per training block, the rotary range of "
                             "BiPE-RoPE (default: block size, an upper bound)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = convert_folder(args.hf_dir, args.out, pe=args.pe, tokenizer=args.tokenizer,
                              separator_ids=args.separator_ids, block_size=args.block_size,
                              max_segments_per_block=args.max_segments_per_block)
    except BipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}; evaluate with: python eval.py ckpt={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
