"""Training batches prepared ahead on a background thread."""
from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator

import torch

from stackfast.data.loader import TokenLoader


class Prefetcher:
    """Prepares the training batches of a fixed sequence of (step, micro_step) keys on a
    background thread, `depth` ahead, in pinned memory when they go to a GPU, so the
    accelerator never waits on the loader (the copy to the device is then asynchronous).
    Batches are the loader's own: prefetching changes timing, never data."""

    def __init__(self, loader: TokenLoader, keys: Iterable[tuple[int, int]], *, pin_memory: bool = False,
                 depth: int = 4):
        self.loader, self.pin_memory = loader, pin_memory
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._work, args=(iter(keys),), daemon=True)
        self.thread.start()

    def _work(self, keys: Iterator[tuple[int, int]]) -> None:
        for key in keys:
            try:
                item = self.loader.batch(*key)  # (inputs, targets[, document ids])
                if self.pin_memory:
                    item = tuple(t.pin_memory() for t in item)
            except Exception as error:  # handed to the training thread, which raises it
                item = error
            while not self.stopped.is_set():
                try:
                    self.queue.put((key, item), timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self.stopped.is_set() or isinstance(item, Exception):
                return

    def batch(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, ...]:
        """The batch of (step, micro_step); keys must be asked for in the order given."""
        key, item = self.queue.get()
        if isinstance(item, Exception):
            raise item
        if key != (step, micro_step):
            raise RuntimeError(f"prefetcher out of order: asked for {(step, micro_step)}, next is {key}")
        return item

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
