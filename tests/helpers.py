"""Small builders shared by the model tests."""

import torch

from bipe import PEConfig
from models import ModelConfig, Transformer

ENCODINGS = ["nope", "sinusoidal", "learned", "rope", "alibi", "bipe_rope", "bipe_alibi"]
EXTRAPOLATING = [e for e in ENCODINGS if e != "learned"]


def tiny_model(pe: str | PEConfig, vocab: int = 61, train_len: int = 32, seed: int = 0,
               **overrides) -> Transformer:
    torch.manual_seed(seed)
    pe_cfg = pe if isinstance(pe, PEConfig) else PEConfig.named(pe, max_positions=train_len)
    cfg = dict(vocab_size=vocab, n_layers=2, hidden_size=32, n_heads=4, pe=pe_cfg)
    return Transformer(ModelConfig(**{**cfg, **overrides})).eval()


def random_batch(B: int, T: int, vocab: int = 61, p_boundary: float = 0.2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    boundary = torch.rand(B, T, generator=g) < p_boundary
    return ids, boundary


def synthetic_dm(cfg: dict, seed: int = 0):
    """The `SyntheticDataModule` of a generated task's `task` config (e.g. `{"name": ...}`)."""
    from tasks import get_task
    from tasks.generated import SyntheticDataModule

    return SyntheticDataModule(get_task(cfg["name"])(cfg), seed=seed)


WORDS = ["the", "king", "queen", "lord", "lady", "sword", "crown", "castle", "night", "day",
         "love", "death", "war", "peace", "speak", "hear", "come", "go", "my", "thy", "good",
         "noble", "gentle", "brave"]
TEXTS = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(30)) + "." for i in range(60)]


def write_run(folder, model, tokenizer, block_size: int = 32):
    """A run folder as train.py leaves it (checkpoints/last.ckpt in our format), for `model`
    trained on a `text_files` corpus segmented by lines."""
    from models.checkpoint import CHECKPOINT_KEY, FORMAT_VERSION, save_atomic

    meta = {"format_version": FORMAT_VERSION, "model_config": model.config.to_dict(),
            "tokenizer": tokenizer.to_str(), "global_step": 3,
            "data_stats": {"max_segments_per_block": 12},
            "run_config": {"seed": 0, "data": {
                "name": "text_files", "glob": "x", "segmenter": "lines", "block_size": block_size,
                "batch_size": 2, "tokenizer": {"eod_token": "<|endoftext|>", "vocab_size": 300}},
                "optim": {"lr": 1e-3}, "trainer": {"max_steps": 10}}}
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    save_atomic({"state_dict": state, "global_step": 3, CHECKPOINT_KEY: meta},
                folder / "checkpoints" / "last.ckpt")
    return folder
