"""The training loader: deterministic, rank-aware batches of token windows.

The loader draws seq_len+1 windows at positions that are a pure function of
(seed, step): resuming at a step reproduces the data exactly, and with W processes each
rank takes its share of the same global batch, so the global batch does not depend on
the number of processes or the micro-batch size. A mixture of datasets (data.sources)
draws each row's source by the weights first, from the same generator (TokenLoader.picks).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from stackfast.data.shards import Shard, TokenData
from stackfast.data.sources import Source
from stackfast.errors import DataError


class TokenLoader:
    """Deterministic, rank-aware batches of (inputs, targets), each (micro_batch, seq_len) int64.

    The global batch of a step is `global_batch` windows whose starts come from a generator
    seeded with (seed, step): no state, so resuming at a step is exact. Process r of
    world_size takes the r-th contiguous share of them, in micro-batches of `micro_batch`
    rows (0: the whole share at once). The global batch, and so the run, is the same at any
    number of processes and any micro-batch size.

    `data` is one dataset, or the sources of a mixture (open_sources), which must share a
    vocabulary: then each row's source is drawn by the weights before its window (picks).
    """

    def __init__(self, data: TokenData | list[Source], seq_len: int, global_batch: int, micro_batch: int = 0, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        self.sources = data if isinstance(data, list) else [Source(data.folder.name, data, 1.0)]
        self.data = self.sources[0].data  # the dataset (a mixture's first: all share its vocabulary)
        self.seq_len, self.global_batch = seq_len, global_batch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.share = global_batch // world_size  # rows of each process per step
        self.micro_batch = micro_batch or self.share
        window = seq_len + 1
        # The sources' shards in one list, and their held-out windows in another, source after
        # source: source i owns the global window starts [first[i], first[i] + counts[i]) and the
        # held-out windows val_rows[val_first[i]:val_first[i + 1]].
        self.shards, counts, self.val_rows, val_first = [], [], [], [0]
        for source in self.sources:
            shards = [s for s in source.data.train if s.tokens.size >= window]
            if not shards:
                raise DataError(f"{source.data.folder}: no training shard holds {window} tokens "
                                f"(data.seq_len {seq_len} + 1)")
            self.shards += shards
            counts.append(sum(s.tokens.size - window + 1 for s in shards))
            # (shard, offset) of every held-out window, consecutive and non-overlapping: fixed for
            # the loader's life, listed once for the check and every evaluation.
            self.val_rows += [(s, o) for s in source.data.val for o in range(0, s.tokens.size - window + 1, window)]
            val_first.append(len(self.val_rows))
        # Number of valid window starts per shard; a global start index maps into them.
        self.starts = np.cumsum([0] + [s.tokens.size - window + 1 for s in self.shards])
        self.counts = np.array(counts, dtype=np.int64)
        self.first = np.cumsum([0] + counts[:-1])
        self.val_first = val_first
        # A row's source: the first whose cumulative weight exceeds a uniform draw in [0, 1)
        # (the last bound left out, so that rounding never sends a draw past the last source).
        self.bounds = np.cumsum([s.weight for s in self.sources])[:-1]

    def _window(self, shard: Shard, start: int) -> np.ndarray:
        w = np.asarray(shard.tokens[start:start + self.seq_len + 1], dtype=np.int64)
        if w.max() >= self.data.vocab_size:
            raise DataError(f"{shard.path}: token id {int(w.max())} >= vocab size {self.data.vocab_size}")
        return w

    def picks(self, key: list[int], n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """The n_rows windows drawn by the generator `key` (a step's: [seed, step, 0]): each row's
        source, and its window as a global start index. A function of the key alone, the same
        on every process: each process computes all of a step's picks and takes its share."""
        rng = np.random.default_rng(key)
        if len(self.sources) == 1:  # no draw of sources: the windows of the loader before mixtures, bit for bit
            return np.zeros(n_rows, dtype=np.int64), rng.integers(0, self.starts[-1], size=n_rows)
        which = np.searchsorted(self.bounds, rng.random(n_rows), side="right")  # every row's source first
        return which, self.first[which] + rng.integers(0, self.counts[which])  # then a window within it

    def _rows(self, key: list[int], n_rows: int, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [first, first + count) of the n_rows windows drawn by the generator `key`."""
        picks = self.picks(key, n_rows)[1][first:first + count]
        rows = []
        for g in picks:
            i = int(np.searchsorted(self.starts, g, side="right")) - 1
            rows.append(self._window(self.shards[i], int(g - self.starts[i])))
        windows = torch.from_numpy(np.stack(rows))  # (rows, seq_len + 1)
        return windows[:, :-1], windows[:, 1:]

    def batch(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's micro-batch `micro_step` of the global batch of `step`."""
        first = self.rank * self.share + micro_step * self.micro_batch
        return self._rows([self.seed, step, 0], self.global_batch, first, self.micro_batch)

    def extra_batch(self, step: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A micro-batch beyond the training stream of `step` (k = 0, 1, ...), for work that
        needs fresh data at a step without taking the run's own (LiGO's expansion training)."""
        n = self.micro_batch * self.world_size
        return self._rows([self.seed, step, 1 + k], n, self.rank * self.micro_batch, self.micro_batch)

    def epochs(self, tokens: int) -> dict[str, float]:
        """How many times over each source has been read after `tokens` training tokens: the
        expected value, tokens * weight / the source's train tokens (not counted from the picks)."""
        return {s.name: tokens * s.weight / s.data.train_tokens for s in self.sources}

    def check_validation(self) -> None:
        """Raise DataError unless every source's validation split gives every process at least
        one window: to be called before training, not found at the first evaluation."""
        window = self.seq_len + 1
        for i, source in enumerate(self.sources):
            n_rows = self.val_first[i + 1] - self.val_first[i]
            if n_rows < self.world_size:
                tokens = sum(s.tokens.size for s in source.data.val)
                raise DataError(f"{source.data.folder}: validation split has {tokens} tokens, {n_rows} windows of "
                                f"{window} (seq_len {self.seq_len} + 1); {self.world_size} needed"
                                + (f" for {self.world_size} processes" if self.world_size > 1 else "")
                                + ": a shorter seq_len, or tokenize with a larger val_fraction")

    def val_batches(self, n_rows: int, source: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This process's micro-batches of the first n_rows held-out windows of a source (the
        whole split if it has fewer), cut to a multiple of the number of processes so that every
        process runs the same number of forwards (sharded forwards never wait on a rank that
        stopped)."""
        self.check_validation()
        held_out = self.val_rows[self.val_first[source]:self.val_first[source + 1]]
        rows = held_out[:min(n_rows, len(held_out) - len(held_out) % self.world_size)]
        share = len(rows) // self.world_size
        mine = rows[self.rank * share:(self.rank + 1) * share]
        for i in range(0, share, self.micro_batch):
            windows = torch.from_numpy(np.stack([self._window(s, o) for s, o in mine[i:i + self.micro_batch]]))
            yield windows[:, :-1], windows[:, 1:]
