"""One config base for the three config families (ModelConfig / CRFConfig, CRFParams, the training sections):
numpy integers accepted everywhere, one error wording, one from_dict / to_dict."""
import json
import re

import numpy as np
import pytest

from deeplab_keras.config_base import ConfigBase, is_int, is_number
from deeplab_keras.crf.params import CRFParams
from deeplab_keras.models.config import CRFConfig, ModelConfig
from deeplab_keras.training.config_sections import DataConfig, OptimizerConfig, RuntimeConfig, ScheduleConfig

FAMILIES = [ModelConfig, CRFConfig, CRFParams, DataConfig, ScheduleConfig, OptimizerConfig, RuntimeConfig]
# (config class, an integer field, the section its errors name)
INT_FIELDS = [(ModelConfig, "num_classes", "model"), (CRFConfig, "iterations", "model.crf"),
              (CRFParams, "iterations", "crf"), (DataConfig, "batch_size", "data"),
              (ScheduleConfig, "keep_checkpoints", "schedule"), (OptimizerConfig, "accumulation_steps", "optimizer"),
              (RuntimeConfig, "seed", "runtime")]


def test_one_base_and_one_integer_rule():
    assert all(issubclass(cls, ConfigBase) for cls in FAMILIES)
    assert all(is_int(v) for v in (3, np.int64(3), np.uint8(3), np.int32(-1)))
    assert not any(is_int(v) for v in (True, np.bool_(True), 3.0, "3", None))
    assert all(is_number(v) for v in (3, 2.5, np.float32(2.5), np.int64(3)))
    assert not any(is_number(v) for v in (False, "2.5", None))


def test_numpy_integers_are_accepted_by_every_family_and_stored_as_python_ints():
    model = ModelConfig(num_classes=np.int64(21), backbone="resnet50", output_stride=np.int32(16),
                        stage_blocks=np.array([1, 1, 1, 1]), crf={"iterations": np.int64(3)})
    crf = CRFParams(iterations=np.int64(3), bilateral_weight=np.float32(5))
    data = DataConfig(batch_size=np.int64(2), crop_size=[np.int64(321), np.int32(321)], ignore_label=np.uint8(255))
    schedule = ScheduleConfig(steps=np.int64(100), steps_per_epoch=np.int32(50))
    assert model == ModelConfig(num_classes=21, backbone="resnet50", output_stride=16, stage_blocks=(1, 1, 1, 1),
                                crf={"iterations": 3})
    assert crf == CRFParams(iterations=3, bilateral_weight=5.0) and schedule.epochs == 2
    assert data.crop_size == (321, 321) and data.batch_size == 2
    for config in (model, crf, data, schedule):
        values = config.to_dict()
        assert json.loads(json.dumps(values)) == values  # plain Python types only
    assert type(model.num_classes) is int and type(crf.iterations) is int and type(data.batch_size) is int
    assert all(type(b) is int for b in model.stage_blocks + data.crop_size)


@pytest.mark.parametrize("cls,key,section", INT_FIELDS, ids=[c.__name__ for c, _, _ in INT_FIELDS])
@pytest.mark.parametrize("bad", [True, 2.5, "3", -1])
def test_the_same_mistake_reads_the_same_in_every_family(cls, key, section, bad):
    with pytest.raises(ValueError) as err:
        cls(**{key: bad})
    got = re.escape(repr(bad))
    assert re.fullmatch(rf"{re.escape(section)}\.{key} must be (a positive integer|an integer) .*, got {got}",
                        str(err.value)), str(err.value)


@pytest.mark.parametrize("cls", FAMILIES, ids=[c.__name__ for c in FAMILIES])
def test_unknown_keys_and_non_mappings_read_the_same_in_every_family(cls):
    with pytest.raises(ValueError) as err:
        cls.from_dict({"nope": 1})
    assert str(err.value) == f"unknown {cls.SECTION} key(s) ['nope']; valid keys: {list(cls.keys())}"
    with pytest.raises(ValueError, match=rf"^{re.escape(cls.SECTION)} must be a mapping of its keys .*, got list$"):
        cls.from_dict([("nope", 1)])


ROUND_TRIP = [ModelConfig(), ModelConfig(num_classes=3, backbone="resnet50", aspp=(3, 5), msc_scales=[1.0, 0.5],
                                         stage_blocks=[1, 1, 1, 1], crf={"trainable": False, "iterations": 2}),
              CRFConfig(compatibility=False, bilateral_weight=5), CRFParams(),
              CRFParams(iterations=0, gaussian_weight=0),
              DataConfig(crop_size=[97, 97], scale_range=None), ScheduleConfig(steps=30, steps_per_epoch=10),
              OptimizerConfig(class_weights=[1, 2.5]), RuntimeConfig(devices=["/cpu:0"], verbose="auto")]


@pytest.mark.parametrize("config", ROUND_TRIP, ids=[f"{type(c).__name__}-{i}" for i, c in enumerate(ROUND_TRIP)])
def test_from_dict_to_dict_round_trip(config):
    values = config.to_dict()
    assert json.loads(json.dumps(values)) == values  # lists, not tuples; nested configs as dicts
    assert type(config).from_dict(values) == config
    assert type(config).from_dict(values).to_dict() == values
    assert config.replace() == config
