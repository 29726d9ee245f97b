"""Which window each training row reads (data.sampling = "epoch"): pure numpy, no torch.

The rows of a run are numbered globally, row k = step * global_batch + i, whatever the
number of processes and the micro-batch size. Three pure functions of that number place a
row in the data, so a resume at any step is exact and nothing is stored beyond the shard
list:
- the blend (Blend): row k goes to the source with the largest share·(k+1) − rows so far
  (Megatron's blending rule), which keeps every source within one row of its share of the
  rows over every prefix of the run;
- the epoch: a source's j-th row reads its epoch j // n, position j % n of its n windows;
- the order: position p of epoch e is window permutation(seed, source, e)(p), a keyed
  Feistel network (O(1) memory and work per row, at any number of windows).
Windows are consecutive and overlap by one token (window j of a shard starts at j·seq_len
and holds seq_len + 1 tokens), so an epoch makes every token a target exactly once (the
last (tokens − 1) mod seq_len of a shard excepted).
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

ROUNDS = 6  # Feistel rounds: 4 already make a pseudo-random permutation (Luby-Rackoff); 6 for margin
# The blend repeats after at most this many rows: shares are multiples of 1 / period, exact for
# weights that are fractions of a denominator up to it; its order is built once, in ~0.3 s at most.
MAX_PERIOD = 1 << 16


def windows_per_shard(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """The number of epoch windows of each shard of `tokens` tokens: (tokens − 1) // seq_len."""
    return np.maximum(np.asarray(tokens, dtype=np.int64) - 1, 0) // seq_len


def epoch_keys(seed: int, source: int, epoch: int) -> np.ndarray:
    """The round keys of a source's order in an epoch: a hash of (seed, source, epoch), so that
    no two (seed, epoch) pairs share an order (seed + epoch would)."""
    return np.random.SeedSequence([seed, source, epoch]).generate_state(ROUNDS, np.uint64)


def _round(half: np.ndarray, key: np.uint64) -> np.ndarray:
    """The Feistel round function: a splitmix64-style mix of one half and the round key."""
    z = (half + key) * np.uint64(0x9E3779B97F4A7C15)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def permute(positions: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """The images of `positions` (ints in [0, n)) under the permutation of [0, n) keyed by
    `keys`: a balanced Feistel network on [0, 4**h), the smallest such domain holding n
    (at most 4n), walked until it lands below n (cycle walking: a permutation of [0, n),
    about 4 rounds of the network per element at worst on average)."""
    h = 1
    while 4 ** h < n:
        h += 1
    shift, mask = np.uint64(h), np.uint64((1 << h) - 1)

    def network(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for key in keys:
            left, right = right, left ^ (_round(right, key) & mask)
        return (left << shift) | right

    out = network(np.asarray(positions, dtype=np.uint64))
    outside = np.flatnonzero(out >= np.uint64(n))
    while outside.size:
        out[outside] = network(out[outside])
        outside = outside[out[outside] >= np.uint64(n)]
    return out.astype(np.int64)


def shares_of(weights: list[float]) -> tuple[np.ndarray, int]:
    """The weights as whole shares of a period: (shares, period) with shares summing to the
    period. Weights that are fractions of a common denominator up to MAX_PERIOD (0.7/0.3,
    thirds, 0.61/0.27/0.12...) are taken exactly; others are rounded to multiples of
    1 / MAX_PERIOD (largest remainders). A share that rounds to 0 is refused (ValueError)."""
    weights = [w / math.fsum(weights) for w in weights]  # summing to 1 (normalised ones do, to rounding)
    fractions = [Fraction(w).limit_denominator(MAX_PERIOD) for w in weights]
    period = math.lcm(*(f.denominator for f in fractions))
    shares = [f.numerator * (period // f.denominator) for f in fractions] if period <= MAX_PERIOD else []
    if not (shares and sum(shares) == period and all(abs(s / period - w) < 1e-12 for s, w in zip(shares, weights))):
        period = MAX_PERIOD
        exact = [w * period for w in weights]
        shares = [math.floor(x) for x in exact]
        for i in sorted(range(len(weights)), key=lambda i: math.floor(exact[i]) - exact[i])[:period - sum(shares)]:
            shares[i] += 1
    if min(shares) == 0:
        raise ValueError(f"a share of {min(weights):.3g} is below the blend's resolution 1/{MAX_PERIOD}")
    return np.array(shares, dtype=np.int64), period


class Blend:
    """Which source each row of the run reads, by Megatron's blending rule in exact integers:
    row k goes to the source i with the largest shares[i]·(k+1) − period·rows_i (the first on
    a tie). Every source then stays within one row of its share over every prefix of the
    run (tests/test_sampling.py checks it), and after a period every source has had exactly
    its share: the order repeats, so the rows of any step, and the rows each source has had
    before it (a resume at any step), come at once from one period's order (at most
    MAX_PERIOD rows)."""

    def __init__(self, weights: list[float]):
        self.shares, self.period = shares_of(weights)
        shares, period = [int(s) for s in self.shares], self.period
        order = [0] * period
        value = list(shares)  # shares[i]·(k+1) − period·rows_i at row k = 0
        for k in range(period):
            i = value.index(max(value))  # the first of the largest
            order[k] = i
            value[i] -= period
            value = [v + s for v, s in zip(value, shares)]
        self.order = np.array(order, dtype=np.int64)

    def counts(self, rows: int) -> np.ndarray:
        """How many of the run's first `rows` rows each source has had."""
        full, rest = divmod(rows, self.period)
        return full * self.shares + np.bincount(self.order[:rest], minlength=len(self.shares))

    def rows(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows [first, first + count) of the run: each one's source, and its number among that
        source's rows (its j: the source's j-th row)."""
        which = self.order[np.arange(first, first + count) % self.period]
        before = self.counts(first)
        j = np.empty(count, dtype=np.int64)
        for i in np.unique(which):
            mine = which == i
            j[mine] = before[i] + np.arange(int(mine.sum()))
        return which, j


def epoch_windows(j: np.ndarray, n: int, seed: int, source: int) -> np.ndarray:
    """The windows (in [0, n)) a source's rows number j read: epoch j // n, position j % n
    of that epoch's order."""
    epochs, positions = np.divmod(np.asarray(j, dtype=np.int64), n)
    out = np.empty_like(positions)
    for e in np.unique(epochs):  # a step's rows span one epoch, or two at an epoch's end
        here = epochs == e
        out[here] = permute(positions[here], n, epoch_keys(seed, source, int(e)))
    return out


def document_ids(rows: np.ndarray, eos_id: int) -> np.ndarray:
    """Each token's document within its row: 0 for the first, one more after each EOS token
    (the EOS belongs to the document it ends). Non-decreasing along a row; a row without EOS
    is one document."""
    ends = rows == eos_id
    ids = np.zeros(rows.shape, dtype=np.int64)
    np.cumsum(ends[:, :-1], axis=1, out=ids[:, 1:])
    return ids


def attended_share(ids: np.ndarray) -> float:
    """The share of causal attention's (query, key) pairs that the document mask keeps, for
    rows of document ids (rows, seq) as document_ids gives them: a document of L tokens keeps
    L (L + 1) / 2 pairs of the row's S (S + 1) / 2. The FLOP count (and so MFU) counts every
    causal pair; this says how much of it the masked kernels really compute."""
    rows, seq = ids.shape
    # one bin per (row, document): ids start at 0 in every row and never skip one
    lengths = np.bincount((ids + seq * np.arange(rows)[:, None]).ravel())
    return float((lengths * (lengths + 1)).sum() / (rows * seq * (seq + 1)))
