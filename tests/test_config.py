from dataclasses import dataclass, field

import pytest

from llmkit.config import ConfigError, load_config, save_config
from llmkit.models.encoder import EncoderConfig
from llmkit.train.pretrain import PretrainConfig


@pytest.mark.parametrize("family", ["decoder", "encoder", "encdec"])
def test_saved_config_loads_back_into_the_same_classes(family, tmp_path):
    cfg = load_config(PretrainConfig, None, [f"model.family={family}", "model.n_layer=3", "data.tokenizer=tok",
                                             "train.lr=0.002"])
    assert cfg.model.FAMILY == family
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(PretrainConfig, tmp_path / "c.yaml")
    assert again == cfg


def test_family_key_in_a_single_class_section_must_match(tmp_path):
    @dataclass
    class Top:
        model: EncoderConfig = field(default_factory=EncoderConfig)

    p = tmp_path / "c.yaml"
    p.write_text("model:\n  family: encoder\n  n_layer: 2\n")
    assert load_config(Top, p).model.n_layer == 2
    p.write_text("model:\n  family: decoder\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: model\.family: this section takes 'encoder' only"):
        load_config(Top, p)


def test_unknown_family_is_refused_naming_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  family: mamba\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: model\.family: 'mamba' is not one of"):
        load_config(PretrainConfig, p)


def test_override_of_a_missing_section_and_bad_override_syntax():
    cfg = load_config(PretrainConfig, None, ["track.experiment=x", "data.tokenizer=t"])
    assert cfg.track.experiment == "x"
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(PretrainConfig, None, ["train.lr"])
    with pytest.raises(ConfigError, match=r"command line: unknown key 'train\.lrr'"):
        load_config(PretrainConfig, None, ["train.lrr=1"])
