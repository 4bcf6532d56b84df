"""What each profile (`--smoke`, `--quick`, `--full`) measures: shapes, lengths, repetitions."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bipe.config import NAMED_ENCODINGS

SECTIONS: tuple[str, ...] = ("training", "encodings", "compiled", "long_context", "decoding",
                             "data", "ceiling")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


@dataclass(frozen=True)
class Shape:
    """A decoder shape plus the batch size it is measured at."""

    name: str
    n_layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int
    batch: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def describe(self) -> str:
        return (f"{self.n_layers} layers, hidden {self.hidden}, {self.heads} heads, SwiGLU "
                f"{self.intermediate}, vocab {self.vocab}, batch {self.batch}")


SMALL = Shape("small", n_layers=4, hidden=256, heads=4, intermediate=1024, vocab=8192, batch=8)
PAPER_162M = Shape("162M", n_layers=12, hidden=768, heads=12, intermediate=3072, vocab=32000,
                   batch=1)
LONG = Shape("long-context", n_layers=4, hidden=256, heads=4, intermediate=1024, vocab=8192,
             batch=1)
TINY = Shape("tiny", n_layers=1, hidden=32, heads=2, intermediate=64, vocab=128, batch=2)


@dataclass(frozen=True)
class TrainRun:
    """Section 1 for one shape: the sequence lengths and timed steps per contender."""

    shape: Shape
    seq_lens: tuple[int, ...]
    reps: int = 3
    warmup: int = 1


@dataclass(frozen=True)
class Profile:
    """Every knob of one benchmark run. `reps` are the timed samples per figure (the median is
    reported), `warmup` the untimed calls per contender before them."""

    name: str
    # 1. training throughput
    train_runs: tuple[TrainRun, ...] = (TrainRun(SMALL, (512,)),)
    precisions: tuple[str, ...] = PRECISIONS
    # 2. cost of each encoding (also: steps per figure)
    train_warmup: int = 1
    train_reps: int = 3
    encoding_shape: Shape = SMALL
    encoding_seq_lens: tuple[int, ...] = (512,)
    encodings: tuple[str, ...] = ("rope", "alibi", "bipe_rope", "bipe_alibi")
    segment_mean: float = 27.0  # mean segment length in tokens (BiPE boundaries)
    # 3. compiled training: eager against `model.compile()`, same weights and batches
    compile_shape: Shape = SMALL
    compile_seq: int = 512
    compile_encodings: tuple[str, ...] = ("rope", "bipe_alibi")
    compile_steps: int = 20  # steps both copies train before their losses are compared
    compile_reps: int = 5
    # 4. long-context forward (the model trained at `lc_train_len`)
    lc_shape: Shape = LONG
    lc_lengths: tuple[int, ...] = (2048, 8192)
    lc_encodings: tuple[str, ...] = tuple(NAMED_ENCODINGS)  # every named encoding
    lc_train_len: int = 1024  # LM-Infinite n_local and distance cap (pretraining length)
    lc_n_global: int = 100
    lc_reps: int = 3
    lc_long_from: int = 16384  # from this length on, `lc_long_reps` samples (slow lengths)
    lc_long_reps: int = 3
    # 5. cached decoding
    dec_encodings: tuple[str, ...] = ("rope", "bipe_alibi")
    dec_contexts: tuple[int, ...] = (1024, 4096)
    dec_new_tokens: int = 64
    dec_reps: int = 5
    # 6. data pipeline
    data_cfg: dict[str, Any] = field(default_factory=lambda: {"name": "shakespeare"})
    data_reps: int = 3
    data_workers: tuple[int, ...] = (1, 2)  # end-to-end builds with this many processes
    reload_reps: int = 3
    # 7. machine ceiling
    matmul_n: int = 2048
    matmul_reps: int = 10

    def replace(self, **changes: Any) -> Profile:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


QUICK = Profile(name="quick")

# About an hour on an idle 2-core machine: the 162M shape is measured at seq 512 only.
FULL = Profile(
    name="full",
    train_runs=(TrainRun(SMALL, (512, 1024), reps=5), TrainRun(PAPER_162M, (512,), reps=3)),
    train_reps=5,
    encoding_seq_lens=(512, 1024),
    compile_reps=7,
    lc_lengths=(2048, 4096, 8192, 16384, 32768),
    lc_reps=5,
    dec_contexts=(1024, 4096, 16384),
    dec_new_tokens=128,
    dec_reps=3,
    data_reps=5,
    reload_reps=5,
)

# The smallest configuration of every section (tests); `data_cfg` is set by the caller to a
# small corpus in a temporary cache.
SMOKE = Profile(
    name="smoke",
    train_runs=(TrainRun(TINY, (32,), reps=1, warmup=0),),
    train_warmup=0,
    train_reps=1,
    encoding_shape=TINY,
    encoding_seq_lens=(32,),
    compile_shape=TINY,
    compile_seq=32,
    compile_encodings=("rope",),
    compile_steps=2,
    compile_reps=1,
    lc_shape=TINY,
    lc_lengths=(128, 256),
    lc_encodings=("rope", "alibi", "bipe_alibi", "kerple"),
    lc_train_len=64,
    lc_n_global=4,
    lc_reps=1,
    dec_contexts=(64,),
    dec_new_tokens=4,
    dec_reps=1,
    data_reps=1,
    reload_reps=1,
    matmul_n=128,
    matmul_reps=2,
)

PROFILES: dict[str, Profile] = {"smoke": SMOKE, "quick": QUICK, "full": FULL}
