"""Every relative part is correct on every attention kernel (docs/architecture.md, "One contract
for relative parts"), and the encoding names agree everywhere they are listed.

The trap this guards against: a kernel that computes one part's bias whatever the part is (the
flex path once added ALiBi's for every bias part). Each registered relative part, plus a toy bias
part registered the way the README says, runs over token and over segment positions, with and
without LM-Infinite, on SDPA, on flex (above the flex threshold, so `auto` picks it too; eagerly
by default, compiled with `--slow`) and on the block-wise Lambda kernel, against a dense
reference: a plain softmax over an explicit `[T, T]` score matrix with the causal or Lambda mask.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from omegaconf import OmegaConf

import bipe.attention
from bipe import AttentionOptions, LMInfinite, PEConfig, PositionalEncoding
from bipe import config as pe_config
from bipe.attention import (
    AttentionContext,
    BiasFlex,
    BiasSDPA,
    CausalSDPA,
    FarFieldSDPA,
    LambdaBlockwise,
    LambdaFlex,
    choose_kernel,
)
from bipe.config import NAMED_ENCODINGS, RelativeConfig
from bipe.encoding import ABSOLUTE_PARTS, RELATIVE_PARTS
from bipe.errors import ConfigError
from bipe.positions import bilevel_ids
from bipe.relative import BiasPart, RotaryPart
from bipe.rope import apply_rotary
from models import KVCache
from tests.conftest import CONF, ROOT
from tests.helpers import random_batch, tiny_model

B, H, T, D = 2, 2, 200, 8
FLEX_MIN = 128  # lowered from 2048 so the test is quick; T is above it, so flex really runs
LM = LMInfinite(n_global=5, n_local=40, distance_cap=6)


class LogBias(BiasPart):
    """A toy bias part: `-c_h * log(1 + min(p_i - p_j, cap))`, `c_h = (h + 1) / H`, both forms
    written out by hand (not through `DistanceBias`), as a new part's author would."""

    def __init__(self, head_dim: int, n_heads: int, **_):
        super().__init__()
        self.register_buffer("c", torch.arange(1, n_heads + 1) / n_heads, persistent=False)

    def bias(self, q_pos, k_pos, cap=None):
        d = (q_pos[:, None, :, None] - k_pos[:, None, None, :]).float()
        if cap is not None:
            d = d.clamp(max=cap)
        return -self.c.view(1, -1, 1, 1) * torch.log1p(d.clamp(min=0))

    def score_mod(self, q_pos, k_pos, cap=None):
        c = self.c

        def score_mod(score, b, h, qi, ki):
            d = (q_pos[b, qi] - k_pos[b, ki]).to(score.dtype)
            if cap is not None:
                d = torch.clamp(d, max=cap)
            return score - c[h] * torch.log1p(torch.clamp(d, min=0))

        return score_mod


@pytest.fixture
def toy_registered(monkeypatch):
    """`log_bias` in the registry, as the README says a new scheme is added (one entry)."""
    monkeypatch.setitem(RELATIVE_PARTS, "log_bias", LogBias)
    yield "log_bias"


PARTS = [*RELATIVE_PARTS, "log_bias"]


def positions(index: str) -> torch.Tensor:
    if index == "token":
        return torch.arange(T)[None]
    g = torch.Generator().manual_seed(1)
    return bilevel_ids(torch.rand(B, T, generator=g) < 0.3)[1]  # segment index, [B, T]


def dense_reference(part, q, k, v, pos, lm: LMInfinite | None) -> torch.Tensor:
    """Softmax over an explicit `[B, H, T, T]` score matrix: each pair scored at its (capped)
    distance, by rotating the query by that distance and the key by 0 (a rotary part) or by the
    part's bias tensor (a bias part); the causal or Lambda mask as -inf."""
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = j <= i
    if lm is not None:
        allowed = allowed & ((i - j < lm.n_local) | (j < lm.n_global))
    cap = None if lm is None else lm.distance_cap
    d = pos[:, :, None] - pos[:, None, :]  # (B or 1, T, T)
    if cap is not None:
        d = d.clamp(max=cap)
    if isinstance(part, RotaryPart):
        rot = part.rotation(pos)
        q_each = rot.rotate(q[:, :, :, None].expand(B, H, T, T, D).reshape(B, H, T * T, D),
                            d.expand(B, T, T).reshape(B, T * T)).view(B, H, T, T, D)
        scores = (q_each * rot.at_origin(k)[:, :, None]).sum(-1)
    else:
        scores = q @ k.transpose(-1, -2)
    scores = scores / math.sqrt(D)
    if isinstance(part, BiasPart):
        scores = scores + part.bias(pos, pos, cap)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1) @ v


def attend(part, q, k, v, pos, options):
    """The README's flow: a context per pass, q and k rotated when it gives cos and sin (the
    keys by theirs: xPos scales them apart)."""
    ctx = AttentionContext(past=0, length=T, q_pos=pos, k_pos=pos, options=options, part=part)
    if ctx.cos is not None:
        q, k = apply_rotary(q, *ctx.rotary(q.dtype)), apply_rotary(k, *ctx.key_rotary(k.dtype))
    return ctx.kernel, ctx.attend(q, k, v)


def expected_kernels(part, lm) -> dict[str, type]:
    """Which kernel each `AttentionOptions.kernel` must give at this length, without grad."""
    if isinstance(part, RotaryPart):
        one = LambdaBlockwise if lm else CausalSDPA
        return {"sdpa": one, "flex": one, "auto": one}
    flex = LambdaFlex if lm else BiasFlex
    if lm is None and part.far_field() is not None:  # T > chunk_size, no grad, the CPU
        return {"sdpa": FarFieldSDPA, "flex": flex, "auto": FarFieldSDPA}
    return {"sdpa": LambdaBlockwise if lm else BiasSDPA, "flex": flex, "auto": flex}


@pytest.fixture(params=["eager", pytest.param("compiled", marks=pytest.mark.slow)])
def flex(request, monkeypatch):
    """How flex_attention runs: compiled, as in use (a few compilations, about 45 s on two
    busy cores, hence slow), or eagerly (`flex_attention`'s dense reference implementation of
    the same score_mod and mask_mod, no compilation), through the same kernel code."""
    if request.param == "eager":
        from torch.nn.attention.flex_attention import flex_attention

        monkeypatch.setattr(bipe.attention, "compiled_flex", lambda: flex_attention)
    return request.param


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
@pytest.mark.parametrize("lm", [None, LM], ids=["causal", "lm_infinite"])
@pytest.mark.parametrize("index", ["token", "inter"])
@pytest.mark.parametrize("name", PARTS)
@torch.no_grad()
def test_every_part_on_every_kernel_equals_the_dense_reference(toy_registered, flex, name, index,
                                                               lm):
    cfg = RelativeConfig(type=name, index=index)
    part = RELATIVE_PARTS[name](D, H, **dataclasses.asdict(cfg))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    pos = positions(index)
    if lm is not None:  # the cap binds for some attended pairs and not for others
        d = pos[:, :, None] - pos[:, None, :]
        assert (d > lm.distance_cap).any() and ((d > 0) & (d <= lm.distance_cap)).any()
    want = dense_reference(part, q, k, v, pos, lm)
    for kernel, kind in expected_kernels(part, lm).items():
        options = AttentionOptions(kernel=kernel, flex_min_length=FLEX_MIN, chunk_size=64,
                                   lm_infinite=lm)
        chosen, got = attend(part, q, k, v, pos, options)
        assert type(chosen) is kind, (kernel, chosen)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"kernel {chosen.name}")


def test_toy_part_bias_is_its_formula(toy_registered):
    part = LogBias(D, H)
    pos = torch.tensor([[0, 1, 1, 4]])
    bias = part.bias(pos, pos, cap=2)
    assert bias[0, 1, 3, 0].item() == pytest.approx(-1.0 * math.log(3))  # d = 4 capped at 2
    assert bias[0, 0, 2, 0].item() == pytest.approx(-0.5 * math.log(2))
    assert bias[0, 0, 2, 1].item() == 0.0


@pytest.mark.parametrize("index", ["token", "inter"])
@torch.no_grad()
def test_toy_part_in_a_model_decodes_with_a_cache_as_in_one_pass(toy_registered, index):
    """The model needs no edit for a new part, and its cached kernels (SDPA after cached tokens,
    LM-Infinite's ring buffer) agree with the full pass."""
    model = tiny_model(PEConfig(name="toy", relative={"type": "log_bias", "index": index}))
    ids, boundary = random_batch(2, 40, p_boundary=0.3)
    for lm in (None, LMInfinite(n_global=3, n_local=6, distance_cap=4)):
        model.attention = AttentionOptions(lm_infinite=lm)
        want = model(ids, boundary)
        cache = KVCache.for_model(model)
        steps = [model(ids[:, :10], boundary[:, :10], cache=cache)]
        steps += [model(ids[:, t:t + 1], boundary[:, t:t + 1], cache=cache) for t in range(10, 40)]
        torch.testing.assert_close(torch.cat(steps, 1), want, rtol=1e-5, atol=1e-5)


def test_registering_a_part_names_it_and_checks_the_contract(monkeypatch):
    with pytest.raises(ConfigError, match="pe.relative.type"):
        PEConfig(relative={"type": "log_bias"})
    monkeypatch.setitem(RELATIVE_PARTS, "log_bias", LogBias)
    assert "log_bias" in pe_config.RELATIVE_TYPES
    PEConfig(relative={"type": "log_bias"})  # a valid config value now
    with pytest.raises(TypeError, match="RelativePart"):
        RELATIVE_PARTS["plain"] = torch.nn.Identity  # neither a rotation nor a bias
    monkeypatch.undo()
    assert "log_bias" not in pe_config.RELATIVE_TYPES and "plain" not in pe_config.RELATIVE_TYPES


def test_cpu_training_never_gets_flex():
    """flex has no backward on the CPU: `auto` gives SDPA there with a gradient, and `flex`
    refuses, at any length."""
    part = RELATIVE_PARTS["alibi"](D, H)
    pos = torch.arange(4096)[None]
    auto = AttentionOptions(flex_min_length=FLEX_MIN)
    assert isinstance(choose_kernel(auto, part, device=pos.device, needs_grad=True,
                                    length=4096), BiasSDPA)
    assert isinstance(choose_kernel(auto, part, device=pos.device, needs_grad=False,
                                    length=4096), FarFieldSDPA)
    kerple = RELATIVE_PARTS["kerple"](D, H)
    assert isinstance(choose_kernel(auto, kerple, device=pos.device, needs_grad=False,
                                    length=4096), BiasFlex)
    with pytest.raises(RuntimeError, match="no backward on the CPU"):
        choose_kernel(AttentionOptions(kernel="flex"), part, device=pos.device,
                      needs_grad=True, length=16)


# --- the encoding names agree everywhere they are listed -------------------------------------

def conf_pe_files() -> dict[str, dict]:
    """Each conf/pe file as a plain mapping, its table size set where it interpolates one."""
    out = {}
    for path in sorted((CONF / "pe").glob("*.yaml")):
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        if isinstance(data["absolute"].get("max_positions"), str):
            data["absolute"]["max_positions"] = 64
        out[path.stem] = data
    return out


def test_config_names_are_the_registered_parts():
    for names, registry in ((pe_config.ABSOLUTE_TYPES, ABSOLUTE_PARTS),
                            (pe_config.RELATIVE_TYPES, RELATIVE_PARTS)):
        assert sorted(names) == sorted(["none", *registry]), "config names != registered parts"
    for name, part in RELATIVE_PARTS.items():  # exactly one of the two kinds
        assert issubclass(part, RotaryPart) != issubclass(part, BiasPart), name


@pytest.mark.parametrize("name", sorted(NAMED_ENCODINGS))
def test_every_named_encoding_builds_from_registered_parts(name):
    cfg = PEConfig.named(name, max_positions=64)
    for kind, registry in (("absolute", ABSOLUTE_PARTS), ("relative", RELATIVE_PARTS)):
        part = getattr(cfg, kind).type
        assert part == "none" or part in registry, (name, kind, part)
    PositionalEncoding(cfg, hidden_size=32, n_heads=4)


def test_conf_pe_files_agree_with_the_named_encodings():
    files = conf_pe_files()
    assert set(NAMED_ENCODINGS) <= set(files), "a named encoding has no conf/pe file"
    for stem, data in files.items():
        assert data["name"] == stem, f"conf/pe/{stem}.yaml is named {data['name']!r}"
        cfg = PEConfig.from_dict(data)
        assert cfg.absolute.type == "none" or cfg.absolute.type in ABSOLUTE_PARTS, stem
        assert cfg.relative.type == "none" or cfg.relative.type in RELATIVE_PARTS, stem
        if stem in NAMED_ENCODINGS:
            assert cfg == PEConfig.named(stem, max_positions=cfg.absolute.max_positions), stem


def test_readme_table_lists_the_named_encodings():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("| `pe=` |", 1)[1].split("\n\n", 1)[0]
    assert set(re.findall(r"^\| `(\w+)` \|", table, re.M)) == set(NAMED_ENCODINGS)
