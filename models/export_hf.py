"""Export a trained model for the tools researchers already use.

    python -m models.export_hf --ckpt outputs/<day>/<run> --out exported/

A `rope` model (with or without linear, NTK, dynamic or YaRN scaling) becomes a transformers
`LlamaForCausalLM` folder with a `PreTrainedTokenizerFast`: `AutoModelForCausalLM.from_pretrained`
and `AutoTokenizer.from_pretrained` load it, and its logits are this project's (fp32, within
1e-4). The other encodings have no transformers architecture that computes them (ALiBi adds a
bias Llama has not; BiPE reads segment boundaries, which no Hugging Face model takes), so they are
written with `save_pretrained` (config.json, model.safetensors, tokenizer.json; load them with
`models.Transformer.from_pretrained`), and the command says so.

Either way the folder gets a `bipe_manifest.json` (its files and their SHA-256) and is replaced
as a whole (`bipe.io.replace_folder`). A previous export in `--out` is replaced; a non-empty
`--out` that holds none is refused unless `--overwrite`, which writes the export's files and keeps
the others: an export never deletes a file it did not write.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from bipe.errors import BipeError, CheckpointError, first_line
from bipe.io import file_mode, replace_folder
from models.config import ModelConfig
from models.hf_llama import to_llama_state_dict
from models.pretrained import replaceable_files, write_manifest
from models.transformer import Transformer

log = logging.getLogger(__name__)


def exportable_to_llama(cfg: ModelConfig) -> str | None:
    """None when transformers' Llama computes this model exactly, else why it does not."""
    a, r = cfg.pe.absolute, cfg.pe.relative
    if a.type != "none":
        what = "BiPE's intra-segment table" if a.index == "intra" else f"a {a.type} table"
        return f"pe={cfg.pe.name} adds {what} to the embeddings, which Llama has not"
    if r.type != "rope":
        return f"pe={cfg.pe.name} has relative part {r.type!r}; Llama computes RoPE only"
    if r.index != "token":
        return f"pe={cfg.pe.name} rotates by segment index (BiPE), which Llama cannot read"
    if cfg.pe.randomized_max is not None:
        return f"pe={cfg.pe.name} draws random positions, which Llama has not"
    return None


def rope_parameters(cfg: ModelConfig, block_size: int) -> tuple[dict[str, Any], int]:
    """`(rope_parameters, max_position_embeddings)` of the Llama config computing this model's
    RoPE (transformers 5 spelling)."""
    r = cfg.pe.relative
    s = r.scaling
    if s is None:
        return {"rope_type": "default", "rope_theta": r.base}, block_size
    kind, factor = s["type"], s.get("factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor, "rope_theta": r.base}, block_size
    if kind == "ntk":  # NTK-aware scaling is a new base: default RoPE computes it exactly
        d = cfg.head_dim
        return {"rope_type": "default", "rope_theta": r.base * factor ** (d / (d - 2))}, \
            block_size
    if kind == "dynamic":  # HF's dynamic reads its original length from max_position_embeddings
        return ({"rope_type": "dynamic", "factor": factor or 1.0, "rope_theta": r.base},
                int(s["original_max_position"]))
    out = {"rope_type": "yarn", "factor": factor, "rope_theta": r.base,
           "original_max_position_embeddings": int(s["original_max_position"]),
           "beta_fast": s.get("beta_fast", 32.0), "beta_slow": s.get("beta_slow", 1.0),
           "truncate": True}
    if s.get("attention_factor") is not None:
        out["attention_factor"] = s["attention_factor"]
    return out, int(factor * s["original_max_position"])


def export_llama(model: Transformer, out: Path, *, replaces: Collection[str] = ()) -> Path:
    """Write `model` (a `rope` Transformer with its tokenizer) as a transformers Llama folder,
    replacing `out` as a whole; of an existing `out`, the files named in `replaces` (a previous
    export's) go and the others stay."""
    # lazy: transformers takes seconds to import and only the export needs it
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = model.config
    meta = model.meta or {}
    data = (meta.get("run_config") or {}).get("data") or {}
    block_size = int(data.get("block_size") or 2048)
    eod_token = (data.get("tokenizer") or {}).get("eod_token")
    eod_id = model.tokenizer.token_to_id(eod_token) if model.tokenizer and eod_token else None
    rope, max_position = rope_parameters(cfg, block_size)
    llama = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads, hidden_act="silu",
        max_position_embeddings=max_position, rms_norm_eps=cfg.norm_eps,
        initializer_range=cfg.init_std, tie_word_embeddings=False, attention_bias=False,
        mlp_bias=False, rope_parameters=rope, bos_token_id=None, eos_token_id=eod_id,
        pad_token_id=None)
    hf = LlamaForCausalLM(llama)
    hf.load_state_dict(to_llama_state_dict(model), strict=True)

    def write(tmp: Path) -> None:
        hf.save_pretrained(tmp)
        if model.tokenizer is not None:
            PreTrainedTokenizerFast(tokenizer_object=model.tokenizer,
                                    eos_token=eod_token).save_pretrained(tmp)
        # transformers writes the weights through a private temporary file (0600): give every
        # file the permissions a plain write would, so the group that shares --out can read it
        mode = file_mode()
        for path in tmp.rglob("*"):
            if path.is_file() and not path.is_symlink():
                os.chmod(path, mode)
        write_manifest(tmp, "models.export_hf")

    return replace_folder(out, write, replaces=replaces)


def export(ckpt: str | Path, out: str | Path, *, overwrite: bool = False
           ) -> tuple[Path, str | None]:
    """Export the model of `ckpt` into `out`: `(folder, None)` for a Llama folder, or
    `(folder, why not)` for a `save_pretrained` folder. CheckpointError for a non-empty `out`
    that holds no previous export, unless `overwrite` (module docstring)."""
    out = Path(out).expanduser()
    # before the model is read: a refused --out should not cost the load
    replaces = replaceable_files(out, overwrite=overwrite, what="--out", flag="--overwrite")
    model = Transformer.from_pretrained(ckpt, key="--ckpt")
    why = exportable_to_llama(model.config)
    if why is not None:
        return model.save_pretrained(out, overwrite=True), why
    try:
        return export_llama(model, out, replaces=replaces), None
    except (ValueError, RuntimeError) as exc:  # transformers refusing a config or a weight
        raise CheckpointError(f"--ckpt {ckpt}: the Llama export failed: {first_line(exc)}") \
            from None


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m models.export_hf ...`; exit status 2 with one `error:` line on bad input."""
    parser = argparse.ArgumentParser(
        prog="python -m models.export_hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a run folder, a .ckpt or a saved folder")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out that holds no previous export: the "
                        "export's files are replaced, the others kept")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        folder, why = export(args.ckpt, args.out, overwrite=args.overwrite)
    except BipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if why is None:
        print(f"wrote a transformers LlamaForCausalLM folder to {folder}: "
              "AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained load it")
    else:
        print(f"not a Llama model ({why}); wrote the save_pretrained folder {folder}: load it "
              "with models.Transformer.from_pretrained")
    return 0


if __name__ == "__main__":
    sys.exit(main())
