"""lm-evaluation-harness for any checkpoint of any encoding: the model `bipe`.

    python -m evaluation.lm_harness --model bipe --model_args pretrained=outputs/<day>/<run> \\
        --tasks lambada_openai --device cpu          # lm_eval's own command, with `bipe` known

    import evaluation.lm_harness, lm_eval            # the Python API: importing registers it
    lm_eval.simple_evaluate(model="bipe", model_args="pretrained=RUN", tasks=[...])

`pretrained` is a run folder, a `.ckpt` or a `save_pretrained` folder
(`models.Transformer.from_pretrained`). Texts are tokenized with the checkpoint's tokenizer and
segmented by its own segmenter (the run's `data` config: Punkt sentences, lines, separators...),
so BiPE models see the segment boundaries they were trained with; generated tokens get their
flags from the checkpoint's separator ids. The three request types:

* `loglikelihood`: the continuation's summed log-probability after the context, and whether
  greedy decoding would produce it (a context's trailing spaces move to the continuation, as in
  lm_eval's Hugging Face model);
* `loglikelihood_rolling`: a document scored in disjoint windows of `max_length` tokens
  (default: the training length), positions restarting in every window as in training;
* `generate_until`: greedy KV-cached decoding until a stop string or `max_gen_toks`.

lm_eval's plain `lm_eval` command cannot know a model defined outside its package; this module's
command is that command with `bipe` registered. It loads `pretrained` before lm_eval starts (which
takes a while), so a wrong path is one `error:` line at once (status 2), not a traceback later.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from bipe.errors import BipeError, first_line
from data.config import DataConfig
from data.segment import Segmenter, configured_separator_ids
from data.tokenizer import DocumentEncoder
from models import Transformer, generate

MODEL_NAME = "bipe"
# Models `main` loaded to check `pretrained` before lm_eval starts, for BipeLM to take over.
_PRELOADED: dict[str, Transformer] = {}


def load_pretrained(pretrained: Any) -> Transformer:
    """`Transformer.from_pretrained(pretrained)`, or the model `main` loaded already;
    CheckpointError naming `pretrained=` when it is missing or cannot be loaded."""
    path = str(pretrained)  # lm_eval turns a `pretrained=123` into a number
    model = _PRELOADED.pop(path, None)
    return model if model is not None else Transformer.from_pretrained(path, key="pretrained")


@register_model(MODEL_NAME)
class BipeLM(LM):
    """An lm-evaluation-harness model over `Transformer.from_pretrained(pretrained)`."""

    def __init__(self, pretrained: str, device: str = "cpu", batch_size: int | str = 1,
                 max_length: int | None = None, **_: Any) -> None:
        super().__init__()
        self._device = torch.device(device)
        self.model = load_pretrained(pretrained).to(self._device)
        self.tokenizer = self.model.tokenizer
        meta = self.model.meta or {}
        data = (meta.get("run_config") or {}).get("data") or {}
        self.data_cfg = DataConfig.from_dict(data) if "segmenter" in data else None
        self.segmenter = Segmenter(self.data_cfg, self.tokenizer) if self.data_cfg else None
        self.encoder = DocumentEncoder(self.tokenizer)
        eod = (data.get("tokenizer") or {}).get("eod_token") or "<|endoftext|>"
        self.eod_id = self.tokenizer.token_to_id(eod)
        self.separator_ids = (configured_separator_ids(self.tokenizer, self.data_cfg).tolist()
                              if self.data_cfg else [])
        self.max_length = int(max_length or data.get("block_size") or 2048)

    # -- tokens and segments ----------------------------------------------------------------------

    def encode(self, text: str) -> tuple[list[int], list[bool]]:
        """Token ids of `text` and their boundary flags from the checkpoint's segmenter."""
        ids, starts = self.encoder.encode_many([text])[0]
        if self.segmenter is None or len(ids) == 0:
            return ids.tolist(), [False] * len(ids)
        return ids.tolist(), np.asarray(self.segmenter.boundaries(text, ids, starts)).tolist()

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[bool], int]:
        """`(ids, flags, n)` of context + continuation; the last `n` ids are the continuation.
        An empty context is the end-of-document token (a new document starts after it)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:  # as lm_eval's HF model: trailing spaces belong to the continuation
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, flags = self.encode(context + continuation)
        n_context = len(self.encode(context)[0]) if context else 0
        if n_context == 0:
            whole, flags, n_context = [self.eod_id, *whole], [True, *flags], 1
        return whole, flags, len(whole) - n_context

    @torch.no_grad()
    def _logprobs(self, ids: list[int], flags: list[bool], n: int) -> tuple[float, bool]:
        """Summed log-probability of the last `n` of `ids` given the ones before, and whether
        each is the greedy choice (inputs truncated from the left to `max_length`)."""
        ids, flags = ids[-(self.max_length + 1):], flags[-(self.max_length + 1):]
        x = torch.tensor([ids[:-1]], device=self._device)
        b = torch.tensor([flags[:-1]], device=self._device)
        logprobs = F.log_softmax(self.model(x, b)[0, -n:].float(), dim=-1)
        target = torch.tensor(ids[-n:], device=self._device)
        picked = logprobs.gather(1, target[:, None]).squeeze(1)
        return float(picked.sum()), bool((logprobs.argmax(-1) == target).all())

    # -- lm_eval's interface ----------------------------------------------------------------------

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False
                      ) -> list[tuple[float, bool]]:
        out = []
        for request in requests:
            context, continuation = request.args
            out.append(self._logprobs(*self._pair(context, continuation)))
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False
                              ) -> list[float]:
        out = []
        for request in requests:
            ids, flags = self.encode(request.args[0])
            flag_of = {i: f for i, f in enumerate(flags)}
            total = 0.0
            windows = get_rolling_token_windows(list(range(len(ids))), prefix_token=-1,
                                                max_seq_len=self.max_length, context_len=1)
            for context, preds in map(make_disjoint_window, windows):
                # positions into the document; -1 is the end-of-document token before it
                seq = [*context, *preds]
                tokens = [self.eod_id if i < 0 else ids[i] for i in seq]
                window_flags = [True if i < 0 else flag_of[i] for i in seq]
                total += self._logprobs(tokens, window_flags, len(preds))[0]
            out.append(total)
        return out

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in requests:
            context, kwargs = request.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids, flags = self.encode(context)
            if not ids:
                ids, flags = [self.eod_id], [True]
            ids, flags = ids[-self.max_length:], flags[-self.max_length:]
            x = torch.tensor([ids], device=self._device)
            b = torch.tensor([flags], device=self._device)
            new = generate(self.model, x, b, max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
                           separator_ids=self.separator_ids, eos_id=self.eod_id)[0, len(ids):]
            tokens = new.tolist()
            if self.eod_id in tokens:
                tokens = tokens[: tokens.index(self.eod_id)]
            text = self.tokenizer.decode(tokens)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out


def pretrained_arg(argv: Sequence[str]) -> str | None:
    """The `pretrained` of `--model bipe --model_args ...` in lm_eval's arguments (`k=v,k2=v2`,
    `k=v k2=v2` or a JSON object); None for another model (or one named in a `--config` file:
    lm_eval reads that). BipeError when `--model bipe` has no `pretrained`."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", "-M")
    parser.add_argument("--model_args", "-a", nargs="+", default=[])
    known, _ = parser.parse_known_args(list(argv))
    if known.model != MODEL_NAME:
        return None
    model_args: dict[str, Any] = {}
    for value in known.model_args:
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            model_args.update(parsed)
            continue
        for item in value.split(","):
            name, _, arg = item.partition("=")
            model_args[name.strip()] = arg
    if "pretrained" in model_args:
        return str(model_args["pretrained"])
    raise BipeError(f"--model {MODEL_NAME} needs --model_args pretrained=<run folder, .ckpt or "
                    "save_pretrained folder>")


def main(argv: Sequence[str] | None = None) -> None:
    """lm_eval's command line, with `--model bipe` registered; `pretrained` is loaded before
    lm_eval starts, so a bad one is one `error:` line (status 2) without the wait."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        pretrained = pretrained_arg(argv)
        if pretrained is not None:
            _PRELOADED[pretrained] = Transformer.from_pretrained(pretrained, key="pretrained")
    except BipeError as exc:
        print(f"error: {first_line(exc)}", file=sys.stderr)
        sys.exit(2)  # as train.py and eval.py for bad input
    from lm_eval.__main__ import cli_evaluate  # lazy: its own import cost, only for the command

    sys.argv = [sys.argv[0], *argv]
    sys.exit(cli_evaluate())


if __name__ == "__main__":
    main()
