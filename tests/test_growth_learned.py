"""LiGO (stackfast/growth/learned.py): depth_learn and width_learn."""
import pytest
import torch

from stackfast.config import ModelConfig
from stackfast.growth import GrowthError, apply_growth
from stackfast.model import Transformer

LEARNED = ["depth_learn", "width_learn"]


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny", kernels="torch"))


@pytest.fixture(scope="module")
def batch():
    """One fixed batch: (inputs, targets), each (2, 16) int64."""
    tokens = torch.randint(0, 4096, (2, 17), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1], tokens[:, 1:]


def loss_on(model, batch):
    with torch.no_grad():
        return model(*batch).item()


def test_depth_learn_without_steps_is_stack(small, batch):
    growth = apply_growth(small, "depth_learn", 2, batches=lambda step: batch, steps=0)
    stacked = apply_growth(small, "stack", 2).model.state_dict()
    learned = growth.model.state_dict()
    assert learned.keys() == stacked.keys()
    assert all(torch.equal(learned[k], stacked[k]) for k in stacked)
    assert growth.spec == {"operator": "depth_learn", "factor": 2, "steps": 0, "lr": 1e-3, "seed": 0,
                           "layer_map": [0, 1, 0, 1]}


def test_width_learn_without_steps_keeps_old_blocks(small):
    growth = apply_growth(small, "width_learn", 4, batches=None, steps=0)
    grown = growth.model
    cfg = grown.config
    assert (cfg.hidden_size, cfg.ffn_size, cfg.n_heads, cfg.n_kv_heads, cfg.n_layers) == (128, 352, 8, 4, 2)
    # B = [I; R]: the leading (old) block of every weight is the small model's, exactly.
    for name, p in small.named_parameters():
        grown_p = grown.get_parameter(name)
        assert torch.equal(grown_p[tuple(slice(0, n) for n in p.shape)], p), name
    # New entries are small mixes of old ones: new embedding channels about 1% of the old.
    new, old = grown.embed_tokens.weight[:, 64:], small.embed_tokens.weight
    assert 0 < new.std() < 0.05 * old.std()
    assert growth.spec["operator"] == "width_learn" and growth.spec["old_hidden_size"] == 64


@pytest.mark.parametrize("operator, factor", [("depth_learn", 2), ("width_learn", 4)])
def test_learning_lowers_the_loss_and_leaves_the_small_model_alone(small, batch, operator, factor):
    before = {k: v.clone() for k, v in small.state_dict().items()}
    start = loss_on(apply_growth(small, operator, factor, batches=lambda step: batch, steps=0).model, batch)
    learned = loss_on(apply_growth(small, operator, factor, batches=lambda step: batch, steps=20, lr=1e-2).model,
                      batch)
    assert learned < start
    assert all(torch.equal(before[k], v) for k, v in small.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in small.parameters())


def test_width_learn_deterministic_by_seed(small, batch):
    a, b, c = (apply_growth(small, "width_learn", 4, batches=lambda step: batch, steps=1, seed=s).model.state_dict()
               for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("operator", LEARNED)
def test_learned_model_trains(small, batch, operator):
    model = apply_growth(small, operator, 4, batches=lambda step: batch, steps=1).model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(*batch).backward()
    optimizer.step()
    assert torch.isfinite(model(*batch))


@pytest.mark.parametrize("operator, factor, options, message", [
    ("depth_learn", 2, {"steps": -1}, "LiGO needs steps >= 0 and lr > 0, got steps=-1"),
    ("width_learn", 4, {"lr": 0.0}, "LiGO needs steps >= 0 and lr > 0, got steps=100, lr=0.0"),
    ("width_learn", 4, {"hidden_size": 32}, "target hidden_size 32 is smaller than the model's 64"),
    ("width_learn", 2, {"hidden_size": 128}, r"sqrt\(2\), which is not an integer"),
])
def test_bad_options_raise(small, batch, operator, factor, options, message):
    with pytest.raises(GrowthError, match=message):
        apply_growth(small, operator, factor, batches=lambda step: batch, **options)
