"""Host-side data for GRPO: the seeded prompt stream and the padded training arrays.

A training sequence is the prompt, left-padded to a bucketed width P, followed by the
completion, right-padded to width T: tokens `[rows, P + T]`. The log-prob of completion
token i comes from the logits at position P + i - 1.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from jaxrast.runtime.shapes import bucket_length


class PromptStream:
    """Rows in a seeded order, re-shuffled every epoch; its position is two ints.

    The order of epoch e depends only on (seed, e), so `state()` / `load_state()` resume
    the stream exactly.
    """

    def __init__(self, num_rows: int, *, seed: int, shuffle: bool = True):
        if num_rows < 1:
            raise ValueError("the training data has no usable rows.")
        self.num_rows, self.seed, self.shuffle = num_rows, seed, shuffle
        self.epoch, self.index = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def take(self, n: int) -> list[int]:
        """The next `n` row indices (wrapping into the next epoch)."""
        out: list[int] = []
        while len(out) < n:
            order = self._order(self.epoch)
            k = min(n - len(out), self.num_rows - self.index)
            out.extend(int(i) for i in order[self.index:self.index + k])
            self.index += k
            if self.index == self.num_rows:
                self.epoch, self.index = self.epoch + 1, 0
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: Mapping[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def usable_prompts(prompt_ids: Sequence[Sequence[int]], max_tokens: int) -> list[int]:
    """Indices of the prompts GRPO trains on; prompts longer than `max_tokens` or empty are
    dropped with a warning."""
    kept = [i for i, ids in enumerate(prompt_ids) if 0 < len(ids) <= max_tokens]
    dropped = len(prompt_ids) - len(kept)
    if dropped:
        warnings.warn(f"dropped {dropped} of {len(prompt_ids)} prompts that are empty or longer than "
                      f"data.max_prompt_tokens={max_tokens}.", stacklevel=2)
    return kept


@dataclass
class RolloutArrays:
    """One rollout batch as padded numpy arrays (rows = prompts × G, prompt-major)."""

    tokens: np.ndarray  # [rows, P + T] int32
    mask: np.ndarray  # [rows, P + T] bool: real tokens
    completion_mask: np.ndarray  # [rows, T] float32: real completion tokens
    sampler_logp: np.ndarray  # [rows, T] float32: the decoder's log-probs (τ = 1)
    sampler_entropy: np.ndarray  # [rows, T] float32: the decoder's policy entropies (zeros if not recorded)
    prompt_width: int  # P

    @property
    def completion_width(self) -> int:
        return self.completion_mask.shape[1]


def build_rollout(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                  sampler_logp: Sequence[Sequence[float]], *, pad_id: int, max_new_tokens: int,
                  sampler_entropy: Sequence[Sequence[float]] | None = None) -> RolloutArrays:
    """Pads prompt/completion pairs (and the sampler's per-token log-probs and entropies,
    where it recorded them). Widths are bucketed (powers of two, at least 16, T at most
    max_new_tokens) so the train step compiles a handful of times, not every step."""
    rows = len(prompt_ids)
    width_p = bucket_length(max(len(p) for p in prompt_ids))
    width_t = min(max_new_tokens, bucket_length(max(max(len(c) for c in completion_ids), 1)))
    tokens = np.full((rows, width_p + width_t), pad_id, np.int32)
    mask = np.zeros((rows, width_p + width_t), bool)
    logp, entropy = np.zeros((rows, width_t), np.float32), np.zeros((rows, width_t), np.float32)
    for r, (p, c, lp) in enumerate(zip(prompt_ids, completion_ids, sampler_logp)):
        tokens[r, width_p - len(p):width_p] = p
        tokens[r, width_p:width_p + len(c)] = c
        mask[r, width_p - len(p):width_p + len(c)] = True
        logp[r, :len(lp)] = lp
        if sampler_entropy is not None:
            entropy[r, :len(sampler_entropy[r])] = sampler_entropy[r]
    return RolloutArrays(tokens=tokens, mask=mask, completion_mask=mask[:, width_p:].astype(np.float32),
                         sampler_logp=logp, sampler_entropy=entropy, prompt_width=width_p)


def split_micro(x: np.ndarray, micro_batch_size: int) -> np.ndarray:
    """[rows, ...] -> [rows // micro_batch_size, micro_batch_size, ...]."""
    return x.reshape(x.shape[0] // micro_batch_size, micro_batch_size, *x.shape[1:])


def pack_zero_advantage(advantages: np.ndarray, micro_batch_size: int, *, enabled: bool = True
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Row order that puts rows with a nonzero advantage first (stable), and which
    micro-batches then hold any such row: the others need no backward.

    advantages: [rows]. Returns (order [rows], indices into `advantages`; active
    [rows // micro_batch_size] bool). Disabled: the identity order, all active.
    """
    rows = len(advantages)
    if not enabled:
        return np.arange(rows), np.ones(rows // micro_batch_size, bool)
    order = np.argsort(np.asarray(advantages) == 0, kind="stable")
    active = (np.asarray(advantages)[order] != 0).reshape(-1, micro_batch_size).any(axis=1)
    return order, active


def rows_for(rows: Sequence[Mapping[str, Any]], indices: Sequence[int], group_size: int) -> list[Mapping[str, Any]]:
    """Each selected row repeated for its G completions (prompt-major)."""
    return [rows[i] for i in indices for _ in range(group_size)]
