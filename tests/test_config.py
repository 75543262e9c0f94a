"""The shared config parser: three layers, typed values, and errors that list the valid options."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from ehrlong.config import MISSING, PRESETS_DIR, TrainConfig, flat_keys, list_presets, parse, to_flat_dict
from ehrlong.errors import ConfigError

PRESETS = [name for name, _ in list_presets()]


def test_presets_exist_for_the_issue():
    for name in ["mamba_1k", "mamba_4k", "mamba_8k", "mamba_16k"] + [
        "transformer_512",
        "transformer_1k",
        "transformer_2k",
        "transformer_4k",
        "transformer_8k",
    ]:
        assert name in PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_validates_and_describes_itself(name):
    cfg = parse(TrainConfig, [f"config={name}"], presets_dir=PRESETS_DIR)
    assert cfg.config_name == name
    from ehrlong.backbones import BACKBONES

    assert cfg.backbone in BACKBONES
    assert cfg.context_length > 0
    description = dict(list_presets())[name]
    assert len(description) > 10, f"configs/{name}.yaml needs a first-line '# description'"


def test_layers_defaults_then_preset_then_command_line():
    default = parse(TrainConfig, [], presets_dir=PRESETS_DIR)
    preset = parse(TrainConfig, ["config=mamba_16k"], presets_dir=PRESETS_DIR)
    both = parse(
        TrainConfig,
        ["config=mamba_16k", "context_length=2048", "trainer.max_steps=7"],
        presets_dir=PRESETS_DIR,
    )
    assert default.context_length == 1024 and preset.context_length == 16384
    assert both.context_length == 2048 and both.trainer.max_steps == 7 and both.backbone == "mamba"
    # Order on the command line does not let a preset override an explicit key.
    later = parse(TrainConfig, ["context_length=2048", "config=mamba_16k"], presets_dir=PRESETS_DIR)
    assert later.context_length == 2048


def test_values_are_typed():
    cfg = parse(TrainConfig, ["optim.lr=3e-4", "data.root=null", "model.activation_checkpointing=true"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.data.root is None
    assert cfg.model.activation_checkpointing is True


def test_unknown_key_lists_valid_keys_and_suggests_the_closest():
    with pytest.raises(ConfigError) as e:
        parse(TrainConfig, ["trainer.max_step=5"])
    msg = str(e.value)
    assert "trainer.max_step" in msg and "Did you mean trainer.max_steps" in msg
    assert "data.synthetic.copy_forward" in msg  # the full list of valid keys


def test_bad_type_names_key_and_expected_type():
    with pytest.raises(ConfigError) as e:
        parse(TrainConfig, ["context_length=long"])
    assert "context_length" in str(e.value) and "int" in str(e.value)


def test_argument_without_equals_is_refused():
    with pytest.raises(ConfigError, match="key=value"):
        parse(TrainConfig, ["mamba_16k"])


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError) as e:
        parse(TrainConfig, ["config=mamba_17k"], presets_dir=PRESETS_DIR)
    assert "mamba_16k" in str(e.value) and "config=list" in str(e.value)


def test_preset_with_unknown_key_names_the_file(tmp_path):
    (tmp_path / "broken.yaml").write_text("# broken\nbackbone: mamba\ncontext_lenght: 5\n")
    with pytest.raises(ConfigError) as e:
        parse(TrainConfig, ["config=broken"], presets_dir=tmp_path)
    assert "broken.yaml" in str(e.value) and "context_lenght" in str(e.value)


def test_config_list_prints_one_line_per_preset(capsys):
    with pytest.raises(SystemExit) as e:
        parse(TrainConfig, ["config=list"], presets_dir=PRESETS_DIR)
    assert e.value.code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(PRESETS)
    assert any(line.startswith("mamba_16k") and "16384" in line for line in lines)


@dataclass
class _ListArgs:
    out: str = MISSING
    run: list[str] = field(default_factory=list)


def test_list_fields_take_repeats_and_commas_and_required_fields_are_enforced():
    args = parse(_ListArgs, ["out=x", "run=a", "run=b,c"])
    assert args.run == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="out="):
        parse(_ListArgs, ["run=a"])


def test_flat_keys_and_flat_dict_agree():
    cfg = TrainConfig()
    assert set(flat_keys(TrainConfig)) == set(to_flat_dict(cfg))


def test_base_layer_sits_under_the_command_line_and_its_keys_are_checked(tmp_path):
    saved = tmp_path / "config.yaml"
    cfg = parse(
        TrainConfig,
        ["trainer.max_steps=9"],
        base=(saved, {"backbone": "transformer", "trainer": {"max_steps": 3}}),
    )
    assert cfg.backbone == "transformer" and cfg.trainer.max_steps == 9
    with pytest.raises(ConfigError) as e:
        parse(TrainConfig, [], base=(saved, {"trainer": {"max_stepz": 3}}))
    assert "config.yaml" in str(e.value) and "trainer.max_stepz" in str(e.value)
