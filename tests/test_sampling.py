"""data.sampling = "epoch": every window once per epoch in a new order each epoch, exact
mixture shares over every prefix, exact resume at any step and world size, document ids.

The loader tests read a corpus whose token ids are their positions (uint32), so a row
names the window it came from."""
import json
import time

import numpy as np
import pytest
import torch

from stackfast.checkpoint import load_config_of
from stackfast.config import Config, ConfigError, DataSource, dumps_toml, load_config
from stackfast.data import DataError, Prefetcher, Source, TokenData, TokenLoader
from stackfast.data.sampling import MAX_PERIOD, Blend, document_ids, epoch_keys, epoch_windows, permute, shares_of
from stackfast.data.shards import FORMAT
from stackfast.runs import check_resume, run_sampling


def positions_dataset(folder, shard_tokens: list[int], offset: int = 0, eos_id=None) -> TokenData:
    """A dataset whose train tokens are their positions (from `offset`), in shards of the sizes
    given, and a held-out shard of 200 tokens."""
    folder.mkdir(parents=True)
    entries, start = [], offset
    for k, n in enumerate(shard_tokens):
        np.arange(start, start + n, dtype=np.uint32).tofile(folder / f"train_{k:05d}.bin")
        entries.append({"file": f"train_{k:05d}.bin", "tokens": n})
        start += n
    np.zeros(200, dtype=np.uint32).tofile(folder / "val_00000.bin")
    (folder / "index.json").write_text(json.dumps({
        "format": FORMAT, "dtype": "uint32", "vocab_size": 1 << 24, "total_tokens": start - offset + 200,
        "tokenizer": {"spec": "positions", "fingerprint": "positions", "eos_id": eos_id},
        "train": entries, "val": [{"file": "val_00000.bin", "tokens": 200}]}))
    return TokenData(folder)


def step_rows(loader: TokenLoader, step: int) -> torch.Tensor:
    """The global batch of a step, from every rank's micro-batches, as (rows, seq_len + 1) windows."""
    x, y = loader.batch(step)[:2]
    return torch.cat([x, y[:, -1:]], dim=1)


def test_permutations_are_bijections_and_keyed_by_seed_source_and_epoch():
    for n in (1, 2, 3, 4, 5, 16, 17, 1000, 4097):
        assert sorted(permute(np.arange(n), n, epoch_keys(0, 0, 0))) == list(range(n))
    n = 1000
    orders = {key: tuple(permute(np.arange(n), n, epoch_keys(*key))) for key in
              [(1, 0, 2), (2, 0, 1), (1, 1, 2), (1, 0, 3), (3, 0, 0)]}
    assert len(set(orders.values())) == len(orders)  # (seed 1, epoch 2) is not (seed 2, epoch 1): no seed + epoch
    # 10^10 windows: a step's rows at O(1) memory and work each, distinct and in range
    j = np.arange(10**10 - 256, 10**10 + 256, dtype=np.int64)  # across the end of epoch 0
    started = time.perf_counter()
    windows = epoch_windows(j, 10**10, 7, 0)
    assert time.perf_counter() - started < 1.0
    assert ((windows >= 0) & (windows < 10**10)).all() and len(set(windows[:256])) == 256
    assert not np.array_equal(windows[:256], epoch_windows(j[:256] + 10**10, 10**10, 7, 0))  # epoch 2: another


WEIGHT_SETS = [[0.7, 0.3], [1 / 3] * 3, [0.61, 0.27, 0.12], [0.5, 0.2, 0.15, 0.1, 0.05], [0.997, 0.001, 0.002],
               [0.25, 0.25, 0.25, 0.249, 0.001],
               list(np.array([3.14159, 2.71828, 1.41421, 1.73205, 0.5772]) / 9.58333)]  # no small denominator


@pytest.mark.parametrize("weights", WEIGHT_SETS)
def test_every_prefix_holds_each_share_within_one_row(weights):
    blend = Blend(weights)
    rows = 2 * blend.period + 37
    which = blend.order[np.arange(rows) % blend.period]
    # the rule itself, row after row over two periods and more: the blend's repeated order is it
    shares, period, count, rule = blend.shares.tolist(), blend.period, [0] * len(weights), []
    for k in range(rows):
        value = [s * (k + 1) - period * c for s, c in zip(shares, count)]
        rule.append(value.index(max(value)))
        count[rule[-1]] += 1
    assert np.array_equal(which, rule)
    counts = np.cumsum(np.eye(len(weights), dtype=np.int64)[which], axis=0)  # counts[k]: rows 0..k
    k = np.arange(1, rows + 1)[:, None]
    exact = blend.shares / blend.period
    assert np.abs(counts - exact * k).max() < 1  # the rule's bound, over every prefix
    # the shares are the weights: exactly for fractions of small denominators, else to 1 / MAX_PERIOD
    assert np.abs(exact - weights).max() <= (1e-12 if blend.period < MAX_PERIOD else 1 / MAX_PERIOD)
    # counts at any row and a step's rows come at once, equal to the replay
    for first in (0, 1, blend.period - 3, rows - 40):
        assert np.array_equal(blend.counts(first + 1), counts[first])
        sources, j = blend.rows(first, 30)
        assert np.array_equal(sources, which[first:first + 30])
        assert np.array_equal(j, (counts[first:first + 30] - 1)[np.arange(30), sources])


def test_shares_are_exact_fractions_and_tiny_ones_are_refused():
    assert [list(x) for x in [shares_of([0.7, 0.3])[0]]] == [[7, 3]] and shares_of([0.7, 0.3])[1] == 10
    assert shares_of([1 / 3] * 3) == (pytest.approx(np.array([1, 1, 1])), 3)
    with pytest.raises(ValueError, match="below the blend's resolution"):
        shares_of([1 - 1e-6, 1e-6])


def test_a_resume_at_step_a_million_is_immediate():
    weights = list(np.array([3.14159, 2.71828, 1.41421]) / 7.27408)  # the longest period: MAX_PERIOD rows
    started = time.perf_counter()
    blend = Blend(weights)
    step = 10**6
    sources, j = blend.rows(step * 512, 512)
    counts = blend.counts((step + 1) * 512)
    seconds = time.perf_counter() - started
    print(f"resume at step 1e6 (global batch 512, 3 sources, period {blend.period}): {seconds:.2f} s")
    assert seconds < 5
    assert np.abs(counts - np.array(weights) * (step + 1) * 512).max() < 1 + (step + 1) * 512 / MAX_PERIOD
    assert np.array_equal(np.bincount(sources, minlength=3), counts - blend.counts(step * 512))


def test_one_epoch_reads_every_window_once_and_the_next_another_order(tmp_path):
    # shards of 100, 64 and 1000 tokens: (tokens - 1) // 16 = 6 + 3 + 62 windows
    data = positions_dataset(tmp_path / "ds", [100, 64, 1000])
    loader = TokenLoader(data, 16, 71, seed=3)
    assert loader.windows.tolist() == [71]
    epochs = [step_rows(loader, s) for s in (0, 1)]
    for rows in epochs:
        starts = sorted(rows[:, 0].tolist())
        # each window: 17 consecutive positions within one shard, starting at a multiple of 16 in it
        assert starts == [s + 16 * j for s, n in ((0, 100), (100, 64), (164, 1000)) for j in range((n - 1) // 16)]
        assert torch.equal(rows, rows[:, :1] + torch.arange(17))
        # consecutive windows share one token: every token of a window's shard (but the tail) is a target once
        targets = sorted(rows[:, 1:].flatten().tolist())
        assert len(targets) == len(set(targets)) == 71 * 16
    assert not torch.equal(epochs[0][:, 0], epochs[1][:, 0])  # the second epoch in another order
    assert loader.epochs(2 * 71 * 16) == {"ds": 2.0} and loader.epochs(35 * 16) == {"ds": 35 / 71}
    assert loader.epochs_begun(0) == [] and loader.epochs_begun(1) == [("ds", 2)]


def test_batches_resume_exactly_and_do_not_depend_on_world_size_or_micro_batch(tmp_path):
    data = positions_dataset(tmp_path / "ds", [5000])
    one = TokenLoader(data, 16, 8, seed=9)
    run = [step_rows(one, s) for s in range(50)]  # 400 rows: more than an epoch of 312 windows
    assert torch.equal(step_rows(TokenLoader(data, 16, 8, seed=9), 37), run[37])  # a fresh loader mid-run
    for world, micro in ((1, 2), (2, 4), (2, 1), (4, 2), (4, 1)):
        ranks = [TokenLoader(data, 16, 8, micro, seed=9, rank=r, world_size=world) for r in range(world)]
        for step in (0, 38, 39):  # 39 crosses the epoch's end (row 312)
            x = torch.cat([r.batch(step, m)[0] for r in ranks for m in range(8 // world // micro)])
            assert torch.equal(x, run[step][:, :-1]), (world, micro, step)
    assert one.epochs_begun(39) == [("ds", 2)] and one.epochs_begun(38) == []


def test_a_mixture_reads_each_source_by_its_share_and_its_own_epochs(tmp_path):
    # ids of source i lie in [i * 10^6, ...): a row tells its source
    sizes = {"a": [3000], "b": [1000, 577], "c": [400]}
    sources = [Source(name, positions_dataset(tmp_path / name, shards, offset=i * 10**6), w)
               for i, ((name, shards), w) in enumerate(zip(sizes.items(), [0.5, 0.3, 0.2]))]
    loader = TokenLoader(sources, 16, 10, seed=1)
    windows = [int(w) for w in loader.windows]
    assert windows == [187, 62 + 36, 24]
    rows = torch.cat([step_rows(loader, s) for s in range(30)])  # 300 rows
    source = rows[:, 0] // 10**6
    for k in range(1, 301):  # every prefix within one row of its share
        assert (torch.bincount(source[:k], minlength=3).numpy() - np.array([0.5, 0.3, 0.2]) * k).__abs__().max() < 1
    for i, n in enumerate(windows):  # each source's rows: its epochs, every window once in each
        starts = rows[source == i, 0].tolist()
        for e in range(len(starts) // n):
            assert len(set(starts[e * n:(e + 1) * n])) == n
    coverage = loader.epochs(300 * 16)
    assert coverage == {name: float((source == i).sum()) / windows[i] for i, name in enumerate(sizes)}
    assert coverage["c"] == 60 / 24
    with pytest.raises(DataError, match=r"data.sources: a share of 1e-06 is below the blend's resolution"):
        TokenLoader([Source("x", sources[0].data, 1 - 1e-6), Source("y", sources[1].data, 1e-6)], 16, 10)


@pytest.mark.parametrize("row, ids", [
    ([5, 9, 9, 7], [0, 0, 0, 0]),  # no end-of-text: one document
    ([5, 0, 0, 7], [0, 0, 1, 2]),  # a 1-token document (the EOS alone) between two
    ([0, 0, 0, 0], [0, 1, 2, 3]),  # a row of end-of-text tokens only
    ([0, 4, 4, 0], [0, 1, 1, 1]),  # the EOS belongs to the document it ends
])
def test_document_ids_start_a_document_after_each_end_of_text(row, ids):
    assert document_ids(np.array([row]), 0).tolist() == [ids]


def test_the_loader_gives_document_ids_with_document_mask(tmp_path):
    data = positions_dataset(tmp_path / "ds", [3000], eos_id=40)  # the token at position 40 is an "EOS"
    loader = TokenLoader(data, 16, 4, seed=0, document_mask=True)
    x, y, ids = loader.batch(0)
    assert ids.shape == x.shape and ids.dtype == torch.int64
    assert torch.equal(ids, torch.from_numpy(document_ids(x.numpy(), 40)))
    x, y, ids = next(loader.val_batches(4))
    assert ids.shape == x.shape
    prefetcher = Prefetcher(loader, [(0, 0), (1, 0)])  # carries the ids too
    assert all(torch.equal(a, b) for s in (0, 1) for a, b in zip(prefetcher.batch(s, 0), loader.batch(s), strict=True))
    prefetcher.close()
    # the row holding position 40 (window 2: positions 32..48) starts a document after it
    rows = torch.cat([loader.batch(s)[2] for s in range(0, 47)])
    starts = torch.cat([loader.batch(s)[0][:, 0] for s in range(0, 47)])
    assert rows[starts == 32].tolist() == [[0] * 9 + [1] * 7] and rows[starts != 32].max() == 0
    bytes_like = positions_dataset(tmp_path / "bytes", [3000])  # no end-of-text token
    with pytest.raises(DataError, match=r"data.document_mask: .*bytes was tokenized with positions, which has no "
                                        r"end-of-text token"):
        TokenLoader(bytes_like, 16, 4, document_mask=True)


def test_a_new_run_samples_by_epoch_and_a_run_made_before_resumes_as_random(tmp_path):
    new = load_config(None)
    assert new.data.sampling == "auto" and run_sampling(None, new) == "epoch"
    # a checkpoint's config.toml of an earlier version: no data.sampling, data.path beside its sources
    old = Config()
    old.data.sources = [DataSource("data/web", 0.7), DataSource("data/code", 0.3)]
    tree = old.to_dict()
    del tree["data"]["sampling"]
    tree["data"]["path"] = "builtin:python-stdlib"
    (tmp_path / "config.toml").write_text(dumps_toml(tree))
    saved = load_config_of(tmp_path)
    assert saved.data.sampling == "random" and saved.data.mixture() == old.data.mixture()
    with pytest.raises(ConfigError, match="data.sources: set together with data.path"):
        load_config(tmp_path / "config.toml")  # the same file as a user's config: both set is an error
    resumed = load_config(None, ['data.sources=[{path = "data/web", weight = 7}, {path = "data/code", weight = 3}]'])
    assert check_resume(saved, resumed, tmp_path) == [] and run_sampling(saved, resumed) == "random"
    # a run keeps the sampling it started with: changing it is a change of the run
    resumed.data.sampling = "epoch"
    with pytest.raises(ConfigError, match=r"data.sampling: 'random' -> 'epoch'"):
        check_resume(saved, resumed, tmp_path)
    # a new run's config.toml holds its sampling, read back as written
    new.data.sampling = run_sampling(None, new)
    (tmp_path / "config.toml").write_text(new.to_toml())
    assert load_config_of(tmp_path).data.sampling == "epoch"
