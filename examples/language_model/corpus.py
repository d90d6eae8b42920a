"""The synthetic language: arithmetic progressions written as token sequences.

A sentence is ``<bos> <rule k> s, s+d_k, s+2·d_k, … <eos>`` over the number tokens 0..M-1
(mod M), right-padded with ``<pad>`` to the context length. The rule token fixes the step
d_k, so a model that reads it predicts every number after the first exactly; the first number
is uniform (log M nats). Sentences differ in rule, start and length, so which training
sentences shaped a held-out sentence's loss has a known answer to check against: those of
its own rule.

Nothing is downloaded: the corpus is drawn from a seeded generator, tokens are integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

#: the steps d_k of the rules (mod M); rule k is token M + 3 + k
STEPS = (1, 2, 3, 5, -1, -2)
IGNORE = -100  # the label of padding positions (Hugging Face's ignore_index)


@dataclass(frozen=True)
class Language:
    """Token layout: numbers 0..M-1, then <pad>, <bos>, <eos>, then one token per rule."""

    numbers: int = 97
    context: int = 32
    min_terms: int = 6

    def __post_init__(self) -> None:
        if self.numbers < 2:
            raise ValueError(f"Language.numbers must be ≥ 2, got {self.numbers}")
        if not 3 + self.min_terms <= self.context:
            raise ValueError(
                f"Language.context ({self.context}) must hold <bos>, a rule token, "
                f"min_terms ({self.min_terms}) numbers and <eos>"
            )

    @property
    def pad(self) -> int:
        return self.numbers

    @property
    def bos(self) -> int:
        return self.numbers + 1

    @property
    def eos(self) -> int:
        return self.numbers + 2

    def rule_token(self, k: int) -> int:
        return self.numbers + 3 + k

    @property
    def vocab_size(self) -> int:
        return self.numbers + 3 + len(STEPS)

    def sample(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """n sentences: (token ids [n, L], attention mask [n, L], rule index [n])."""
        g = torch.Generator().manual_seed(seed)
        rule = torch.randint(0, len(STEPS), (n,), generator=g)
        start = torch.randint(0, self.numbers, (n,), generator=g)
        terms = torch.randint(self.min_terms, self.context - 2, (n,), generator=g)
        ids = torch.full((n, self.context), self.pad, dtype=torch.long)
        mask = torch.zeros((n, self.context), dtype=torch.long)
        steps = torch.tensor(STEPS)[rule]
        for i in range(n):
            m = int(terms[i])
            nums = (start[i] + steps[i] * torch.arange(m)) % self.numbers
            row = [self.bos, self.rule_token(int(rule[i])), *nums.tolist(), self.eos]
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids, mask, rule

    def decode(self, ids: torch.Tensor) -> str:
        """A sentence as text, e.g. ``<bos> <+3> 7 10 13 <eos>`` (padding left out)."""
        words = []
        for t in ids.tolist():
            if t == self.pad:
                continue
            if t < self.numbers:
                words.append(str(t))
            elif t == self.bos:
                words.append("<bos>")
            elif t == self.eos:
                words.append("<eos>")
            else:
                words.append(f"<{STEPS[t - self.numbers - 3]:+d}>")
        return " ".join(words)


def labels_of(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The Trainer's labels: the tokens themselves, IGNORE at padding (the model shifts)."""
    return ids.masked_fill(mask == 0, IGNORE)


class Sentences(Dataset):
    """The dataset the Trainer reads: {"input_ids", "attention_mask", "labels"} per sentence."""

    def __init__(self, language: Language, n: int, seed: int) -> None:
        self.language = language
        self.ids, self.mask, self.rule = language.sample(n, seed)
        self.labels = labels_of(self.ids, self.mask)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": self.mask[i],
            "labels": self.labels[i],
        }


def sequence_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The explained target: mean next-token cross-entropy of each sentence [n].

    logits [n, L, V] (the lm_head output), labels [n, L] with IGNORE at padding; position t
    predicts token t+1, as in the model's own loss (mean over the sentence's own tokens)."""
    lo, y = logits[:, :-1], labels[:, 1:]
    keep = y != IGNORE
    picked = lo.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    ce = (torch.logsumexp(lo, dim=-1) - picked) * keep
    return ce.sum(1) / keep.sum(1).clamp_min(1)
