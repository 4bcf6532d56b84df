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
