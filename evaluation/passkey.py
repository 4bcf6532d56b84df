"""Passkey retrieval (LM-Infinite, docs/methods.md section 4), with exact token counts.

A prompt is an instruction, filler sentences repeated to the target length, one key sentence
at a chosen depth, and a question. It is assembled from token ids (each sentence tokenized on its
own), so its length is exactly the requested number of tokens; the released script counted tokens
wrongly and produced shorter prompts. Every sentence is its own segment, so BiPE models see the
sentence boundaries they were trained with.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
from torch import nn

from models.generation import generate

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
               "memorize them. I will quiz you about the important information there.")
FILLER = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
          "There and back again."]
KEY = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


@dataclass
class PasskeyPrompt:
    ids: list[int]
    boundary: list[bool]
    key: int
    key_start: int  # token index where the key sentence begins

    @property
    def depth(self) -> float:
        return self.key_start / len(self.ids)


def _sentences(tokenizer, text: str) -> list[list[int]]:
    """Token ids of each sentence of `text`, each encoded with a leading space."""
    parts = re.split(r"(?<=[.?!])\s+", text.strip())
    return [tokenizer.encode(" " + p).ids for p in parts if p]


def build_prompt(tokenizer, length: int, depth: float, key: int) -> PasskeyPrompt:
    """A prompt of exactly `length` tokens with the key sentence starting at about `depth`."""
    head = _sentences(tokenizer, INSTRUCTION)
    key_sent = _sentences(tokenizer, KEY.format(key=key))
    tail = _sentences(tokenizer, QUESTION)
    fixed = sum(map(len, head + key_sent + tail))
    budget = length - fixed
    if budget < 0:
        raise ValueError(f"passkey length {length} is shorter than the {fixed} tokens of the "
                         "instruction, key and question; use eval.passkey.lengths >= that")
    filler_sents = [_sentences(tokenizer, f)[0] for f in FILLER]
    filler: list[list[int]] = []
    n = 0
    while n < budget:  # whole filler sentences, the last one cut to fit exactly
        sent = filler_sents[len(filler) % len(filler_sents)][: budget - n]
        filler.append(sent)
        n += len(sent)
    # Put the key before the filler sentence where the depth falls (sentence-aligned).
    target = depth * budget
    cut, acc = 0, 0
    while cut < len(filler) and acc + len(filler[cut]) / 2 < target:
        acc += len(filler[cut])
        cut += 1
    pieces = head + filler[:cut] + key_sent + filler[cut:] + tail
    ids, flags = [], []
    for piece in pieces:
        ids += piece
        flags += [False] * (len(piece) - 1) + [True]
    key_start = sum(map(len, head)) + acc
    assert len(ids) == length
    return PasskeyPrompt(ids=ids, boundary=flags, key=key, key_start=key_start)


def first_number(text: str) -> int | None:
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


@torch.no_grad()
def passkey_accuracy(model: nn.Module, tokenizer, lengths: list[int], depths: list[float],
                     trials: int = 5, seed: int = 0, separator_ids=(), max_new_tokens: int = 8,
                     device: torch.device | str = "cpu") -> list[dict]:
    """Greedy retrieval accuracy for every (length, depth): a list of result rows."""
    rng = random.Random(seed)
    rows = []
    for length in lengths:
        for depth in depths:
            correct = 0
            for _ in range(trials):
                key = rng.randint(10000, 99999)
                p = build_prompt(tokenizer, length, depth, key)
                ids = torch.tensor([p.ids], device=device)
                flags = torch.tensor([p.boundary], device=device)
                out = generate(model, ids, flags, max_new_tokens=max_new_tokens,
                               separator_ids=separator_ids)
                answer = first_number(tokenizer.decode(out[0, length:].tolist()))
                correct += answer == key
            rows.append({"length": length, "depth": depth, "trials": trials,
                         "accuracy": correct / trials})
    return rows
