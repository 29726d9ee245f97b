"""Weighted mixtures of datasets (data.sources): config, sampling, per-source validation,
epochs, exact resume; and a single source exactly as before mixtures."""
import contextlib
import math
import random

import numpy as np
import pytest
import torch

from stackfast.checkpoint import list_checkpoints, load_model
from stackfast.config import ConfigError, load_config
from stackfast.data import DataError, TokenData, TokenLoader, open_sources, tokenize, train_bpe
from stackfast.metrics import MetricsLog, read_metrics
from stackfast.train import evaluate, run

# Each source writes its own characters only, so a row's tokens tell which source it came from.
ALPHABETS = {"web": "abcdefghijklm", "code": "nopqrstuvwxyz", "math": "0123456789"}
SIZES = {"web": 30_000, "code": 10_000, "math": 8_000}  # characters, one byte token each

# 2 sources x 4 rows of 32 tokens a step: 128 tokens
JOB = ['model.preset="tiny"', "model.kernels=torch", "data.seq_len=32", "train.global_batch_size=4",
       "schedule.warmup_steps=1", "train.eval_batches=1", "train.eval_every=4", "logging.log_every=1",
       "logging.progress=false", "logging.tensorboard=false", "train.max_steps=8"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tokenized folder (bytes, a tenth held out) per source of ALPHABETS."""
    root = tmp_path_factory.mktemp("mixture-data")
    rng = random.Random(0)
    out = {}
    for name, letters in ALPHABETS.items():
        text = root / f"{name}.txt"
        text.write_text("".join(rng.choice(letters) for _ in range(SIZES[name])))
        tokenize([text], "bytes", root / name, val_fraction=0.1)
        out[name] = root / name
    return out


def sources(folders, weights: dict[str, float]) -> str:
    return "data.sources=[" + ", ".join(f'{{path = "{folders[n]}", weight = {w}}}' for n, w in weights.items()) + "]"


def mixture_job(folders, run_dir, *extra, weights=None):
    return load_config(None, JOB + [sources(folders, weights or {"web": 0.7, "code": 0.3}),
                                    f'logging.run_dir="{run_dir}"', *extra])


def source_of(row: torch.Tensor) -> str:
    (name,) = [n for n, letters in ALPHABETS.items() if chr(int(row[0])) in letters]
    assert all(chr(int(t)) in ALPHABETS[name] for t in row)  # a window never straddles two sources
    return name


@pytest.mark.parametrize("extra,message", [
    (["data.sources=[{path = \"a/web\", weight = 0}]"], r"data.sources\[0\].weight: must be positive, got 0.0"),
    (["data.sources=[{path = \"a/web\", weight = -1}]"], r"data.sources\[0\].weight: must be positive"),
    (["data.sources=[{path = \"a/web\"}, {path = \"b/web\"}]"], r"data.sources\[1\].name: 'web' is "
                                                                 r"data.sources\[0\]'s name too"),
    (["data.sources=[{path = \"a/web\", name = \"x\"}, {path = \"b\", name = \"x\"}]"], r"sources\[1\].name: 'x'"),
    (["data.sources=[{path = \"\"}]"], r"data.sources\[0\].path: must not be empty"),
    (["data.sources=[{path = \"/\"}]"], r"data.sources\[0\].name: empty, and the path '/' has no folder name"),
    (["data.sources=[{path = \"a/web\", wieght = 1}]"], r"data.sources\[0\].wieght: unknown key \(did you mean"),
    (["data.sources=[\"a/web\"]"], "data.sources: expected a list of tables"),
    (['data.path="a/web"', "data.sources=[{path = \"b/code\"}]"], r"data.sources: set together with data.path"),
    # set, even to its default value: the docs say both together is an error (issue 30)
    (['data.path="builtin:python-stdlib"', "data.sources=[{path = \"b/code\"}]"],
     r"data.sources: set together with data.path \('builtin:python-stdlib'\)"),
    # weights whose sum overflows, or one that is nothing beside the others (issue 30)
    (["data.sources=[{path = \"a/web\", weight = 1e308}, {path = \"b/code\", weight = 1e308}]"],
     r"data.sources: the weights sum to inf \(too large for a float\)"),
    (["data.sources=[{path = \"a/web\", weight = 1e308}, {path = \"b/code\", weight = 1e-30}]"],
     r"data.sources\[1\].weight: 1e-30 is 0 beside the others' sum 1e\+308"),
    (["data.sources=[{path = \"a/web\", weight = inf}]"], r"data.sources\[0\].weight: must be a finite number"),
    (["data.sources=[{path = \"a/web\", weight = nan}]"], r"data.sources\[0\].weight: must be a finite number"),
    (['data.sampling="shuffle"'], r"data.sampling: expected one of 'auto', 'epoch', 'random', got 'shuffle'"),
    (["model.rope_reset=true"], r"model.rope_reset: restarts positions at each document, which needs "
                                r"data.document_mask = true"),
    (['data.path=""'], "data.path: must not be empty"),
    (["data.max_epochs=0"], "data.max_epochs: must be positive"),
])
def test_bad_mixture_settings_are_one_line_naming_the_key(extra, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(None, extra)
    assert "\n" not in str(error.value)


def test_mixture_config_names_normalises_and_round_trips(tmp_path):
    cfg = load_config(None, ['data.sources=[{path = "d/web/", weight = 7}, {path = "d/x", weight = 3, '
                             'name = "code"}]'])
    assert [(s.name, s.path, s.weight) for s in cfg.data.mixture()] == [("web", "d/web/", 0.7), ("code", "d/x", 0.3)]
    assert [(s.name, s.weight) for s in load_config(None).data.mixture()] == [("python-stdlib", 1.0)]
    (tmp_path / "config.toml").write_text(cfg.to_toml())  # as a run folder's config.toml writes it
    assert load_config(tmp_path / "config.toml").data == cfg.data


def test_sources_of_two_tokenizers_are_refused_before_anything_is_written(folders, tmp_path):
    tok = tmp_path / "tokenizer.json"
    train_bpe(["abcdefghijklm nopqrstuvwxyz"] * 20, 300, tok)
    tokenize([folders["web"].parent / "web.txt"], str(tok), tmp_path / "bpe", val_fraction=0.1)
    folders = {**folders, "bpe": tmp_path / "bpe"}
    cfg = mixture_job(folders, tmp_path / "run", weights={"web": 0.5, "bpe": 0.5})
    with pytest.raises(DataError, match=r"data.sources: bpe \(.*\) was tokenized with tokenizer .*tokenizer.json "
                                        r"\(fingerprint \w+, vocab \d+\), web \(.*\) with tokenizer bytes "
                                        r"\(fingerprint bytes, vocab 256\); the sources of a mixture must share one"
                       ) as error:
        run(cfg)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "config.toml").exists()


def test_random_shares_of_rows_converge_to_the_weights(folders):
    weights = {"web": 0.61, "code": 0.27, "math": 0.12}
    cfg = mixture_job(folders, "unused", weights=weights)
    loader = TokenLoader(open_sources(cfg.data, 256), 32, 8, seed=3, sampling="random")
    steps, counts = 2000, dict.fromkeys(weights, 0)
    for step in range(steps):
        which, starts = loader.picks([3, step, 0], 8)
        # a row's window lies within its own source's windows
        assert ((starts >= loader.first[which]) & (starts < loader.first[which] + loader.counts[which])).all()
        for i in which:
            counts[loader.sources[i].name] += 1
    n = steps * 8
    for name, p in weights.items():
        sigma = math.sqrt(p * (1 - p) / n)  # binomial std of a share of n rows
        assert abs(counts[name] / n - p) < 4 * sigma, (name, counts[name] / n, p, 4 * sigma)
    # The rows themselves come from the picked sources (each source has an alphabet of its own).
    x, y = loader.batch(17)
    picked = [loader.sources[i].name for i in loader.picks([3, 17, 0], 8)[0]]
    assert [source_of(row) for row in torch.cat([x, y[:, -1:]], dim=1)] == picked


def old_batch(data: TokenData, seq_len: int, n_rows: int, key: list[int]) -> torch.Tensor:
    """The loader's rows as it drew them before mixtures (its code then, copied)."""
    window = seq_len + 1
    shards = [s for s in data.train if s.tokens.size >= window]
    starts = np.cumsum([0] + [s.tokens.size - window + 1 for s in shards])
    rows = []
    for g in np.random.default_rng(key).integers(0, starts[-1], size=n_rows):
        i = int(np.searchsorted(starts, g, side="right")) - 1
        rows.append(np.asarray(shards[i].tokens[g - starts[i]:g - starts[i] + window], dtype=np.int64))
    return torch.from_numpy(np.stack(rows))[:, :-1]


def test_random_sampling_gives_the_batches_of_before_bit_for_bit(folders, tmp_path):
    data = TokenData(folders["web"])
    # data.path, and a mixture of that one source (any weight): the same loader
    path = load_config(None, JOB + [f'data.path="{folders["web"]}"']).data
    alone = load_config(None, JOB + [f'data.sources=[{{path = "{folders["web"]}", weight = 0.3}}]']).data
    for loader in (TokenLoader(data, 32, 8, 4, seed=5, sampling="random"),
                   TokenLoader(open_sources(path, 256), 32, 8, 4, seed=5, sampling="random"),
                   TokenLoader(open_sources(alone, 256), 32, 8, 4, seed=5, sampling="random")):
        for step in (0, 1, 99):
            x = torch.cat([loader.batch(step, m)[0] for m in range(2)])
            assert torch.equal(x, old_batch(data, 32, 8, [5, step, 0]))
        assert torch.equal(loader.extra_batch(7, 1)[0], old_batch(data, 32, 4, [5, 7, 2]))
        assert len(loader.val_rows) == loader.val_first[1] == 3000 // 33


def test_random_picks_do_not_depend_on_the_number_of_processes(folders):
    cfg = mixture_job(folders, "unused", weights={"web": 0.5, "code": 0.3, "math": 0.2})
    mixture = open_sources(cfg.data, 256)
    one = TokenLoader(mixture, 32, 8, seed=11, sampling="random")
    ranks = [TokenLoader(mixture, 32, 8, 2, seed=11, rank=r, world_size=2, sampling="random") for r in range(2)]
    for step in (0, 5, 1234):
        key = [11, step, 0]
        picks = [one.picks(key, 8)] + [r.picks(key, 8) for r in ranks]
        assert all(np.array_equal(p[0], picks[0][0]) and np.array_equal(p[1], picks[0][1]) for p in picks)
        shares = torch.cat([r.batch(step, m)[0] for r in ranks for m in range(2)])
        assert torch.equal(shares, one.batch(step)[0])
    # LiGO's extra batches draw from the mixture too, fresh rows of the step
    extra = [r.extra_batch(5, 0)[0] for r in ranks]
    assert all(e.shape == (2, 32) for e in extra) and not torch.equal(torch.cat(extra), one.batch(5)[0][:4])
    assert {source_of(row) for k in range(20) for row in one.extra_batch(k, 0)[0]} == set(ALPHABETS)


def test_each_source_is_validated_on_its_own_held_out_windows(folders):
    cfg = mixture_job(folders, "unused")
    loader = TokenLoader(open_sources(cfg.data, 256), 32, 4)
    for i, name in enumerate(["web", "code"]):
        rows = torch.cat([x for x, _ in loader.val_batches(10, source=i)])
        held_out = np.concatenate([s.tokens for s in loader.sources[i].data.val]).astype(np.int64)
        assert rows.shape == (10, 32) and torch.equal(rows[1], torch.from_numpy(held_out[33:65]))
        assert {source_of(row) for row in rows} == {name}
    # code holds 1000 held-out tokens: 1 window of 501, not one for each of 2 processes (web has 5)
    with pytest.raises(DataError, match=r"code: validation split has 1000 tokens, 1 windows of 501 .* 2 needed"):
        TokenLoader(loader.sources, 500, 4, world_size=2).check_validation()


@pytest.fixture(scope="module")
def mixture_run(folders, tmp_path_factory):
    """8 steps on web 0.7 / code 0.3, validated every 4 steps, a checkpoint every 4 steps."""
    run_dir = tmp_path_factory.mktemp("mixture-run")
    run(mixture_job(folders, run_dir, "checkpoint.every_steps=4", "checkpoint.keep_last=5"))
    return run_dir


def test_a_mixture_run_logs_each_sources_validation_loss_and_epochs(folders, mixture_run):
    val = [r for r in read_metrics(mixture_run) if "val_loss" in r]
    assert [r["step"] for r in val] == [4, 8]
    for row in val:
        assert set(row) == {"step", "tokens", "flops", "val_loss", "val_loss/web", "val_loss/code", "epochs/web",
                            "epochs/code"}
        # the mixed loss: the sources' losses averaged with their weights
        assert row["val_loss"] == pytest.approx(0.7 * row["val_loss/web"] + 0.3 * row["val_loss/code"], rel=1e-12)
        # epochs: the coverage read, windows read / windows (27,000 web train tokens: 843 windows of 32 + 1,
        # 9,000 code: 281), each source's rows within one of its share
        rows = row["tokens"] // 32
        for name, weight, windows in (("web", 0.7, 843), ("code", 0.3, 281)):
            read = row[f"epochs/{name}"] * windows
            assert read == pytest.approx(round(read), abs=1e-9) and abs(read - weight * rows) < 1


def test_each_sources_validation_loss_is_that_sources_own(folders, mixture_run):
    """val_loss/NAME equals the loss of the trained model on that source alone (its held-out
    windows evaluated directly), for sources whose losses differ: a mix-up of the sources
    fails here, not only a wrong average."""
    model = load_model(mixture_run / "checkpoints" / "step_00000008")
    (row,) = [r for r in read_metrics(mixture_run) if "val_loss" in r and r["step"] == 8]
    own = {name: evaluate(model, TokenLoader(TokenData(folders[name]), 32, 4), 4, torch.device("cpu"),
                          contextlib.nullcontext) for name in ("web", "code")}
    assert abs(own["web"] - own["code"]) > 0.05  # far apart: a swap cannot pass the check below
    for name in own:
        assert row[f"val_loss/{name}"] == pytest.approx(own[name], rel=1e-6)


def test_a_single_source_run_logs_validation_as_before(folders, tmp_path):
    run(load_config(None, JOB + [f'data.path="{folders["code"]}"', f'logging.run_dir="{tmp_path}"',
                                 "train.max_steps=4"]))
    assert [set(r) for r in read_metrics(tmp_path) if "val_loss" in r] == [{"step", "tokens", "flops", "val_loss"}]


def test_tensorboard_gets_the_per_source_keys(tmp_path):
    tags = []

    class Writer:  # stands in for tensorboard's SummaryWriter (not installed here)
        def add_scalar(self, tag, value, step):
            tags.append((tag, value, step))

    log = MetricsLog(tmp_path, tensorboard=False)
    log.tb = Writer()
    log.write({"step": 4, "val_loss": 2.5, "val_loss/web": 2.0, "val_loss/code": 3.0, "epochs/web": 0.1})
    assert ("val_loss/web", 2.0, 4) in tags and ("epochs/web", 0.1, 4) in tags


def test_the_progress_line_shows_sources_and_warns_of_epochs(folders, tmp_path, capsys):
    # 4 steps x 4 rows: code (weight 0.3, 281 windows) reads 5 rows, 0.018 of its windows; web 11 of 843, 0.013
    run(mixture_job(folders, tmp_path, "logging.progress=true", "train.max_steps=4", "data.max_epochs=0.015"))
    err = capsys.readouterr().err
    assert "warning: the run reads data source code 0.02 times over, more than data.max_epochs = 0.015" in err
    assert "data source web" not in err
    assert "step 4: val_loss" in err and " (web " in err and " at 0.01 epochs, code " in err
    run(mixture_job(folders, tmp_path / "again", "logging.progress=true", "train.max_steps=4"))
    assert "warning" not in capsys.readouterr().err  # data.max_epochs = 4: far from it


def test_a_mixture_run_resumes_exactly_and_refuses_a_changed_weight(folders, mixture_run, tmp_path):
    assert [p.name for p in list_checkpoints(mixture_run / "checkpoints")] == ["step_00000004", "step_00000008"]
    ckpt = mixture_run / "checkpoints" / "step_00000004"
    run(mixture_job(folders, tmp_path / "part", "checkpoint.every_steps=4", f'checkpoint.resume="{ckpt}"'))
    full = {r["step"]: r["loss"] for r in read_metrics(mixture_run) if "loss" in r}
    part = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "part") if "loss" in r}
    assert sorted(part) == list(range(5, 9))
    assert all(full[s] == part[s] for s in part)  # bit for bit on CPU
    val = [[r for r in read_metrics(d) if "val_loss" in r and r["step"] == 8] for d in (mixture_run, tmp_path / "part")]
    assert val[0] == val[1]
    with pytest.raises(ConfigError, match=r"resume from .*step_00000004: the run's settings changed \(data.sources: "
                                          r".*'weight': 0.7.* -> .*'weight': 0.6") as error:
        run(mixture_job(folders, tmp_path / "changed", f'checkpoint.resume="{ckpt}"',
                        weights={"web": 0.6, "code": 0.4}))
    assert "\n" not in str(error.value)
    # the same mixture written as 7 and 3: the same normalised weights, the same run
    run(mixture_job(folders, tmp_path / "same", f'checkpoint.resume="{ckpt}"', weights={"web": 7, "code": 3}))
    same = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "same") if "loss" in r}
    assert same == part


def test_a_run_keeps_its_sampling_when_resumed_and_says_when_an_epoch_begins(folders, tmp_path, capsys):
    # a run made with random sampling (as every run before "epoch"), resumed with the default 'auto'
    job = [f'data.path="{folders["math"]}"', "checkpoint.every_steps=4"]
    run(load_config(None, JOB + job + ['data.sampling="random"', f'logging.run_dir="{tmp_path / "full"}"']))
    ckpt = tmp_path / "full" / "checkpoints" / "step_00000004"
    run(load_config(None, JOB + job + [f'checkpoint.resume="{ckpt}"', f'logging.run_dir="{tmp_path / "part"}"']))
    full, part = ({r["step"]: r["loss"] for r in read_metrics(tmp_path / d) if "loss" in r} for d in ("full", "part"))
    assert sorted(part) == [5, 6, 7, 8] and all(full[s] == part[s] for s in part)
    assert "sampling = \"random\"" in (tmp_path / "part" / "config.toml").read_text()
    capsys.readouterr()
    # a new run: epoch sampling; math holds 7,200 train tokens, 224 windows of 32 + 1: 7 steps of 32 rows, so
    # step 8 (rows 224 to 255) reads the second epoch
    run(load_config(None, JOB + job + ["train.global_batch_size=32", "logging.progress=true",
                                       f'logging.run_dir="{tmp_path / "epochs"}"']))
    assert "sampling = \"epoch\"" in (tmp_path / "epochs" / "config.toml").read_text()
    err = capsys.readouterr().err
    assert err.count("begins epoch") == 1 and "step 8: data source math begins epoch 2, in a new order" in err
