"""Token sequences for the bundled toy models: random words in which a segment repeats.

Every sequence is ``<bos>``, a random prefix, a segment of random length, a random gap, the same
segment again, then random filler up to the context length. The repeat's offset varies from
sequence to sequence, so a model can only predict the second copy by induction (find the earlier
occurrence of the current token, copy what followed it), not by a fixed positional shortcut.

With ``distinct`` (the default) the words before the copy are all different, so a word seen
before is always the start of the copy: the copy's second token is then as predictable as its
last (with random filler, a word that merely recurs by chance makes every copy start a guess).
The filler after the copy is random and left out of the loss (``scored``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor


@dataclass(frozen=True)
class RepeatSpec:
    """Ranges (inclusive) of the random lengths that make up one training sequence."""

    n_ctx: int = 48
    prefix: tuple[int, int] = (0, 7)
    segment: tuple[int, int] = (4, 20)
    gap: tuple[int, int] = (0, 6)
    # prefix, segment and gap are distinct words, so an earlier occurrence is always the copy's
    distinct: bool = True

    def __post_init__(self) -> None:
        for name in ("prefix", "segment", "gap"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name}={(lo, hi)} must be a range 0 <= lo <= hi")
        if self.segment[0] < 2:
            raise ValueError(f"segment={self.segment}: a repeat needs at least 2 tokens")


@dataclass
class RepeatBatch:
    """Sequences plus where their second copy is, for evaluation."""

    tokens: Int[Tensor, "batch n_ctx"]
    # True at positions whose token is predictable by induction (the 2nd copy, from its 2nd token)
    repeated: Bool[Tensor, "batch n_ctx"]
    # True at positions whose token is trained on and evaluated: through the end of the copy
    scored: Bool[Tensor, "batch n_ctx"]
    # the source position the induction head should attend to from each position (-1 where none):
    # for query position q in the second copy, the token after the earlier occurrence of tokens[q]
    induction_target: Int[Tensor, "batch n_ctx"]
    # the first position of the second copy and its offset from the first copy
    repeat_start: Int[Tensor, " batch"]
    offset: Int[Tensor, " batch"]


def repeated_batch(
    n: int,
    word_ids: Int[Tensor, " n_words"],
    bos_id: int,
    generator: torch.Generator,
    spec: RepeatSpec = RepeatSpec(),
) -> RepeatBatch:
    """``n`` sequences drawn by ``spec``; the second copy is cut where the context ends."""
    words = torch.as_tensor(word_ids)
    longest = spec.prefix[1] + spec.segment[1] + spec.gap[1]
    if spec.distinct and longest > len(words):
        raise ValueError(
            f"distinct prefix+segment+gap need up to {longest} words, but only {len(words)} exist;"
            " shorten the ranges or pass distinct=False"
        )
    draws = torch.randint(0, len(words), (n, spec.n_ctx), generator=generator)
    tokens = words[draws]
    tokens[:, 0] = bos_id
    repeated = torch.zeros(n, spec.n_ctx, dtype=torch.bool)
    scored = torch.zeros(n, spec.n_ctx, dtype=torch.bool)
    target = torch.full((n, spec.n_ctx), -1, dtype=torch.long)
    starts = torch.zeros(n, dtype=torch.long)
    offsets = torch.zeros(n, dtype=torch.long)

    def draw(lo_hi: tuple[int, int]) -> int:
        return int(torch.randint(lo_hi[0], lo_hi[1] + 1, (1,), generator=generator))

    for b in range(n):
        first = 1 + draw(spec.prefix)
        length = draw(spec.segment)
        second = first + length + draw(spec.gap)
        if spec.distinct:
            fresh = torch.randperm(len(words), generator=generator)[: second - 1]
            tokens[b, 1:second] = words[fresh]
        end = min(second + length, spec.n_ctx)
        tokens[b, second:end] = tokens[b, first : first + end - second].clone()
        # from the 2nd token of the copy on, the next token is known; the copy's 1st token is not
        repeated[b, second + 1 : end] = True
        scored[b, 1:end] = True
        q = torch.arange(second, end - 1)
        target[b, q] = q - (second - first) + 1
        starts[b], offsets[b] = second, second - first
    return RepeatBatch(tokens, repeated, scored, target, starts, offsets)
