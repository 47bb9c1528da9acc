import pytest

from cxrfm.config import ConfigError, load_config, with_overrides


def test_default_job_loads_and_matches_the_documented_defaults():
    cfg = load_config()
    assert cfg.deepspeed.stage == 2
    assert cfg.train.num_workers == 2 and not cfg.train.use_gpu
    assert cfg.model.attention == "sdpa"


def test_override_parses_values_as_yaml():
    cfg = load_config(None, ["train.max_steps=7", "deepspeed.stage=3", "data.tasks={report: 1.0}"])
    assert cfg.train.max_steps == 7 and cfg.deepspeed.stage == 3 and cfg.data.tasks == {"report": 1.0}


@pytest.mark.parametrize("override, expected", [
    ("train.bogus=1", "unknown config key 'train.bogus'"),
    ("deepspeed.stage=4", "input should be 1, 2 or 3"),
    ("model.attention=flash", "'auto', 'sdpa', 'eager', 'triton', 'flash_attn' or 'xformers'"),
    ("train.max_steps=0", "train.max_steps"),
    ("data.tasks={report: 1, caption: 1}", "unknown task(s) ['caption']"),
    ("data.max_seq_len=40", "data.max_seq_len (40) is too short"),
    ("model.projector.num_tokens=10", "must be a square number"),
    ("train.precision=fp16", "needs a GPU"),
    ("nosection=1", "unknown config key 'nosection'"),
])
def test_bad_values_fail_naming_the_key_and_what_is_allowed(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert expected in str(err.value)


def test_zero3_with_offload_on_cpu_is_rejected_before_work_starts():
    with pytest.raises(ConfigError, match="offload needs train.use_gpu=true"):
        load_config(None, ["deepspeed.stage=3", "deepspeed.offload_param=cpu"])
    with pytest.raises(ConfigError, match="offload_param needs deepspeed.stage=3"):
        load_config(None, ["train.use_gpu=true", "deepspeed.stage=2", "deepspeed.offload_param=cpu"])


def test_missing_file_and_malformed_override():
    with pytest.raises(ConfigError, match="not found"):
        load_config("jobs/does-not-exist.yaml")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["train.max_steps"])


def test_dump_round_trips():
    cfg = load_config(None, ["train.lr=0.01"])
    assert with_overrides(cfg.dump(), []) == cfg
