import pytest
import torch
import torch.nn.functional as F

from bipe import PEConfig, PositionalEncoding
from bipe.errors import ConfigError
from models import ModelConfig, Transformer
from tests.helpers import ENCODINGS, EXTRAPOLATING, random_batch, tiny_model


def _same_weights(dst: Transformer, src: Transformer) -> Transformer:
    dst.load_state_dict(src.state_dict())
    return dst


@pytest.mark.parametrize("relative", ["rope", "alibi"])
def test_bipe_with_one_token_segments_equals_token_encoding(relative):
    """All boundaries True and no absolute part: inter == token index, so BiPE-X == X."""
    plain = tiny_model(relative)
    bipe = PEConfig(name=f"bipe_{relative}", relative={"type": relative, "index": "inter"})
    bipe_model = _same_weights(tiny_model(bipe), plain)
    ids, _ = random_batch(2, 24)
    every = torch.ones_like(ids, dtype=torch.bool)
    torch.testing.assert_close(bipe_model(ids, every), plain(ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["rope", "alibi", "bipe_rope", "bipe_alibi"])
def test_relative_only_encodings_are_shift_invariant(name):
    """Attention under the relative part alone depends on position differences only: every
    position moved by 1000 gives the same output."""
    from bipe.rope import apply_rotary

    pe = PEConfig.named(name, max_positions=32)
    pe.absolute.type = "none"  # relative part only
    enc = PositionalEncoding(pe, hidden_size=32, n_heads=4)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 20, 8, generator=g) for _ in range(3))
    _, boundary = random_batch(2, 20)
    pos = enc.relative_positions(enc.positions(boundary, 2, 20))

    def attend(p: torch.Tensor) -> torch.Tensor:
        ctx = enc.context(p, p, 0, 20)
        qr, kr = (q, k) if ctx.cos is None else (apply_rotary(q, ctx.cos, ctx.sin),
                                                 apply_rotary(k, ctx.cos, ctx.sin))
        return ctx.attend(qr, kr, v)

    torch.testing.assert_close(attend(pos + 1000), attend(pos), rtol=0, atol=2e-4)


@pytest.mark.parametrize("name", ENCODINGS)
def test_causality(name):
    model = tiny_model(name)
    ids, boundary = random_batch(2, 30)
    t = 17
    ids2, boundary2 = ids.clone(), boundary.clone()
    ids2[:, t + 1:] = (ids2[:, t + 1:] + 7) % 61
    boundary2[:, t + 1:] = ~boundary2[:, t + 1:]
    a, b = model(ids, boundary), model(ids2, boundary2)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=0)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


@pytest.mark.parametrize("name", EXTRAPOLATING)
def test_forward_at_8x_training_length(name):
    model = tiny_model(name, train_len=32)
    ids, boundary = random_batch(1, 8 * 32)
    logits = model(ids, boundary)
    assert logits.shape == (1, 256, 61) and torch.isfinite(logits).all()


def test_learned_token_table_refuses_longer_input():
    model = tiny_model("learned", train_len=32)
    ids, _ = random_batch(1, 33)
    with pytest.raises(ConfigError) as err:
        model(ids)
    msg = str(err.value)
    assert "32 rows" in msg and "pe.absolute.max_positions" in msg and "\n" not in msg


def test_intra_table_clips_and_trains_its_last_row():
    model = tiny_model("bipe_rope", train_len=8)
    ids = torch.randint(0, 61, (1, 20))
    logits = model(ids)  # one segment of 20 tokens: intra 8..19 clip to row 7
    logits.sum().backward()
    grad = model.pe.absolute.table.weight.grad
    assert grad[7].abs().sum() > 0


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"hidden_size": 30, "n_heads": 4}, "model.hidden_size"),
    ({"hidden_size": 36, "n_heads": 4}, "odd"),
])
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        ModelConfig(vocab_size=10, pe=PEConfig.named("rope"), **kwargs)


def test_config_round_trip():
    cfg = ModelConfig(vocab_size=10, pe=PEConfig.named("bipe_alibi", max_positions=64))
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ConfigError, match="model.hidden"):
        ModelConfig.from_dict({**cfg.to_dict(), "hidden": 3})


@pytest.mark.parametrize("name", ENCODINGS)
def test_overfits_one_batch(name):
    """Every encoding memorises 4 x 32 random tokens: loss from ln 32 = 3.47 to below 0.1."""
    model = tiny_model(name, vocab=32, hidden_size=64).train()
    ids, boundary = random_batch(4, 33, vocab=32)
    x, y, b = ids[:, :-1], ids[:, 1:], boundary[:, :-1]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(150):
        loss = F.cross_entropy(model(x, b).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1, loss.item()
