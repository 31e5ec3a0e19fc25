"""The nested training config: typed ``section.key=value`` overrides, unknown keys, the nested YAML round trip,
0.1's flat YAML, packaged configs through importlib.resources, and ``--data`` -> the data section."""
import importlib.resources
import os

import pytest
import yaml

from deeplab_keras.models.config import ModelConfig
from deeplab_keras.training import config as C
from deeplab_keras.training.run import _check_run_dir

# deeplab_keras/configs/tiny_cpu.yaml as 0.1 wrote it (flat keys)
FLAT_TINY = """
run_dir: runs/tiny_cpu
seed: 0
num_classes: 4
backbone: resnet50
output_stride: 8
aspp: L
width_multiplier: 0.125
stage_blocks: [1, 1, 1, 1]
weights: null
dataset: synthetic
synthetic_images: 200
synthetic_val_images: 40
synthetic_size: [97, 97]
crop_size: [97, 97]
scale_range: null
flip: true
batch_size: 4
steps: 600
steps_per_epoch: 100
checkpoint_every: 300
validation_every: 1
val_batch_size: 4
val_crop_size: [97, 97]
base_lr: 0.02
momentum: 0.9
weight_decay: 5.0e-4
classifier_lr_mult: 1.0
train_bn: true
tensorboard: true
"""


def test_set_values_are_typed_by_the_field():
    cfg = C.load_config(None, [
        "schedule.steps=100", "optimizer.base_lr=1e-3", "optimizer.train_bn=true", "data.flip=no",
        "data.crop_size=97,129", "data.val_crop_size=[65, 65]", "data.scale_range=null", "model.msc_scales=1,0.5",
        "model.aspp=6,12", "runtime.devices=/gpu:0,/gpu:1", "runtime.verbose=auto", "optimizer.weight_decay=0",
        "data.manual_dir=1e-3", "runtime.precision=mixed_float16"])
    assert cfg.schedule.steps == 100 and cfg.schedule.steps_per_epoch == 100  # a short run is one epoch
    assert cfg.optimizer.base_lr == 1e-3 and isinstance(cfg.optimizer.base_lr, float)
    assert cfg.optimizer.train_bn is True and cfg.data.flip is False
    assert cfg.data.crop_size == (97, 129) and cfg.data.val_crop_size == (65, 65) and cfg.data.scale_range is None
    assert cfg.model.msc_scales == (1.0, 0.5) and cfg.model.aspp == (6, 12)
    assert cfg.runtime.devices == ("/gpu:0", "/gpu:1") and cfg.runtime.verbose == "auto"
    assert cfg.optimizer.weight_decay == 0.0 and cfg.data.manual_dir == "1e-3"  # a str field keeps the text
    assert cfg.runtime.precision == "mixed_float16" and cfg.runtime.mixed
    assert C.load_config(None, ["model.aspp=L"]).model.aspp == "L"
    assert C.load_config(None, ["model.pool5a=null", "optimizer.base_lr=null"]).optimizer.base_lr is None


@pytest.mark.parametrize("item,says", [
    ("schedule.steps=ten", "schedule.steps='ten' is not an integer"),
    ("optimizer.momentum=[1,", "optimizer.momentum='[1,' is not a number"),
    ("data.flip=3", "data.flip='3' is not true or false"),
    ("data.crop_size=a,b", "data.crop_size='a,b' is not a comma-separated list"),
    ("data.crop_size=97", "data.crop_size must be two integers"),
    ("optimizer.base_lr=0", "optimizer.base_lr must be > 0 or null"),
    ("model.num_classes=300", "model.num_classes must be an integer in 1..255"),
    ("model.num_classes=0", "model.num_classes must be a positive integer (21 for PASCAL VOC), got 0"),
    ("data.dataset=voc", "model.num_classes=4 but data.dataset voc has 21 classes"),
    ("model.backbone=resnet18", "model.backbone must be one of ('resnet50', 'resnet101', 'vgg16'), got 'resnet18'"),
    ("runtime.devices=7", "runtime.devices must be a list of device names"),
    ("runtime.strategy=horovod", "runtime.strategy must be one of"),
    ("steps=3", "must look like section.key=value (e.g. schedule.steps=3)"),
])
def test_bad_values_name_the_key(item, says):
    with pytest.raises(ValueError) as err:
        C.load_config("tiny_cpu", [item])
    assert says in str(err.value) and "\n" not in str(err.value)


def test_cross_field_check_names_both_keys():
    with pytest.raises(ValueError, match=r"schedule.steps must be a multiple of schedule.steps_per_epoch \(3\)"):
        C.load_config(None, {"schedule": {"steps": 10, "steps_per_epoch": 3}})


def test_unknown_section_or_key_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        C.load_config(None, ["schedule.stepz=3"])
    assert "unknown key(s) ['schedule.stepz']" in str(err.value) and "steps_per_epoch" in str(err.value)
    with pytest.raises(ValueError) as err:
        C.load_config(None, {"trainer": {"steps": 3}})
    assert "['trainer']" in str(err.value) and "model, data, schedule, optimizer, runtime" in str(err.value)
    with pytest.raises(ValueError, match=r"did you mean steps -> schedule.steps"):
        C.load_config(None, {"steps": 3})  # a flat override dict: the nested form is named
    with pytest.raises(ValueError, match=r"\['model.dropoutt'\]"):
        C.TrainConfig.from_dict({"model": {"dropoutt": 0.1}})
    assert C.suggest_key("--crop-size") == "data.crop_size" and C.suggest_key("mixed_precision") == "runtime.precision"
    assert C.suggest_key("weights") == "optimizer.init_weights" and C.suggest_key("dropout") == "model.dropout"
    assert C.suggest_key("no_such_key") is None


def test_nested_yaml_round_trip_and_yaml_strings_typed(tmp_path):
    cfg = C.load_config("voc_resnet101_aspp_l", ["model.msc_scales=1,0.75,0.5", "data.crop_size=321,385"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    text = yaml.safe_load(path.read_text())
    assert list(text) == ["model", "data", "schedule", "optimizer", "runtime"]
    assert text["data"]["crop_size"] == [321, 385] and text["model"]["msc_scales"] == [1.0, 0.75, 0.5]
    assert C.load_config(str(path)) == cfg
    assert isinstance(cfg.model, ModelConfig) and ModelConfig.from_dict(text["model"]) == cfg.model
    # YAML 1.1 reads 1e-3 (no dot) as a string: the float field types it like a --set value
    path.write_text("optimizer:\n  base_lr: 1e-3\ndata:\n  scale_range: [5e-1, 1.5]\n")
    typed = C.load_config(str(path))
    assert typed.optimizer.base_lr == 1e-3 and typed.data.scale_range == (0.5, 1.5)


def test_defaults_are_the_paper_recipe_and_packaged_configs():
    default, paper = C.TrainConfig(), C.load_config("voc_resnet101_aspp_l")
    assert default.model == ModelConfig() and default.learning_rate == 2.5e-4
    assert (paper.model.backbone, paper.model.aspp, paper.data.crop_size, paper.schedule.steps,
            paper.data.batch_size) == ("resnet101", "L", (321, 321), 20000, 10)
    assert paper.learning_rate == 2.5e-4 and paper.optimizer.momentum == 0.9 and paper.optimizer.weight_decay == 5e-4
    assert paper.optimizer.classifier_lr_mult == 10 and paper.optimizer.train_bn is False
    assert paper.optimizer.init_weights == "imagenet" and paper.data.scale_range == (0.5, 1.5)
    vgg = C.load_config("voc_vgg16_largefov")
    assert vgg.model.backbone == "vgg16" and vgg.model.aspp == "largefov" and vgg.learning_rate == 1e-3
    assert C.TrainConfig.from_dict({"model": {"backbone": "vgg16", "aspp": "largefov"}}).learning_rate == 1e-3


def test_old_flat_yaml_still_loads(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(FLAT_TINY)
    assert C.load_config(str(path)) == C.load_config("tiny_cpu")
    path.write_text("steps: 20\nmixed_precision: mixed_bfloat16\nweights: imagenet\n")
    old = C.load_config(str(path), ["schedule.steps=40"])
    assert old.schedule.steps == 40 and old.runtime.precision == "mixed_bfloat16"
    assert old.optimizer.init_weights == "imagenet"
    path.write_text("stepz: 20\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stepz'\].*flat layout"):
        C.load_config(str(path))
    path.write_text("steps: 20\nschedule: {steps: 20}\n")
    with pytest.raises(ValueError, match=r"\['steps'\].*did you mean steps -> schedule.steps"):
        C.load_config(str(path))


def test_old_flat_run_dir_config_is_checked_on_resume(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(FLAT_TINY)
    (run / "model.keras").write_bytes(b"")  # the run dir holds a run
    _check_run_dir(str(run), C.load_config("tiny_cpu", ["schedule.steps=1200", "data.batch_size=8"]))  # same model
    with pytest.raises(ValueError) as err:
        _check_run_dir(str(run), C.load_config("tiny_cpu", ["model.num_classes=5", "schedule.steps_per_epoch=300"]))
    assert "model.num_classes=4 (this command: 5)" in str(err.value)
    assert "schedule.steps_per_epoch=100 (this command: 300)" in str(err.value)


def test_packaged_configs_come_from_importlib_resources(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    assert C.packaged_configs() == ["cityscapes_resnet101_aspp_l", "pascal_context_resnet101_aspp_l",
                                    "person_part_resnet101_msc", "tiny_cpu", "voc_resnet101_aspp_l",
                                    "voc_vgg16_largefov"]
    resource = importlib.resources.files("deeplab_keras") / "configs" / "tiny_cpu.yaml"
    expected = C.TrainConfig.from_dict(yaml.safe_load(resource.read_text()))
    assert C.load_config("tiny_cpu") == C.load_config("tiny_cpu.yaml") == expected
    (tmp_path / "tiny_cpu.yaml").write_text("schedule: {steps: 7}\n")  # a file of that name wins
    assert C.load_config("tiny_cpu.yaml").schedule.steps == 7
    with pytest.raises(ValueError, match=r"'no_such' not found \(packaged configs: \['cityscapes_resnet101_aspp_l'"):
        C.load_config("no_such")
    (tmp_path / "bad.yaml").write_text("schedule: [1,\n")
    with pytest.raises(ValueError, match="bad.yaml' is not valid YAML"):
        C.load_config("bad.yaml")


def test_data_path_sets_the_data_section(tmp_path):
    voc, sbd_voc, folder, other = (tmp_path / n for n in ("voc", "sbd", "shapes", "other"))
    (voc / "VOC2012").mkdir(parents=True)
    (sbd_voc / "VOC2012").mkdir(parents=True)
    (sbd_voc / "benchmark_RELEASE").mkdir()
    (folder / "images").mkdir(parents=True)
    other.mkdir()
    assert C.load_config("tiny_cpu", data="synthetic").data.dataset == "synthetic"
    paper = C.load_config("voc_resnet101_aspp_l", data=str(sbd_voc))
    assert (paper.data.dataset, paper.data.manual_dir) == ("voc", str(sbd_voc))
    with pytest.raises(ValueError, match="not benchmark_RELEASE/.*--set data.voc_config=voc"):
        C.load_config("voc_resnet101_aspp_l", data=str(voc))
    plain = C.load_config("voc_resnet101_aspp_l", ["data.voc_config=voc"], data=str(voc))
    assert (plain.data.dataset, plain.data.voc_config, plain.data.manual_dir) == ("voc", "voc", str(voc))
    shapes = C.load_config("tiny_cpu", data=str(folder))
    assert (shapes.data.dataset, shapes.data.folder) == ("folder", str(folder))
    with pytest.raises(ValueError, match="holds neither VOC2012/ nor images/"):
        C.load_config("tiny_cpu", data=str(other))
    with pytest.raises(ValueError, match="neither 'synthetic' nor an existing folder"):
        C.load_config("tiny_cpu", data=str(tmp_path / "missing"))
    assert C.DataConfig.fields_for(str(folder)) == {"dataset": "folder", "folder": str(folder)}
    assert os.path.isdir(C.load_config("tiny_cpu", data=str(folder)).data.folder)
