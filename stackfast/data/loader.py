"""The training loader: deterministic, rank-aware batches of token windows.

A step's global batch is a pure function of (seed, step): resuming at a step reproduces
the data exactly, and with W processes each rank takes its share of the same global batch,
so the global batch does not depend on the number of processes or the micro-batch size.
Two samplings (data.sampling):
- "epoch" (new runs): row k = step * global_batch + i of the run reads the window that
  stackfast/data/sampling.py assigns it: every window of a source once per epoch, in an
  order of its own each epoch; a mixture (data.sources) divides the rows among its sources
  by their weights exactly (within one row over every prefix of the run).
- "random" (runs made before): every row's window drawn uniformly, with replacement, from
  a generator seeded with (seed, step); a mixture draws each row's source by the weights
  first (TokenLoader.picks).
With document_mask, every batch also holds each token's document id (sampling.document_ids).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from stackfast.data.sampling import Blend, document_ids, epoch_windows, windows_per_shard
from stackfast.data.shards import Shard, TokenData
from stackfast.data.sources import Source
from stackfast.errors import DataError

SAMPLINGS = ("epoch", "random")


class TokenLoader:
    """Deterministic, rank-aware batches of (inputs, targets), each (micro_batch, seq_len) int64,
    and with document_mask a third, each token's document id (document_ids).

    The global batch of a step is `global_batch` windows (seq_len + 1 tokens) that depend
    on (seed, step) alone, by `sampling` ("epoch" or "random", module doc). Process r of
    world_size takes the r-th contiguous share of them, in micro-batches of `micro_batch`
    rows (0: the whole share at once). The global batch, and so the run, is the same at any
    number of processes and any micro-batch size.

    `data` is one dataset, or the sources of a mixture (open_sources), which must share a
    vocabulary.
    """

    def __init__(self, data: TokenData | list[Source], seq_len: int, global_batch: int, micro_batch: int = 0, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1, sampling: str = "epoch",
                 document_mask: bool = False):
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling: expected one of {SAMPLINGS}, got {sampling!r}")
        self.sources = data if isinstance(data, list) else [Source(data.folder.name, data, 1.0)]
        self.data = self.sources[0].data  # the dataset (a mixture's first: all share its vocabulary)
        self.seq_len, self.global_batch = seq_len, global_batch
        self.seed, self.rank, self.world_size, self.sampling = seed, rank, world_size, sampling
        self.share = global_batch // world_size  # rows of each process per step
        self.micro_batch = micro_batch or self.share
        window = seq_len + 1
        # The sources' shards in one list, and their held-out windows in another, source after
        # source: source i owns the shards [shard_first[i], shard_first[i + 1]), the random
        # sampling's window starts [first[i], first[i] + counts[i]) and the held-out windows
        # val_rows[val_first[i]:val_first[i + 1]].
        self.shards, counts, self.val_rows, val_first, shard_first = [], [], [], [0], [0]
        self.epoch_starts = []  # per source: the first epoch window of each of its shards, and their total
        for source in self.sources:
            shards = [s for s in source.data.train if s.tokens.size >= window]
            if not shards:
                raise DataError(f"{source.data.folder}: no training shard holds {window} tokens "
                                f"(data.seq_len {seq_len} + 1)")
            self.shards += shards
            shard_first.append(len(self.shards))
            counts.append(sum(s.tokens.size - window + 1 for s in shards))
            self.epoch_starts.append(np.cumsum([0, *windows_per_shard([s.tokens.size for s in shards], seq_len)]))
            # (shard, offset) of every held-out window, consecutive and non-overlapping: fixed for
            # the loader's life, listed once for the check and every evaluation.
            self.val_rows += [(s, o) for s in source.data.val for o in range(0, s.tokens.size - window + 1, window)]
            val_first.append(len(self.val_rows))
        # Number of valid window starts per shard; a global start index maps into them.
        self.starts = np.cumsum([0] + [s.tokens.size - window + 1 for s in self.shards])
        self.counts = np.array(counts, dtype=np.int64)
        self.first = np.cumsum([0] + counts[:-1])
        self.val_first, self.shard_first = val_first, shard_first
        self.windows = np.array([starts[-1] for starts in self.epoch_starts], dtype=np.int64)  # epoch windows
        # A row's source: the first whose cumulative weight exceeds a uniform draw in [0, 1)
        # (the last bound left out, so that rounding never sends a draw past the last source).
        self.bounds = np.cumsum([s.weight for s in self.sources])[:-1]
        self.blend, self._placed = None, (None, [])  # _placed: the last step's windows (_place)
        if sampling == "epoch":
            try:
                self.blend = Blend([s.weight for s in self.sources])
            except ValueError as error:
                raise DataError(f"data.sources: {error}; give that source a larger weight") from None
        self.eos_id = None
        if document_mask:
            self.eos_id = self.data.index["tokenizer"].get("eos_id")
            if self.eos_id is None:  # every row would be one document: the mask would do nothing
                raise DataError(f"data.document_mask: {self.data.folder} was tokenized with "
                                f"{self.data.index['tokenizer']['spec']}, which has no end-of-text token to "
                                f"split documents at; set data.document_mask = false")

    def picks(self, key: list[int], n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """sampling "random": the n_rows windows drawn by the generator `key` (a step's: [seed,
        step, 0]): each row's source, and its window as a global start index. A function of the
        key alone, the same on every process: each process computes all of a step's picks and
        takes its share."""
        rng = np.random.default_rng(key)
        if len(self.sources) == 1:  # no draw of sources: the windows of the loader before mixtures, bit for bit
            return np.zeros(n_rows, dtype=np.int64), rng.integers(0, self.starts[-1], size=n_rows)
        which = np.searchsorted(self.bounds, rng.random(n_rows), side="right")  # every row's source first
        return which, self.first[which] + rng.integers(0, self.counts[which])  # then a window within it

    def rows(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """sampling "epoch": rows [first, first + count) of the run (row k = step * global_batch
        + i): each one's source, and the window it reads there (in [0, windows[source]))."""
        which, j = self.blend.rows(first, count)
        windows = np.empty(count, dtype=np.int64)
        for i in np.unique(which):
            mine = which == i
            windows[mine] = epoch_windows(j[mine], int(self.windows[i]), self.seed, int(i))
        return which, windows

    def _read(self, places: list[tuple[Shard, int]]) -> tuple[torch.Tensor, ...]:
        """(inputs, targets[, document ids]) of the windows that begin at (shard, token offset)."""
        windows = np.stack([np.asarray(shard.tokens[o:o + self.seq_len + 1], dtype=np.int64) for shard, o in places])
        top = windows.max(axis=1)
        if top.max() >= self.data.vocab_size:
            raise DataError(f"{places[int(top.argmax())][0].path}: token id {int(top.max())} >= vocab size "
                            f"{self.data.vocab_size}")
        tensors = torch.from_numpy(windows)  # (rows, seq_len + 1)
        batch = (tensors[:, :-1], tensors[:, 1:])
        if self.eos_id is None:
            return batch
        return batch + (torch.from_numpy(document_ids(windows[:, :-1], self.eos_id)),)

    def _random_rows(self, key: list[int], n_rows: int, first: int, count: int) -> tuple[torch.Tensor, ...]:
        """Rows [first, first + count) of the n_rows windows drawn by the generator `key`."""
        starts = self.picks(key, n_rows)[1][first:first + count]
        shards = np.searchsorted(self.starts, starts, side="right") - 1
        offsets = starts - self.starts[shards]
        return self._read([(self.shards[i], o) for i, o in zip(shards.tolist(), offsets.tolist())])

    def batch(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, ...]:
        """This process's micro-batch `micro_step` of the global batch of `step`."""
        first = self.rank * self.share + micro_step * self.micro_batch
        if self.sampling == "random":
            return self._random_rows([self.seed, step, 0], self.global_batch, first, self.micro_batch)
        if self._placed[0] != step:  # the whole step at once: its micro-batches come one after another
            self._placed = (step, self._place(step))
        return self._read(self._placed[1][first:first + self.micro_batch])

    def _place(self, step: int) -> list[tuple[Shard, int]]:
        """sampling "epoch": (shard, token offset) of every window of the global batch of `step`."""
        which, windows = self.rows(step * self.global_batch, self.global_batch)
        shards, offsets = np.empty_like(windows), np.empty_like(windows)
        for i in np.unique(which):  # a source's window -> its shard and the window's first token there
            mine = which == i
            starts = self.epoch_starts[i]
            shard = np.searchsorted(starts, windows[mine], side="right") - 1
            shards[mine] = self.shard_first[i] + shard
            offsets[mine] = (windows[mine] - starts[shard]) * self.seq_len
        return [(self.shards[i], o) for i, o in zip(shards.tolist(), offsets.tolist())]

    def extra_batch(self, step: int, k: int) -> tuple[torch.Tensor, ...]:
        """A micro-batch beyond the training stream of `step` (k = 0, 1, ...), for work that
        needs fresh data at a step without taking the run's own (LiGO's expansion training):
        drawn at random (sampling "random"'s draw, keyed apart from the steps'), whatever the
        sampling, so that the run's epochs stay whole."""
        n = self.micro_batch * self.world_size
        return self._random_rows([self.seed, step, 1 + k], n, self.rank * self.micro_batch, self.micro_batch)

    def epochs(self, tokens: int) -> dict[str, float]:
        """How many times over each source has been read after `tokens` training tokens. "epoch":
        its coverage, counted: windows read / its windows (1.5: one epoch and half the next).
        "random": the expected value, tokens * weight / the source's train tokens."""
        if self.sampling == "random":
            return {s.name: tokens * s.weight / s.data.train_tokens for s in self.sources}
        read = self.blend.counts(tokens // self.seq_len)
        return {s.name: float(read[i] / self.windows[i]) for i, s in enumerate(self.sources)}

    def epochs_begun(self, step: int) -> list[tuple[str, int]]:
        """The epochs after the first that begin within the global batch of `step`, as (source
        name, epoch number from 1), for the log: the run has read all of that source once more
        and goes on in a new order. None under "random"."""
        if self.sampling == "random":
            return []
        before, after = self.blend.counts(step * self.global_batch), self.blend.counts((step + 1) * self.global_batch)
        begun = []
        for i, source in enumerate(self.sources):
            n = int(self.windows[i])
            # epoch e (from 0) begins at the source's row e * n
            begun += [(source.name, e + 1) for e in range(max(1, -(-int(before[i]) // n)), -(-int(after[i]) // n))]
        return begun

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

    def val_batches(self, n_rows: int, source: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
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
            yield self._read(mine[i:i + self.micro_batch])
