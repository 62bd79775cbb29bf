"""Config: strict loading, dotted overrides, YAML round trip, errors naming the field."""

import subprocess
import sys

import pytest

from mama_ray import config as C


def test_shipped_presets_load_and_round_trip():
    for name in ("tiny_cpu", "base"):
        cfg = C.load(name)
        again = C.from_dict(C.load_yaml_text(C.dump_yaml(cfg)))
        assert again == cfg


def test_tiny_preset_fills_model_sizes_and_yaml_wins():
    cfg = C.load("tiny_cpu")
    assert cfg.model.vision.hidden_size == 32
    assert cfg.model.lora.r == 4
    cfg = C.load("tiny_cpu", ["model.lora.r=16", "model.vision.hidden_size=64"])
    assert (cfg.model.lora.r, cfg.model.vision.hidden_size) == (16, 64)
    # untouched preset values survive an override of a sibling
    assert cfg.model.vision.num_layers == 2


def test_base_preset_is_the_paper():
    cfg = C.load("base")
    v, t, lo = cfg.model.vision, cfg.model.text, cfg.model.lora
    assert (v.image_size, v.patch_size, v.hidden_size, v.num_layers, v.num_registers) == (518, 14, 768, 12, 4)
    assert (t.hidden_size, t.num_layers) == (2560, 32)
    assert (lo.r, lo.alpha, lo.dropout, lo.targets) == (8, 32, 0.1, ["c_attn"])
    assert cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.scaling.num_workers == 288
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.max_steps) == (4e-5, 4000, 40000)


def test_overrides_convert_types():
    cfg = C.load("tiny_cpu", ["optim.lr=3e-4", "train.max_steps=70", "scaling.use_gpu=true",
                              "run.name=123", "optim.betas=[0.8, 0.9]", "loss.clip_weight=2"])
    assert cfg.optim.lr == 3e-4 and cfg.train.max_steps == 70 and cfg.scaling.use_gpu is True
    assert cfg.run.name == "123" and cfg.optim.betas == [0.8, 0.9]
    assert isinstance(cfg.loss.clip_weight, float) and cfg.loss.clip_weight == 2.0
    tuned = C.override(cfg, {"model.lora.r": 32, "loss.sla_weight": 0.5})
    assert tuned.model.lora.r == 32 and tuned.loss.sla_weight == 0.5 and tuned.train.max_steps == 70


def test_misspelt_key_names_field_and_valid_keys(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(C.ConfigError) as e:
        C.load(str(p))
    msg = str(e.value)
    assert "optim.lrr" in msg and "lr" in msg and "warmup_steps" in msg


def test_misspelt_override_and_section():
    with pytest.raises(C.ConfigError, match=r"'modle'.*valid keys here: run, storage"):
        C.load("tiny_cpu", ["modle.lora.r=4"])
    with pytest.raises(C.ConfigError, match=r"model\.lora\.rank"):
        C.load("tiny_cpu", ["model.lora.rank=4"])


@pytest.mark.parametrize(
    "override, field, text",
    [
        ("train.max_steps=ten", "train.max_steps", "integer"),
        ("scaling.use_gpu=maybe", "scaling.use_gpu", "true/false"),
        ("deepspeed.precision=fp16", "deepspeed.precision", "['auto', 'bf16', 'fp32']"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage", "[0, 1, 2, 3]"),
        ("data.second_view_prob=1.5", "data.second_view_prob", "probability"),
        ("model.preset=huge", "model.preset", "tiny"),
        ("train.micro_batch_size=0", "train.micro_batch_size", "> 0"),
        # values that can only diverge (a NaN loss from step 1) are refused before anything starts
        ("loss.ntxent_temperature=0", "loss.ntxent_temperature", "> 0"),
        ("loss.ntxent_temperature=-0.5", "loss.ntxent_temperature", "> 0"),
        ("optim.lr=.nan", "optim.lr", "finite"),
        ("optim.lr=.inf", "optim.lr", "finite"),
        ("loss.sla_weight=-1", "loss.sla_weight", ">= 0"),
        ("optim.eps=0", "optim.eps", "> 0"),
        ("optim.betas=[0.9, 1.0]", "optim.betas", "[0, 1)"),
        ("optim.min_lr=1.0", "optim.min_lr", "exceeds optim.lr"),
    ],
)
def test_bad_values_name_the_field(override, field, text):
    with pytest.raises(C.ConfigError) as e:
        C.load("tiny_cpu", [override])
    assert f"'{field}'" in str(e.value) and text in str(e.value)


def test_unknown_preset_file_lists_shipped():
    with pytest.raises(C.ConfigError, match="tiny_cpu"):
        C.load("no_such_preset")


def test_cli_exits_2_naming_field():
    r = subprocess.run([sys.executable, "-m", "mama_ray.config", "--set", "optim.lrr=1"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "optim.lrr" in r.stderr and "Traceback" not in r.stderr


def test_markdown_reference_documents_every_field():
    doc = C.markdown_reference()
    assert "| `model.lora.r` | `8` | LoRA rank |" in doc
    assert doc.count("\n| `") >= 90


def test_docs_config_reference_is_current():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    assert doc.endswith(C.markdown_reference()), "regenerate the table: python -m mama_ray.config --doc"


def test_docs_reference_takes_each_field_comment_from_its_own_section():
    ref = C.markdown_reference()
    # grad_ckpt/weights/hidden_size exist in both tower sections with different comments
    assert "| `model.text.grad_ckpt` | `False` | HF gradient checkpointing of the trunk |" in ref
    assert "| `model.vision.grad_ckpt` | `False` | activation checkpointing of the ViT blocks |" in ref
    assert "| `model.text.hidden_size` | `2560` | width |" in ref


def _probe_check(cfg):
    C.check_probe_schedule(cfg.eval)


def _sweep_check(name):
    def check(cfg):
        from mama_ray import sweep

        space = {} if name == "check_space" else {"loss.mv_weight": 0.5, "loss.sla_weight": {"grid_search": [0, 1]}}
        getattr(sweep, name)(cfg, space)
    return check


def _data_check(cfg):
    from mama_ray.train.launch import check_data

    check_data(cfg)


def _ingest_check(cfg):
    from mama_ray.data.ingest import pseudonym_key
    from mama_ray.storage import StorageOptions

    pseudonym_key(cfg, StorageOptions())


@pytest.mark.parametrize(
    "overrides, check, path",
    [
        # load-time checks (config.validate) ...
        ({"deepspeed.zero_stage": 0, "deepspeed.offload_optimizer": True}, None, "deepspeed.offload_optimizer"),
        ({"deepspeed.offload_param": True}, None, "deepspeed.offload_param"),
        ({"optim.warmup_steps": 10**6}, None, "optim.warmup_steps"),
        ({"train.best_metric": "val_r1"}, None, "train.best_metric"),
        # ... the sweep's settings (config.check_tune_settings) ...
        ({"tune.num_samples": 0}, C.check_tune_settings, "tune.num_samples"),
        ({"tune.grace_period": 0}, C.check_tune_settings, "tune.grace_period"),
        ({"tune.reduction_factor": 1}, C.check_tune_settings, "tune.reduction_factor"),
        ({"tune.max_concurrent": 0}, C.check_tune_settings, "tune.max_concurrent"),
        ({"train.val_every": 0}, C.check_tune_settings, "tune.metric"),
        # ... the probe's schedule, checked where a probe runs ...
        ({"eval.probe_steps": 5, "eval.probe_warmup_steps": 6}, _probe_check, "eval.probe_warmup_steps"),
        # ... and the checks that need a search space, the data or the key, where they live
        ({}, _sweep_check("check_space"), "tune.space"),
        ({"tune.metric": "val_loss"}, _sweep_check("check_metric_against_space"), "tune.metric"),
        ({"tune.search": "optuna"}, _sweep_check("searcher"), "tune.search"),
        ({"data.shards": "/nonexistent/shards"}, _data_check, "data.shards"),
        ({"ingest.pseudonym_key": ""}, _ingest_check, "ingest.pseudonym_key"),
    ],
)
def test_every_check_names_its_field_in_the_one_format(overrides, check, path):
    with pytest.raises(C.ConfigError) as e:
        cfg = C.load("tiny_tune", overrides)
        check(cfg)
    assert e.value.path == path
    assert str(e.value) == f"config field '{path}': {e.value.problem}" and e.value.problem


def test_config_error_pickles_with_its_field():
    import pickle

    err = pickle.loads(pickle.dumps(C.ConfigError("must be > 0, got 0", "train.max_steps")))
    assert (err.path, err.problem, str(err)) == ("train.max_steps", "must be > 0, got 0",
                                                 "config field 'train.max_steps': must be > 0, got 0")
    assert str(pickle.loads(pickle.dumps(C.ConfigError("not valid YAML")))) == "not valid YAML"


def test_removed_sync_local_heads_is_an_unknown_key(tmp_path):
    """Local heads are always synchronised; an old config that still sets the field fails naming it."""
    p = tmp_path / "old.yaml"
    p.write_text("loss:\n  sync_local_heads: true\n")
    with pytest.raises(C.ConfigError) as e:
        C.load(str(p))
    assert e.value.path == "loss.sync_local_heads" and "unknown key; valid keys here: clip_weight" in str(e.value)
    assert not hasattr(C.LossConfig(), "sync_local_heads")
