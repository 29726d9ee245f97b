"""Patch parity: every public way of calling a Hugging Face causal LM gives, patched
(apply_stackfast_kernels, or patch_llama for the classes), what the unpatched model gives:
labels or not, the KV cache under `cache=` and under `past_key_values=` (a multi-step
decode feeding it back), greedy `generate`, `return_dict=False`, all-ignored labels,
`num_items_in_batch`, left padding, subclasses, and 20 AdamW steps.

Tolerances (fp32 models): the first test holds logits, loss and every gradient to
docs/design.md's rule against the unpatched model in float64; the call patterns after it
compare with the unpatched fp32 model, |patched - unpatched| <= TOL * (|unpatched| +
max |unpatched|) elementwise (logits, loss, each parameter's gradient), TOL = 2e-5, about
30x the largest difference seen, 6e-7 (the kernels sum in another order than PyTorch);
generated token ids are equal; the 20-step losses within 1e-5 at every step.
Tiny models (hidden 64, 2 layers, GQA, head dim 16, vocab 97, seq <= 12) keep the
interpreter fast on CPU."""
import copy
import inspect
import warnings

import pytest
import torch
import transformers
from conftest import KERNEL_DEVICE, assert_within_torch_error

from stackfast.ops import apply_stackfast_kernels, patch_llama

pytestmark = pytest.mark.usefixtures("on_kernel_device")  # the GPU when there is one (conftest.py)

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=144, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa", pad_token_id=0)
FAMILIES = {  # Mistral's window (6) is shorter than the batch (8): its attention takes the module's path
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig, {}),
    "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig, {"sliding_window": 6}),
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config, {}),
}
TOL = 2e-5
# the names this transformers takes the KV cache by (5.x: `cache`, and `past_key_values` with a FutureWarning)
CACHE_NAMES = [name for name in ("cache", "past_key_values")
               if name == "past_key_values" or name in inspect.signature(transformers.LlamaModel.forward).parameters]


def tiny(cls=transformers.LlamaForCausalLM, config_cls=transformers.LlamaConfig, **overrides):
    torch.manual_seed(0)
    with torch.device(KERNEL_DEVICE):  # module-scoped fixtures run outside on_kernel_device
        return cls(config_cls(**{**TINY, **overrides})).float()


@pytest.fixture(scope="module")
def llama():
    """(unpatched, patched) tiny Llama, the same weights; shared: every use zeroes the gradients."""
    plain = tiny()
    return plain, apply_stackfast_kernels(copy.deepcopy(plain))


def batch(seqlen=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, 97, (2, seqlen), generator=g).to(torch.get_default_device())
    labels = x.clone()
    labels[0, :4] = -100  # a prompt not trained on
    return x, labels


def grads(model, loss):
    """loss.backward(); every parameter's gradient by name (model's gradients zeroed first)."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def assert_close(ours, theirs, what):
    theirs = theirs.detach()
    torch.testing.assert_close(ours.detach(), theirs, rtol=TOL, atol=TOL * float(theirs.abs().max()),
                               msg=lambda m: f"{what}: {m}")


def assert_same_grads(ours, theirs):
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert_close(ours[name], theirs[name], name)


def returned_cache(out):
    return out.cache if hasattr(out, "cache") else out.past_key_values


def new_cache(model):
    try:
        return transformers.DynamicCache(config=model.config)
    except TypeError:  # an older transformers: no config argument
        return transformers.DynamicCache()


def loss_and_grads(model, **kwargs):
    loss = model(**kwargs).loss
    return loss.detach(), grads(model, loss)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_loss_and_gradients_without_and_with_labels(family):
    """The accuracy rule of docs/design.md: against the unpatched model in float64."""
    cls, config_cls, extra = FAMILIES[family]
    plain = tiny(cls, config_cls, **extra)
    patched = apply_stackfast_kernels(copy.deepcopy(plain))
    x, labels = batch()

    def run(model):
        with torch.no_grad():
            logits = model(input_ids=x).logits
        loss, g = loss_and_grads(model, input_ids=x, labels=labels)
        return logits, loss, g
    ref, low, ours = run(copy.deepcopy(plain).double()), run(plain), run(patched)
    assert_within_torch_error(ours[0], ref[0], low[0], torch.float32, "logits")
    assert_within_torch_error(ours[1], ref[1], low[1], torch.float32, "loss")
    assert ours[2].keys() == ref[2].keys()
    for name in ref[2]:
        assert_within_torch_error(ours[2][name], ref[2][name], low[2][name], torch.float32, name)


def test_num_items_in_batch(llama):
    """Hugging Face's Trainer passes the token count of the whole accumulated batch: the
    loss is this batch's sum divided by it (a tensor or an int)."""
    x, labels = batch()
    want, want_grads = loss_and_grads(llama[0], input_ids=x, labels=labels, num_items_in_batch=torch.tensor(23))
    loss, got_grads = loss_and_grads(llama[1], input_ids=x, labels=labels, num_items_in_batch=torch.tensor(23))
    assert_close(loss, want, "loss")
    assert_same_grads(got_grads, want_grads)
    with torch.no_grad():
        assert_close(llama[1](input_ids=x, labels=labels, num_items_in_batch=23).loss, want, "loss, an int count")


def test_all_ignored_labels(llama):
    """Every label -100 (a micro-batch of prompt only): Hugging Face's loss is nan (mean of
    nothing) or 0.0 with num_items_in_batch, and every gradient is 0, never nan."""
    x, _ = batch()
    labels = torch.full_like(x, -100)
    for kwargs in ({}, {"num_items_in_batch": torch.tensor(5)}):
        want, want_grads = loss_and_grads(llama[0], input_ids=x, labels=labels, **kwargs)
        loss, got_grads = loss_and_grads(llama[1], input_ids=x, labels=labels, **kwargs)
        torch.testing.assert_close(loss, want, equal_nan=True, msg=lambda m: f"loss with {kwargs}: {m}")
        assert all(torch.equal(g, torch.zeros_like(g)) for g in want_grads.values())
        for name, g in got_grads.items():
            assert torch.equal(g, torch.zeros_like(g)), f"{name} with {kwargs}: gradient not 0 (nan: {g.isnan().any()})"


def test_return_dict_false(llama):
    """Hugging Face's tuple positions. With labels the patched output has no logits (never
    computed): its tuple is (loss, None, cache) where Hugging Face's is (loss, logits, cache),
    so positional code that takes out[1] as the logits fails loudly. (config.return_dict = False breaks transformers 5's own
    LlamaForCausalLM: its base model then returns a tuple; not tested here.)"""
    plain, patched = llama
    x, labels = batch()
    with torch.no_grad():
        want = plain(input_ids=x, return_dict=False)
        got = patched(input_ids=x, return_dict=False)
    assert isinstance(got, tuple) and len(got) == len(want) == 2
    assert_close(got[0], want[0], "logits")
    assert type(got[1]) is type(want[1])  # the cache
    want = plain(input_ids=x, labels=labels, return_dict=False)
    got = patched(input_ids=x, labels=labels, return_dict=False)
    assert isinstance(got, tuple) and len(got) == len(want)
    assert_close(got[0], want[0], "loss")
    assert got[1] is None and type(got[2]) is type(want[2])  # no logits; the cache
    assert_same_grads(grads(patched, got[0]), grads(plain, want[0]))


@pytest.mark.parametrize("name", CACHE_NAMES)
def test_cache_fed_back_through_a_decode(llama, name):
    """A prompt into a DynamicCache, then a chunk with labels on top of it (loss and
    gradients), then greedy steps of one token, each feeding back the cache the last call
    returned: the same logits, tokens and cache lengths; `past_key_values=` (transformers'
    deprecated name) warns as Hugging Face's forward does."""
    x, labels = batch(12)
    results = []
    for model in llama:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            cache = new_cache(model)
            with torch.no_grad():
                model(input_ids=x[:, :6], **{name: cache}, use_cache=True)
            out = model(input_ids=x[:, 6:9], labels=labels[:, 6:9], **{name: cache}, use_cache=True)
            loss, g = out.loss.detach(), grads(model, out.loss)
            cache, steps = returned_cache(out), []
            token = x[:, 9:10]
            with torch.no_grad():
                for _ in range(3):
                    out = model(input_ids=token, **{name: cache}, use_cache=True)
                    cache = returned_cache(out)
                    token = out.logits[:, -1:].argmax(-1)
                    steps.append((out.logits, token, cache.get_seq_length()))
        results.append((loss, g, steps))
    (want_loss, want_grads, want_steps), (loss, got_grads, got_steps) = results
    assert_close(loss, want_loss, "loss of the chunk after the prompt")
    assert_same_grads(got_grads, want_grads)
    assert [s[2] for s in got_steps] == [s[2] for s in want_steps] == [10, 11, 12]
    for (logits, token, _), (want_logits, want_token, _) in zip(got_steps, want_steps):
        assert_close(logits, want_logits, "decode logits")
        assert torch.equal(token, want_token)
    if name == "past_key_values":
        with pytest.warns(FutureWarning, match="past_key_values"), torch.no_grad():
            llama[1](input_ids=x[:, :2], past_key_values=new_cache(llama[1]))


def test_both_cache_names_at_once(llama):
    """`cache=` and `past_key_values=` in one call: whatever Hugging Face's forward does (a
    warning and `cache` used, or a refusal), the patched one does too."""
    if len(CACHE_NAMES) < 2:
        pytest.skip("this transformers has no `cache` argument")
    x, _ = batch()
    outcomes = []
    for model in llama:
        used, ignored = new_cache(model), new_cache(model)
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            try:
                logits = model(input_ids=x, cache=used, past_key_values=ignored, use_cache=True).logits
            except ValueError as error:
                logits = str(error)
        outcomes.append((logits, used.get_seq_length(), ignored.get_seq_length(),
                         sorted({str(w.category.__name__) for w in caught})))
    want, got = outcomes
    assert got[1:] == want[1:]
    if isinstance(want[0], str):
        assert isinstance(got[0], str)
    else:
        assert_close(got[0], want[0], "logits")


@pytest.mark.parametrize("left_padding", [False, True], ids=["one-prompt", "left-padded-batch"])
def test_generate_greedy(llama, left_padding):
    """generate(): the prompt through the kernels (or, padded, the module's attention), then
    cached steps: the same token ids."""
    x, _ = batch(7)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    if left_padding:
        mask = torch.ones_like(x)
        mask[0, :3] = 0
        x = x.masked_fill(mask == 0, 0)
        kwargs["attention_mask"] = mask
    else:
        x = x[:1]
    want = llama[0].generate(x, **kwargs)
    assert torch.equal(llama[1].generate(x, **kwargs), want)


def test_left_padding_attention_mask(llama):
    """A left-padded batch with its attention mask (pads labelled -100): logits, loss and
    every gradient."""
    x, labels = batch()
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    labels = labels.masked_fill(mask == 0, -100)
    with torch.no_grad():
        assert_close(llama[1](input_ids=x, attention_mask=mask).logits,
                     llama[0](input_ids=x, attention_mask=mask).logits, "logits")
    want, want_grads = loss_and_grads(llama[0], input_ids=x, attention_mask=mask, labels=labels)
    loss, got_grads = loss_and_grads(llama[1], input_ids=x, attention_mask=mask, labels=labels)
    assert_close(loss, want, "loss")
    assert_same_grads(got_grads, want_grads)


class Subclass(transformers.LlamaForCausalLM):
    pass


class SubclassWithForward(transformers.LlamaForCausalLM):
    def forward(self, *args, **kwargs):  # a project's own wrapper around the forward
        return super().forward(*args, **kwargs)


@pytest.mark.parametrize("cls", [Subclass, SubclassWithForward])
def test_subclass_under_patch_llama(cls, monkeypatch):
    """patch_llama() reaches subclasses of LlamaForCausalLM (their own forward calling
    super().forward too): the fused loss runs, and logits, loss and gradients are those
    before the patch."""
    import stackfast.ops as ops
    model = tiny(cls, num_hidden_layers=1)
    x, labels = batch()

    def run():
        with torch.no_grad():
            logits = model(input_ids=x).logits
        return (logits, *loss_and_grads(model, input_ids=x, labels=labels))
    want = run()
    fused = []
    real = ops.linear_cross_entropy
    monkeypatch.setattr(ops, "linear_cross_entropy", lambda *a, **kw: fused.append(1) or real(*a, **kw))
    try:
        patch_llama()
        got = run()
    finally:
        patch_llama(undo=True)
    assert fused == [1]
    assert_close(got[0], want[0], "logits")
    assert_close(got[1], want[1], "loss")
    assert_same_grads(got[2], want[2])


def test_twenty_adamw_steps_follow_the_unpatched_losses():
    """Training: patched and unpatched copies (same initialisation, same batches, AdamW,
    fp32) stay on the same loss curve for 20 steps."""
    plain = tiny(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                 num_key_value_heads=1)
    patched = apply_stackfast_kernels(copy.deepcopy(plain))
    g = torch.Generator().manual_seed(2)
    data = torch.randint(1, 97, (2, 1, 8), generator=g).to(torch.get_default_device())  # two batches, in turn
    curves = []
    for model in (plain, patched):
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
        losses = []
        for step in range(20):
            x = data[step % len(data)]
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves.append(torch.tensor(losses, dtype=torch.float64))
    assert curves[0][-1] < curves[0][0] - 1  # it learns the two batches
    diff = (curves[1] - curves[0]).abs()
    assert diff.max() <= 1e-5, \
        f"step {int(diff.argmax())}: {diff.max():.3g} ({curves[1].tolist()} vs {curves[0].tolist()})"


def test_packed_position_ids_are_masked_per_document(llama):
    """Rows packed from several sequences, marked by position_ids restarting at 0 (one row
    packed, one not, a 1-token document): the patched model masks per document as
    transformers' flash-attention path does, equal to the unpatched SDPA model given the
    equivalent block-diagonal causal 4-D mask (logits, loss, every gradient). Unpatched
    without that mask, the documents attend to each other (the test would see it)."""
    plain, patched = llama
    x, labels = batch(12)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4, 5], list(range(12))])
    documents = (position_ids == 0).cumsum(-1)
    mask = (documents[:, :, None] == documents[:, None, :]) & torch.ones(12, 12, dtype=torch.bool).tril()
    want = plain(input_ids=x, position_ids=position_ids, attention_mask=mask[:, None])
    got = patched(input_ids=x, position_ids=position_ids)
    assert_close(got.logits, want.logits, "logits")
    across = plain(input_ids=x, position_ids=position_ids).logits
    assert not torch.allclose(across, want.logits, atol=1e-3)
    ours = loss_and_grads(patched, input_ids=x, position_ids=position_ids, labels=labels)
    theirs = loss_and_grads(plain, input_ids=x, position_ids=position_ids, attention_mask=mask[:, None],
                            labels=labels)
    assert_close(ours[0], theirs[0], "loss")
    assert_same_grads(ours[1], theirs[1])
