"""Read a Hugging Face Llama-format checkpoint (a local folder, or a Hub repo id when online) into
this project's checkpoint format, e.g. the models released with the BiPE paper
(`models.hf_llama` describes their layout).

Segments in the released code end at LLaMA ids 13 (newline) and 869 (" ."); the command records
that rule in the checkpoint. Usage:

    python -m models.convert_hf --hf-dir BiPE_RoPE-151M --pe bipe_rope \
        --tokenizer llama_tokenizer/tokenizer.json --out bipe_rope_151m.ckpt
    python -m models.convert_hf --hf-dir some-org/some-llama --pe rope --out llama.ckpt  # online
    python eval.py ckpt_path=bipe_rope_151m.ckpt
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bipe.errors import BipeError, CheckpointError, ConfigError, first_line
from models.checkpoint import CHECKPOINT_KEY, FORMAT_VERSION, STATE_PREFIX, save_atomic, to_plain
from models.config import ModelConfig
from models.hf_llama import (
    PE_CHOICES,
    RELEASED_SEPARATOR_IDS,
    WEIGHT_FILES,
    convert_llama_state_dict,
)
from models.transformer import Transformer

log = logging.getLogger(__name__)

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


def hub_snapshot(repo_id: str) -> Path:
    """The local folder of a Hub repo's config, weights and tokenizer files (downloaded, or from
    the Hugging Face cache); CheckpointError in one line when offline or not found."""
    try:
        from huggingface_hub import snapshot_download  # lazy: only for a Hub repo id
    except ImportError:  # pragma: no cover - installed with transformers/datasets
        raise CheckpointError(f"--hf-dir {repo_id} looks like a Hub repo id, which needs the "
                              "huggingface_hub package") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=[
            "config.json", "*.safetensors", "*.bin", "*.json", "tokenizer*"]))
    except Exception as exc:  # offline, unknown repo, gated: the hub's own error in one line
        raise CheckpointError(f"--hf-dir {repo_id}: not a local folder, and fetching it from the "
                              f"Hugging Face Hub failed: {first_line(exc)}") from None


def load_hf_folder(hf_dir: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """`(config.json dict, state dict)` of a local HF folder (safetensors or .bin, sharded or not;
    .bin read with `weights_only=True`), or of a Hub repo id (`org/name`) when online."""
    folder = Path(hf_dir).expanduser()
    if not folder.exists() and str(hf_dir).count("/") == 1 and not str(hf_dir).startswith("."):
        folder = hub_snapshot(str(hf_dir))
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
        local = Path(hf_dir).expanduser()
        folder = local if local.exists() else hub_snapshot(str(hf_dir))
        tokenizer = folder / "tokenizer.json"
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
                        "model.safetensors or pytorch_model.bin, or a Hub repo id (online)")
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
    print(f"wrote {path}; evaluate with: python eval.py ckpt_path={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
