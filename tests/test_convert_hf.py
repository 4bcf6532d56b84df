"""Hugging Face Llama-format checkpoints (the BiPE release) -> our model: same logits, round trip.

The reference for every variant is `transformers`' own `LlamaForCausalLM` (eager attention, fp32)
driven the way the released BiPE code drives its fork: BiPE adds the intra table to the token
embeddings and feeds `inter` as `position_ids`; ALiBi turns the rotation off (all positions 0)
and adds the released bias `slope_h * key_position` through a 4-D float attention mask.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never reach the Hub
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from bipe.alibi import alibi_slopes  # noqa: E402
from bipe.errors import CheckpointError  # noqa: E402
from bipe.positions import boundaries_from_separators  # noqa: E402
from models import Transformer  # noqa: E402
from models.convert_hf import main  # noqa: E402
from models.hf_llama import (  # noqa: E402
    INTRA_TABLE_KEY,
    convert_llama_state_dict,
    to_llama_state_dict,
)

VOCAB, HIDDEN, HEADS, LAYERS, FFN, MAX_POS, INTRA_ROWS = 128, 64, 4, 2, 128, 64, 16
SEPARATORS = (13, 100)  # stand-ins for LLaMA's 13 and 869 in a 128-token vocabulary


def _hf_config(**overrides) -> transformers.LlamaConfig:
    kwargs = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                  num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                  max_position_embeddings=MAX_POS, rms_norm_eps=1e-5, tie_word_embeddings=False)
    kwargs.update(overrides)
    cfg = transformers.LlamaConfig(**kwargs)
    cfg._attn_implementation = "eager"
    return cfg


def _hf_model(cfg: transformers.LlamaConfig, state: dict | None = None):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    if state is not None:
        model.load_state_dict(state)
    return model


@pytest.fixture(scope="module")
def hf() -> transformers.LlamaForCausalLM:
    """A random tiny Llama; its norms perturbed so they are not all ones (a mix-up would show)."""
    model = _hf_model(_hf_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_dict(hf) -> dict:
    """config.json of the tiny model, as saved by save_pretrained."""
    return json.loads(hf.config.to_json_string())


@pytest.fixture(scope="module")
def intra_table() -> torch.Tensor:
    """A synthetic released-style intra table `[INTRA_ROWS, HIDDEN]`, last row zero as released."""
    table = torch.randn(INTRA_ROWS, HIDDEN, generator=torch.Generator().manual_seed(1)) * 0.5
    table[-1] = 0.0  # padding_idx=-1 of the released code
    return table


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    """`[2, 40]` ids with separators, one segment longer than the intra table (clip bucket)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randint(14, VOCAB, (2, 40), generator=g)
    x[x == SEPARATORS[1]] = 99
    x[0, [3, 9, 10, 30]] = SEPARATORS[0]
    x[1, [5, 33]] = SEPARATORS[1]  # row 1: tokens 6..33 are one 28-token segment > 16 rows
    return x


def _ours(hf_state: dict, config: dict, pe: str) -> Transformer:
    cfg, state = convert_llama_state_dict(hf_state, config, pe)
    model = Transformer(cfg).eval()
    model.load_state_dict(state)
    return model


def _bilevel_reference(ids: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The released `get_bilevel_ids`, written as a loop: (intra clipped to rows - 1, inter)."""
    intra, inter = torch.zeros_like(ids), torch.zeros_like(ids)
    for b in range(ids.shape[0]):
        seg, offset = 0, 0
        for t in range(ids.shape[1]):
            intra[b, t], inter[b, t] = min(offset, rows - 1), seg
            offset += 1
            if int(ids[b, t]) in SEPARATORS:
                seg, offset = seg + 1, 0
    return intra, inter


def _alibi_mask(pos: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """Released ALiBi as a 4-D additive mask `[B, H, T, T]`: `slope_h * pos_j`, causal."""
    T = pos.shape[-1]
    bias = slopes.view(1, -1, 1, 1) * pos[:, None, None, :].float()
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return bias.masked_fill(~causal, torch.finfo(torch.float32).min)


@torch.no_grad()
def _released_logits(hf, ids: torch.Tensor, pe: str, table: torch.Tensor | None) -> torch.Tensor:
    """Logits of the released model `pe`, computed by the HF Llama with the released rules."""
    embeds = hf.model.embed_tokens(ids)
    intra, inter = _bilevel_reference(ids, INTRA_ROWS)
    if pe.startswith("bipe"):
        embeds = embeds + table[intra]
    pos = inter if pe.startswith("bipe") else torch.arange(ids.shape[1]).expand_as(ids)
    if pe.endswith("rope"):
        return hf(inputs_embeds=embeds, position_ids=pos).logits
    slopes = alibi_slopes(HEADS) * (96.0 if pe == "bipe_alibi" else 1.0)
    return hf(inputs_embeds=embeds, position_ids=torch.zeros_like(ids),
              attention_mask=_alibi_mask(pos, slopes)).logits


def _bipe_state(hf, table: torch.Tensor) -> dict:
    return {**hf.state_dict(), INTRA_TABLE_KEY: table.clone()}


def _bipe_config(hf_dict: dict, pe: str) -> dict:
    return {**hf_dict, "rpe_type": pe, "train_scale": INTRA_ROWS}


# -- equivalence -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shard", [None, "300KB"])
@torch.no_grad()
def test_rope_logits_match_hf(hf, ids, tmp_path, shard):
    """A save_pretrained folder (one file or shards) converts to a model whose fp32 logits equal
    HF's within 1e-5."""
    from models.convert_hf import load_hf_folder

    hf.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard)
    config, state = load_hf_folder(tmp_path)
    ours = _ours(state, config, "rope")
    ref = hf(ids).logits
    torch.testing.assert_close(ours(ids), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pe", ["alibi", "bipe_rope", "bipe_alibi"])
@torch.no_grad()
def test_variants_match_released_rules(hf, hf_dict, intra_table, ids, pe):
    """ALiBi, BiPE-RoPE and BiPE-ALiBi give the released code's logits on separator boundaries
    (intra clipped into the zero last row for the 28-token segment)."""
    table = intra_table if pe.startswith("bipe") else None
    state = _bipe_state(hf, table) if table is not None else hf.state_dict()
    config = _bipe_config(hf_dict, pe) if table is not None else hf_dict
    ours = _ours(state, config, pe)
    boundary = boundaries_from_separators(ids, SEPARATORS)
    torch.testing.assert_close(ours(ids, boundary), _released_logits(hf, ids, pe, table),
                               atol=1e-5, rtol=0)


@torch.no_grad()
def test_bipe_rope_one_token_segments_is_rope(hf, hf_dict, intra_table, ids):
    """BiPE-RoPE with every token its own segment (intra = 0, inter = t) and intra row 0 zeroed
    computes plain RoPE, i.e. the HF model's logits."""
    table = intra_table.clone()
    table[0] = 0.0
    ours = _ours(_bipe_state(hf, table), _bipe_config(hf_dict, "bipe_rope"), "bipe_rope")
    all_true = torch.ones_like(ids, dtype=torch.bool)
    torch.testing.assert_close(ours(ids, all_true), hf(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
     "beta_slow": 0.01},  # a ramp that ends past the last frequency pair: clamped as HF does
    {"rope_type": "dynamic", "factor": 2.0},  # max_position_embeddings is the original length
])
@torch.no_grad()
def test_rope_scaling_matches_hf(hf, ids, scaling):
    """Linear (PI), YaRN and dynamic NTK scaling in config.json map onto pe.relative.scaling
    exactly (dynamic: the 40-token input is longer than its 16-token original, so it scales)."""
    short = {"max_position_embeddings": 16} if scaling["rope_type"] == "dynamic" else {}
    cfg = _hf_config(rope_parameters={**scaling, "rope_theta": 10000.0}, **short)
    scaled = _hf_model(cfg, hf.state_dict())
    ours = _ours(hf.state_dict(), json.loads(cfg.to_json_string()), "rope")
    assert ours.config.pe.relative.scaling["type"] == scaling["rope_type"]
    torch.testing.assert_close(ours(ids), scaled(ids).logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_tied_embeddings_without_lm_head(hf, hf_dict):
    """tie_word_embeddings=true with no lm_head.weight: the head becomes a copy of the embedding."""
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    _, ours = convert_llama_state_dict(state, {**hf_dict, "tie_word_embeddings": True}, "rope")
    assert torch.equal(ours["lm_head.weight"], state["model.embed_tokens.weight"])


# -- round trip ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pe", ["rope", "alibi", "bipe_rope", "bipe_alibi"])
def test_round_trip(hf, hf_dict, intra_table, pe):
    """to_llama_state_dict(convert(x)) == x, the BiPE intra table included (through a model)."""
    bipe = pe.startswith("bipe")
    state = _bipe_state(hf, intra_table) if bipe else hf.state_dict()
    config = _bipe_config(hf_dict, pe) if bipe else hf_dict
    cfg, ours = convert_llama_state_dict(state, config, pe)
    model = Transformer(cfg)
    model.load_state_dict(ours)
    back = to_llama_state_dict(model)
    assert set(back) == set(state)
    for key, tensor in state.items():
        assert torch.equal(back[key], tensor), key
    if bipe:
        assert model.pe.absolute.max_positions == INTRA_ROWS


def test_only_released_layouts_export():
    """A model the released code cannot run (a token-index table, BiPE-ALiBi without the 96x
    slopes) is refused rather than exported under the BiPE table's name."""
    from bipe.encoding import PEConfig
    from models import ModelConfig

    for pe in (PEConfig.named("learned", max_positions=MAX_POS),
               PEConfig.named("bipe_alibi", max_positions=INTRA_ROWS, slope_multiplier=1.0)):
        model = Transformer(ModelConfig(vocab_size=VOCAB, n_layers=1, hidden_size=HIDDEN,
                                        n_heads=HEADS, pe=pe))
        with pytest.raises(CheckpointError, match="no Llama-format equivalent"):
            to_llama_state_dict(model)


# -- the command -----------------------------------------------------------------------------------


def _tokenizer_file(folder: Path) -> Path:
    """A 128-token word-level tokenizer.json (the tokenizers package, no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return path


@torch.no_grad()
def test_cli_writes_loadable_checkpoint(hf, hf_dict, intra_table, ids, tmp_path, capsys):
    """The command writes our format; Transformer.from_pretrained gives the same logits."""
    from models import Transformer
    from models.checkpoint import load_checkpoint

    src = tmp_path / "bipe_rope_hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(_bipe_config(hf_dict, "bipe_rope")))
    # .bin (read with weights_only=True) rather than safetensors: the other supported format
    torch.save(_bipe_state(hf, intra_table), src / "pytorch_model.bin")
    tok = _tokenizer_file(tmp_path)
    out = tmp_path / "out" / "bipe_rope.ckpt"
    code = main(["--hf-dir", str(src), "--tokenizer", str(tok), "--out", str(out),
                 "--separator-ids", *map(str, SEPARATORS), "--max-segments-per-block", "12"])
    assert code == 0, capsys.readouterr().err
    assert not list(out.parent.glob(".*.tmp"))  # atomic write left no temp file

    model = Transformer.from_pretrained(out)
    tokenizer, meta = model.tokenizer, model.meta
    boundary = boundaries_from_separators(ids, SEPARATORS)
    torch.testing.assert_close(model(ids, boundary),
                               _released_logits(hf, ids, "bipe_rope", intra_table),
                               atol=1e-5, rtol=0)
    assert meta["model_config"]["pe"]["name"] == "bipe_rope"  # from config.json's rpe_type
    assert meta["model_config"]["pe"]["absolute"]["max_positions"] == INTRA_ROWS
    data = meta["run_config"]["data"]
    assert (data["block_size"], data["segmenter"]) == (MAX_POS, "separators")
    assert data["separator_ids"] == list(SEPARATORS)
    assert data["tokenizer"]["eod_token"] == "</s>"
    assert meta["data_stats"]["max_segments_per_block"] == 12
    assert tokenizer.get_vocab_size() == VOCAB
    ckpt = load_checkpoint(out)  # weights_only=True
    assert all(k.startswith("model.") for k in ckpt["state_dict"])
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values())


def test_cli_error_is_one_line(hf, hf_dict, tmp_path, capsys):
    """A bad checkpoint exits with status 2 and one `error:` line naming the key."""
    src = tmp_path / "gqa"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**hf_dict, "num_key_value_heads": 2}))
    safetensors_torch.save_file(hf.state_dict(), str(src / "model.safetensors"))
    code = main(["--hf-dir", str(src), "--pe", "rope", "--tokenizer",
                 str(_tokenizer_file(tmp_path)), "--out", str(tmp_path / "x.ckpt")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error:") and "\n" not in err and "num_key_value_heads" in err
    assert not (tmp_path / "x.ckpt").exists()


def test_git_lfs_pointer_is_named(hf_dict, tmp_path):
    """A clone without `git lfs pull` gets a one-line hint instead of a parse error."""
    from models.convert_hf import load_hf_folder

    (tmp_path / "config.json").write_text(json.dumps(hf_dict))
    (tmp_path / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    with pytest.raises(CheckpointError, match="git lfs pull"):
        load_hf_folder(tmp_path)


# -- what we reject --------------------------------------------------------------------------------


def _one_line_error(state: dict, config: dict, pe: str) -> str:
    with pytest.raises(CheckpointError) as info:
        convert_llama_state_dict(state, config, pe)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("change, pe, key", [
    ({"num_key_value_heads": 2}, "rope", "num_key_value_heads"),
    ({"attention_bias": True}, "rope", "attention_bias"),
    ({"mlp_bias": True}, "rope", "mlp_bias"),
    ({"hidden_act": "gelu"}, "rope", "hidden_act"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}}, "rope",
     "llama3"),
    ({"rpe_type": "alibi"}, "rope", "rpe_type"),
    ({"log_scale": True}, "alibi", "log_scale"),
    ({"model_type": "mistral"}, "rope", "model_type"),
])
def test_config_rejections(hf, hf_dict, change, pe, key):
    assert key in _one_line_error(hf.state_dict(), {**hf_dict, **change}, pe)


def test_bias_weight_is_named(hf, hf_dict):
    state = {**hf.state_dict(), "model.layers.1.mlp.up_proj.bias": torch.zeros(FFN)}
    assert "model.layers.1.mlp.up_proj.bias" in _one_line_error(state, hf_dict, "rope")


def test_unknown_and_missing_keys_are_named(hf, hf_dict, intra_table):
    state = {**hf.state_dict(), "model.layers.2.mlp.up_proj.weight": torch.zeros(FFN, HIDDEN)}
    assert "model.layers.2.mlp.up_proj.weight" in _one_line_error(state, hf_dict, "rope")
    state = {k: v for k, v in hf.state_dict().items() if "layers.1.self_attn.k_proj" not in k}
    assert "model.layers.1.self_attn.k_proj.weight" in _one_line_error(state, hf_dict, "rope")
    assert INTRA_TABLE_KEY in _one_line_error(hf.state_dict(), hf_dict, "bipe_rope")
    assert INTRA_TABLE_KEY in _one_line_error(_bipe_state(hf, intra_table), hf_dict, "rope")
    bad_rows = {**_bipe_config(hf_dict, "bipe_rope"), "train_scale": 32}
    assert "train_scale" in _one_line_error(_bipe_state(hf, intra_table), bad_rows, "bipe_rope")
    wrong = {**hf_dict, "hidden_size": 32, "head_dim": 8}
    assert "shape" in _one_line_error(hf.state_dict(), wrong, "rope")


def test_tied_head_that_differs_is_rejected(hf, hf_dict):
    config = {**hf_dict, "tie_word_embeddings": True}
    assert "tie_word_embeddings" in _one_line_error(hf.state_dict(), config, "rope")


def test_released_alibi_buffer_is_checked(hf, hf_dict, intra_table):
    """The released ALiBi layers persist `slope_h * j`; it is dropped after checking the slopes,
    so an ALiBi checkpoint converted as the other ALiBi variant (96x slopes) is refused."""
    j = torch.arange(MAX_POS, dtype=torch.float32)
    buf = (alibi_slopes(HEADS)[:, None] * j).view(1, HEADS, 1, MAX_POS).half()
    state = {**hf.state_dict(), **{f"model.layers.{i}.self_attn.alibi": buf
                                   for i in range(LAYERS)}}
    _, ours = convert_llama_state_dict(state, hf_dict, "alibi")
    assert not any("alibi" in k for k in ours)
    table_state = {**state, INTRA_TABLE_KEY: intra_table}
    msg = _one_line_error(table_state, _bipe_config(hf_dict, "bipe_alibi"), "bipe_alibi")
    assert "self_attn.alibi" in msg and "0.0104x" in msg
    assert "self_attn.alibi" in _one_line_error(state, hf_dict, "rope")
