"""ModelConfig / TrainConfig validation, the presets, the standard twin, config_from_dict (unknown keys, the renamed
n_recur field) and the CLI's view of them (the deprecated --n-recur flag, the chosen preset's defaults in --help).

Run: `pytest tests/test_config.py`.
"""

import argparse
import dataclasses
import re

import pytest

from recurchat.cli import build_parser, overrides
from recurchat.config import (
    ADDED_FIELDS,
    PRESETS,
    RENAMED_FIELDS,
    ModelConfig,
    TrainConfig,
    config_from_dict,
    get_preset,
)
from recurchat.errors import UserError


# ---- validation -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, message", [
    (dict(adapter="mul"), "unknown adapter 'mul' (choose from concat, add, parcae)"),
    (dict(state_init="ones"), "unknown state init 'ones' (choose from e, zeros, noise)"),
    (dict(r_max=0, mean_recur=1), "r_max must be >= 1, got 0"),
    (dict(mean_recur=0), "mean_recur must be in [1, r_max=16], got 0"),
    (dict(mean_recur=17), "mean_recur must be in [1, r_max=16], got 17"),
    (dict(n_prelude=-1), "n_prelude must be >= 0, got -1"),
    (dict(n_shared=-2), "n_shared must be >= 0, got -2"),
    (dict(n_coda=-1), "n_coda must be >= 0, got -1"),
    (dict(n_prelude=0, n_shared=0, n_coda=0), "the model has no blocks"),
    (dict(d_model=250), "d_model=250, n_head=4, n_kv_head=4: need d_model % n_head == 0"),
    (dict(n_kv_head=3), "n_head % n_kv_head == 0"),
    (dict(d_model=12, n_head=4, n_kv_head=2), "an even head dim"),  # head dim 3
    (dict(seq_len=1), "seq_len must be >= 2, got 1"),
])
def test_model_config_rejects_bad_values(changes, message):
    with pytest.raises(UserError, match=re.escape(message)):
        dataclasses.replace(ModelConfig(), **changes).validate()


@pytest.mark.parametrize("changes, message", [
    (dict(bptt_k=0), "bptt_k must be >= 1, got 0"),
    (dict(max_steps=0), "max_steps must be >= 1, got 0"),
    (dict(batch_size=0), "batch_size and total_batch_tokens must be >= 1"),
    (dict(total_batch_tokens=0), "batch_size and total_batch_tokens must be >= 1"),
    (dict(dtype="fp16"), "unknown dtype 'fp16' (auto | bf16 | fp32)"),
    (dict(parallel="tp"), "unknown parallel mode 'tp' (ddp | fsdp)"),
])
def test_train_config_rejects_bad_values(changes, message):
    with pytest.raises(UserError, match=re.escape(message)):
        dataclasses.replace(TrainConfig(), **changes).validate()


def test_defaults_and_edge_values_are_valid(tiny_cfg):
    assert ModelConfig().validate() == ModelConfig() and TrainConfig().validate() == TrainConfig()
    assert tiny_cfg.validate() is tiny_cfg  # validate returns the config itself, for chaining
    # the smallest legal settings: one block, r = r_max = 1, two positions
    ModelConfig(n_prelude=0, n_shared=1, n_coda=0, mean_recur=1, r_max=1, seq_len=2).validate()
    ModelConfig(n_prelude=1, n_shared=0, n_coda=0).validate()  # a standard model may have no shared blocks


# ---- presets ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_load_and_validate(name):
    p = get_preset(name)
    assert p.model == PRESETS[name].model and p.train == PRESETS[name].train and p.description
    p.model.validate()
    p.train.validate()
    p.model.standard_twin().validate()
    # a copy: changing it never changes the preset table
    p.model.d_model, p.train.max_steps = 8, 1
    assert PRESETS[name].model.d_model != 8 and PRESETS[name].train.max_steps != 1


def test_preset_values_the_docs_rely_on():
    assert get_preset("cpu-smoke").model.d_model == 64
    assert get_preset("cpu-tiny").model.effective_layers == 12  # 6 distinct blocks, 12 effective layers at r̄ = 4
    twin = get_preset("gpu-d20").model.standard_twin()
    assert twin.n_prelude + twin.n_coda == 20  # the iso-FLOP twin has 20 layers


def test_unknown_preset():
    with pytest.raises(UserError, match=re.escape("unknown preset 'cpu-huge' (choose from cpu-smoke, cpu-tiny, "
                                                  "probe, gpu-d20)")):
        get_preset("cpu-huge")


# ---- the standard twin ------------------------------------------------------------------------------------------
def test_standard_twin_has_p_plus_rbar_r_plus_c_blocks(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, n_prelude=2, n_shared=3, n_coda=1, mean_recur=4)
    twin = cfg.standard_twin()
    assert twin.n_prelude + twin.n_coda == 2 + 4 * 3 + 1 == cfg.effective_layers
    assert (twin.n_prelude, twin.n_shared, twin.n_coda, twin.mean_recur) == (2 + 4 * 3, 0, 1, 1)
    assert not twin.recursive and cfg.recursive
    assert twin.effective_layers == cfg.effective_layers  # iso-FLOP: same blocks per token
    # everything else (width, heads, vocabulary, context) is shared
    same = [f.name for f in dataclasses.fields(ModelConfig)
            if f.name not in ("n_prelude", "n_shared", "mean_recur", "r_max")]
    assert all(getattr(twin, n) == getattr(cfg, n) for n in same)
    assert twin.validate() is twin and twin.standard_twin() == twin  # the twin of a standard model is itself


# ---- config_from_dict -------------------------------------------------------------------------------------------
def test_config_from_dict_round_trip(tiny_cfg):
    assert config_from_dict(ModelConfig, dataclasses.asdict(tiny_cfg)) == tiny_cfg
    train = TrainConfig(adam_betas=(0.9, 0.99), compile=True)
    as_json = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(train).items()}
    back = config_from_dict(TrainConfig, as_json)  # JSON has lists where the dataclass has tuples
    assert back == train and back.adam_betas == (0.9, 0.99)
    # missing keys take the defaults, except fields added later: those take the behaviour from before them
    assert config_from_dict(ModelConfig, {}) == dataclasses.replace(ModelConfig(), **ADDED_FIELDS)


def test_config_from_dict_refuses_unknown_keys():
    with pytest.raises(UserError, match="unknown ModelConfig fields: bogus, d_modle"):
        config_from_dict(ModelConfig, {"d_model": 64, "d_modle": 64, "bogus": 1})
    with pytest.raises(UserError, match="unknown TrainConfig fields: n_shared"):
        config_from_dict(TrainConfig, {"n_shared": 2})


def test_config_from_dict_maps_renamed_fields(tiny_cfg):
    assert RENAMED_FIELDS == {"n_recur": "n_shared"}
    old = dataclasses.asdict(tiny_cfg)
    old["n_recur"] = old.pop("n_shared") + 1
    cfg = config_from_dict(ModelConfig, old)
    assert cfg.n_shared == tiny_cfg.n_shared + 1 and cfg == dataclasses.replace(tiny_cfg, n_shared=cfg.n_shared)


def test_a_config_saved_before_a_field_existed_loads_with_the_old_behaviour(tiny_cfg):
    """A checkpoint written before state_norm existed ran without it, whatever today's default is."""
    old = dataclasses.asdict(tiny_cfg)
    for name in ("adapter_init", "state_norm", "sandwich_norm"):
        old.pop(name)
    cfg = config_from_dict(ModelConfig, old)
    assert (cfg.adapter_init, cfg.state_norm, cfg.sandwich_norm) == ("e", False, False)
    saved = dataclasses.replace(tiny_cfg, adapter_init="s", state_norm=True)
    assert config_from_dict(ModelConfig, dataclasses.asdict(saved)) == saved


# ---- the command line -------------------------------------------------------------------------------------------
def subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def test_deprecated_n_recur_flag_sets_n_shared_with_a_note(capsys):
    args = build_parser().parse_args(["train", "--out", "x", "--n-recur", "3"])
    assert args.n_shared == 3 and overrides(ModelConfig, args) == {"n_shared": 3}
    err = capsys.readouterr().err
    assert "deprecated" in err and "--n-recur" in err and "--n-shared" in err
    args = build_parser().parse_args(["train", "--out", "x", "--n-shared", "2"])
    assert args.n_shared == 2 and "deprecated" not in capsys.readouterr().err
    assert "--n-recur" not in subparser(build_parser(), "train").format_help()  # hidden from --help


def test_train_help_shows_the_chosen_presets_defaults():
    smoke = subparser(build_parser(["train", "--preset", "cpu-smoke"]), "train").format_help()
    tiny = subparser(build_parser(["train"]), "train").format_help()
    assert re.search(r"--d-model D_MODEL\s+default: 64\b", smoke), smoke
    assert re.search(r"--d-model D_MODEL\s+default: 256\b", tiny), tiny  # cpu-tiny when no preset is given
    assert re.search(r"--max-steps MAX_STEPS\s+default: 20\b", smoke)  # TrainConfig fields too
    assert re.search(r"defaults\s+below:\s+cpu-smoke", smoke)
    # an unknown preset falls back to cpu-tiny's defaults here (the command itself then reports the bad name)
    assert re.search(r"--d-model D_MODEL\s+default: 256\b",
                     subparser(build_parser(["train", "--preset", "nope"]), "train").format_help())


def test_every_config_field_is_a_flag():
    train = subparser(build_parser(["train"]), "train")
    dests = {a.dest for a in train._actions}
    assert {f.name for f in dataclasses.fields(ModelConfig)} <= dests
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= dests
    args = build_parser().parse_args(["train", "--out", "x", "--adam-betas", "0.9", "0.99", "--no-compile"])
    assert tuple(args.adam_betas) == (0.9, 0.99) and args.compile is False
    assert set(overrides(TrainConfig, args)) == {"adam_betas", "compile"}  # only what was typed overrides


def test_old_and_new_name_together_are_refused():
    with pytest.raises(UserError, match="both 'n_recur' and its new name 'n_shared'"):
        config_from_dict(ModelConfig, {"n_recur": 2, "n_shared": 3})
