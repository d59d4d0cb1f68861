import json

import pytest

from dmvae_lib.configs import STAGES, ConfigError, from_dict, make_config, to_dict


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("preset", ["smoke", "cpu", "imagenet256"])
def test_every_preset_builds_and_round_trips_through_json(stage, preset):
    cfg = make_config(stage, preset)
    back = from_dict(type(cfg), json.loads(json.dumps(to_dict(cfg))))
    assert back == cfg


def test_presets_differ_only_in_numbers():
    smoke, cpu = make_config("toy", "smoke"), make_config("toy", "cpu")
    assert type(smoke) is type(cpu)
    assert smoke.align.steps < cpu.align.steps


def test_dotted_override_and_type_coercion():
    cfg = make_config("toy", "cpu", {"align.steps": 7, "align.points_lr": 1, "objectives": ["dm"]})
    assert cfg.align.steps == 7 and cfg.align.points_lr == 1.0 and isinstance(cfg.align.points_lr, float)
    assert cfg.objectives == ("dm",)


@pytest.mark.parametrize("overrides, words", [
    ({"align.stepz": 3}, "align.stepz"),
    ({"nope": 1}, "nope"),
    ({"align.steps.x": 1}, "no sub-keys"),
    ({"align.steps": "many"}, "expects int"),
    ({"objectives": ["dm", "not_an_objective"]}, "not_an_objective"),
    ({"reference": "moon"}, "moon"),
    ({"align.t_min": 0.9, "align.t_max": 0.5}, "t_min"),
])
def test_bad_overrides_raise_naming_the_key(overrides, words):
    with pytest.raises(ConfigError, match=words):
        make_config("toy", "cpu", overrides)


def test_unknown_preset_and_stage_raise():
    with pytest.raises(ConfigError, match="preset"):
        make_config("toy", "laptop")
    with pytest.raises(ConfigError, match="stage"):
        make_config("tokeniser", "cpu")


def test_from_dict_rejects_unknown_keys():
    cfg = make_config("toy", "cpu")
    data = to_dict(cfg)
    data["align"]["extra"] = 1
    with pytest.raises(ConfigError, match="align.extra"):
        from_dict(type(cfg), data)
