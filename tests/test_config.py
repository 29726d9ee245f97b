"""Config loading, overrides, presets and every validation error."""
import pytest

from stackfast.config import (PRESETS, Config, ConfigError, ModelConfig, describe, load_config,
                              parse_value, tomllib)


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_are_valid_and_round_trip_through_toml(tmp_path):
    cfg = load_config()
    assert cfg.model.n_layers == 8 and cfg.data.path == "builtin:python-stdlib"
    again = load_config(write(tmp_path, cfg.to_toml()))
    assert again == cfg


def test_file_and_overrides(tmp_path):
    path = write(tmp_path, '[model]\npreset = "tiny"\nn_layers = 3\n[optim]\nlr = 1\n')
    cfg = load_config(path, ["train.max_steps=7", "model.kernels=torch", 'logging.run_dir="x y"'])
    assert cfg.model.n_layers == 3 and cfg.model.hidden_size == PRESETS["tiny"]["hidden_size"]
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_steps == 7 and cfg.model.kernels == "torch" and cfg.logging.run_dir == "x y"


def test_float_notation_integer_is_accepted():
    assert load_config(None, ["train.total_tokens=2e6"]).train.total_tokens == 2_000_000


@pytest.mark.parametrize("name,layers,hidden,heads,kv,ffn", [
    ("410m", 24, 1024, 16, 1, 4096), ("1.1b", 24, 2048, 32, 32, 5632),
    ("3b", 32, 2560, 20, 4, 7040), ("7b", 32, 4096, 32, 8, 11008)])
def test_paper_presets_and_their_small_models(name, layers, hidden, heads, kv, ffn):
    target = ModelConfig.from_preset(name)
    small = ModelConfig.from_preset(name + "-small")
    assert (target.n_layers, target.hidden_size, target.n_heads, target.n_kv_heads, target.ffn_size) == \
        (layers, hidden, heads, kv, ffn)
    assert target.vocab_size == 32000 and target.norm_eps == 1e-5
    assert small.n_layers * 4 == target.n_layers and small.hidden_size == target.hidden_size


def test_7b_parameter_count_is_about_7b():
    # 8 KV heads (docs/method.md) make it ~5.9B rather than Llama-2-7B's 6.7B with full heads.
    assert 5.5e9 < ModelConfig.from_preset("7b").num_params() < 7.0e9


@pytest.mark.parametrize("overrides,message", [
    (["model.n_layrs=3"], "model.n_layrs: unknown key (did you mean 'n_layers'?)"),
    (["modle.n_layers=3"], "modle: unknown config section (did you mean 'model'?)"),
    (["model.n_layers=2.5"], "model.n_layers: expected int, got float"),
    (["model.n_layers=true"], "model.n_layers: expected int, got bool"),
    (["optim.lr=fast"], "optim.lr: expected float, got str"),
    (["model.n_heads=5"], "model.n_heads: 5 heads do not divide hidden_size 256"),
    (["model.n_kv_heads=3"], "model.n_kv_heads: 3 kv heads do not divide n_heads 4"),
    (["data.seq_len=0"], "data.seq_len: must be positive"),
    (["optim.lr=-1e-3"], "optim.lr: must be positive"),
    (["train.global_batch_size=-2"], "train.global_batch_size: must be positive"),
    (["train.micro_batch_size=-2"], "train.micro_batch_size: must be >= 0"),
    (["train.global_batch_size=12", "train.micro_batch_size=5"], "train.micro_batch_size: 5 does not divide"),
    (["train.grad_accum_steps=4"], "train.grad_accum_steps: no longer a setting; set train.global_batch_size"),
    (["checkpoint.allow_changes=\"data.pth\""], "checkpoint.allow_changes: data.pth is not a setting"),
    (["model.kernels=cuda"], "model.kernels: expected one of"),
    (["model.preset=8b"], "model.preset: unknown preset '8b'"),
    (["data.seq_len=4096"], "data.seq_len: 4096 exceeds model.max_seq_len"),
    (["optim.beta2=1.0"], "optim.beta2: must be in [0, 1)"),
    (["train.device=tpu"], "train.device: expected"),
    (['train.device="cuda:x"'], "train.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N' (N a GPU index), got 'cuda:x'"),
    (['train.device="cuda:-1"'], "train.device: expected"),
    (['train.device="cuda:"'], "train.device: expected"),
    (["optim.lr=inf"], "optim.lr: must be a finite number, got inf"),
    (["model.rope_theta=inf"], "model.rope_theta: must be a finite number"),
    (["model.norm_eps=nan"], "model.norm_eps: must be a finite number, got nan"),
    (["model.init_std=-inf"], "model.init_std: must be a finite number"),
    (["optim.weight_decay=nan"], "optim.weight_decay: must be a finite number"),
    (["train.peak_tflops=inf"], "train.peak_tflops: must be a finite number"),
    (["growth.noise=nan"], "growth.noise: must be a finite number"),
    (["train.total_tokens=1e30"], "train.total_tokens: 1000000000000000019884624838656 is beyond TOML's 64-bit"),
    (["train.seed=9223372036854775808"], "train.seed: 9223372036854775808 is beyond TOML's 64-bit"),
    (["nokey"], "expected section.key=value"),
    (["model=3"], "the key must look like section.key"),
])
def test_validation_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "[model\n"))
    with pytest.raises(ConfigError, match="model: expected a table"):
        load_config(write(tmp_path, "model = 3\n"))
    bad = tmp_path / "latin1.toml"
    bad.write_bytes("[logging]\nrun_dir = 'caf\u00e9'\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.toml: not a UTF-8 text file \(invalid continuation byte at byte 24\)"):
        load_config(bad)
    with pytest.raises(ConfigError, match="is a folder, not a config file"):
        load_config(tmp_path)


def test_cuda_device_index_is_accepted():
    assert load_config(None, ['train.device="cuda:1"']).train.device == "cuda:1"
    assert load_config(None, ["train.seed=9223372036854775807"]).train.seed == (1 << 63) - 1


def test_parse_value():
    assert parse_value("3") == 3 and parse_value("1e-3") == 1e-3 and parse_value("true") is True
    assert parse_value('"a"') == "a" and parse_value("runs/x") == "runs/x"


def test_every_field_is_documented():
    text = describe()
    for section in ("[model]", "[data]", "[optim]", "[schedule]", "[train]", "[parallel]",
                    "[checkpoint]", "[logging]"):
        assert section in text
    assert all("#" in line and line.split("#", 1)[1].strip() for line in text.splitlines()
               if line.startswith("  "))


def test_shipped_configs_load():
    from pathlib import Path
    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))
    assert {p.stem for p in configs} >= {"toy", "410m", "1.1b", "3b", "7b"}
    for path in configs:
        cfg = load_config(path)
        assert isinstance(cfg, Config)
        tomllib.loads(cfg.to_toml())


def test_flops_per_token_convention():
    cfg = ModelConfig.from_preset("tiny")
    non_embedding = cfg.num_params(embeddings=False)
    assert cfg.flops_per_token(100) == 6 * non_embedding + 6 * cfg.n_layers * cfg.hidden_size * 100
