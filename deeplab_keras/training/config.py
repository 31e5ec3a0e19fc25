"""The training configuration: :class:`TrainConfig`, five typed sections, and :func:`load_config`.

YAML layout (each section a dataclass; a missing key takes its default, the paper's ResNet-101 ASPP-L VOC
recipe)::

    model:     {num_classes: 21, backbone: resnet101, aspp: L, ...}     deeplab_keras.models.ModelConfig
    data:      {dataset: voc, manual_dir: ..., crop_size: [321, 321], batch_size: 10, ...}     DataConfig
    schedule:  {steps: 20000, steps_per_epoch: 1000, checkpoint_every: 1000, ...}     ScheduleConfig
    optimizer: {init_weights: imagenet, base_lr: 2.5e-4, momentum: 0.9, ...}     OptimizerConfig
    runtime:   {run_dir: runs/voc, seed: 0, precision: null, strategy: default, ...}     RuntimeConfig

Overrides are ``section.key=value`` strings typed by the field (``schedule.steps=100``,
``data.crop_size=321,321``, ``optimizer.base_lr=1e-3``, ``model.msc_scales=null``) or a nested dict. The flat
layout of 0.1 (a run directory's config.yaml) is still read: :data:`LEGACY_KEYS` maps each old key to its place.

Example:
    >>> load_config("tiny_cpu", ["schedule.steps=20"]).schedule.steps
    20
    >>> suggest_key("steps")
    'schedule.steps'
"""
import dataclasses
import importlib.resources
import os

from deeplab_keras.models.config import ModelConfig
from deeplab_keras.training.config_sections import (DATASETS, PRECISIONS, STRATEGIES, DataConfig,  # noqa: F401
                                                    OptimizerConfig, RuntimeConfig, ScheduleConfig)
from deeplab_keras.training.config_values import coerce, field_types, parse_value

SECTIONS = {"model": ModelConfig, "data": DataConfig, "schedule": ScheduleConfig, "optimizer": OptimizerConfig,
            "runtime": RuntimeConfig}

# The flat keys of 0.1's TrainConfig, by the section they moved to (two renamed: see _RENAMED).
_FLAT_KEYS = {
    "model": ("num_classes", "backbone", "output_stride", "aspp", "msc_scales", "width_multiplier", "stage_blocks"),
    "data": ("dataset", "voc_config", "train_split", "val_split", "manual_dir", "data_dir", "folder", "val_folder",
             "synthetic_images", "synthetic_val_images", "synthetic_size", "crop_size", "scale_range", "flip",
             "batch_size", "shuffle_buffer", "val_batch_size", "val_crop_size", "ignore_label"),
    "schedule": ("steps", "steps_per_epoch", "checkpoint_every", "keep_checkpoints", "validation_every",
                 "validation_steps"),
    "optimizer": ("base_lr", "lr_power", "end_lr", "momentum", "weight_decay", "classifier_lr_mult", "bias_lr_mult",
                  "classifier_pattern", "train_bn", "bn_momentum", "upsample_logits"),
    "runtime": ("run_dir", "seed", "deterministic", "strategy", "devices", "virtual_cpus", "tpu", "tensorboard",
                "plot", "verbose"),
}
_RENAMED = {"weights": "optimizer.init_weights", "mixed_precision": "runtime.precision"}
LEGACY_KEYS = dict({k: f"{s}.{k}" for s, keys in _FLAT_KEYS.items() for k in keys}, **_RENAMED)


def suggest_key(flat_key):
    """The ``section.key`` of a flat key (0.1's ``--steps`` / ``steps``, or a field name): "schedule.steps";
    None when no section has it."""
    key = str(flat_key).lstrip("-").split("=")[0].replace("-", "_")
    if key in LEGACY_KEYS:
        return LEGACY_KEYS[key]
    return next((f"{s}.{key}" for s, cls in SECTIONS.items() if key in field_types(cls)), None)


def config_keys():
    """{section: [keys]} of every settable field (for help texts)."""
    return {s: list(field_types(cls)) for s, cls in SECTIONS.items()}


def _unknown(keys, section=None):
    """The one ValueError for unknown sections / keys, listing the valid ones (and the section.key of a flat key)."""
    if section is None:
        hints = [f"{k} -> {suggest_key(k)}" for k in keys if suggest_key(k)]
        return ValueError(f"unknown config section(s) {sorted(map(str, keys))}; valid sections: "
                          f"{', '.join(SECTIONS)}" + (f" (did you mean {', '.join(hints)}?)" if hints else ""))
    return ValueError(f"unknown key(s) {[f'{section}.{k}' for k in sorted(map(str, keys))]}; valid keys of "
                      f"{section}: {', '.join(field_types(SECTIONS[section]))}")


def _nested(values, source, allow_flat=True):
    """A mapping in the nested layout, or (``allow_flat``) 0.1's flat one, as {section: {key: value}}."""
    if not isinstance(values, dict):
        raise ValueError(f"{source} must be a mapping of section: {{key: value}}, got {type(values).__name__}")
    if allow_flat and values and not set(values) & set(SECTIONS):  # 0.1's flat layout
        unknown = [k for k in values if k not in LEGACY_KEYS]
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(map(str, unknown))} in {source} (flat layout of 0.1); valid "
                             f"keys: {', '.join(LEGACY_KEYS)}")
        out = {s: {} for s in SECTIONS}
        for key, value in values.items():
            section, name = LEGACY_KEYS[key].split(".")
            out[section][name] = value
        return out
    unknown = [k for k in values if k not in SECTIONS]
    if unknown:
        raise _unknown(unknown)
    out = {s: {} for s in SECTIONS}
    for section, keys in values.items():
        keys = {} if keys is None else keys
        if not isinstance(keys, dict):
            raise ValueError(f"{source}: section {section} must be a mapping of key: value, got {keys!r}")
        bad = [k for k in keys if k not in field_types(SECTIONS[section])]
        if bad:
            raise _unknown(bad, section)
        out[section].update(keys)
    return out


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything ``train`` needs, in five sections (each validated when built; see the module docstring).

    Args:
        model: the network (:class:`~deeplab_keras.models.config.ModelConfig`).
        data: datasets and input pipeline (:class:`DataConfig`).
        schedule: steps, epochs, checkpoints, validation (:class:`ScheduleConfig`).
        optimizer: initial weights, learning rates, weight decay, batch norm, loss (:class:`OptimizerConfig`).
        runtime: run directory, seed, precision, distribution, logging (:class:`RuntimeConfig`).

    Example:
        >>> cfg = TrainConfig.from_dict({"schedule": {"steps": 100, "steps_per_epoch": 50}})
        >>> cfg.schedule.epochs, cfg.learning_rate, cfg.to_dict()["data"]["crop_size"]
        (2, 0.00025, [321, 321])
    """

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)

    def __post_init__(self):
        for section, cls in SECTIONS.items():
            if not isinstance(getattr(self, section), cls):
                raise ValueError(f"TrainConfig.{section} must be a {cls.__name__}, got "
                                 f"{type(getattr(self, section)).__name__} (TrainConfig.from_dict takes mappings)")
        if self.model.num_classes > 255:
            raise ValueError(f"model.num_classes must be an integer in 1..255 (labels are uint8), got "
                             f"{self.model.num_classes!r}")
        if self.data.dataset == "voc" and self.model.num_classes < 21:
            raise ValueError(f"model.num_classes={self.model.num_classes} but data.dataset voc has 21 classes (labels "
                             "0..20); --set model.num_classes=21")

    @property
    def learning_rate(self):
        """The base learning rate: ``optimizer.base_lr``, or the paper's for the backbone when it is null."""
        return self.optimizer.learning_rate(self.model.backbone)

    def to_dict(self):
        """{section: {key: value}} in plain YAML / JSON types (what the run directory's config.yaml holds)."""
        return {section: getattr(self, section).to_dict() for section in SECTIONS}

    def to_yaml(self):
        """The nested YAML text of :meth:`to_dict` (what ``--print-config`` prints and config.yaml holds)."""
        import yaml

        class Dumper(yaml.SafeDumper):  # sections as blocks, lists on one line ([321, 321])
            pass

        Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
        return yaml.dump(self.to_dict(), Dumper=Dumper, sort_keys=False)

    @classmethod
    def from_dict(cls, values, source="config"):
        """A config from a nested mapping (or one in 0.1's flat layout); missing keys take their defaults.

        Raises:
            ValueError: an unknown section or key (listing the valid ones), or a bad value (naming
                ``section.key``).
        """
        sections = {}
        for section, keys in _nested(values, source).items():
            types = field_types(SECTIONS[section])
            typed = {k: coerce(v, types[k], f"{section}.{k}") for k, v in keys.items()}
            sections[section] = SECTIONS[section].from_dict(typed)
        return cls(**sections)

    def with_overrides(self, overrides=None, data=None):
        """A copy with ``overrides`` and ``data`` applied (as :func:`load_config` does)."""
        return TrainConfig.from_dict(_merge(self.to_dict(), overrides, data))


def _merge(values, overrides=None, data=None):
    """{section: {key: value}} ``values`` with ``overrides`` ("section.key=value" strings or a nested dict) and
    ``--data`` (:meth:`DataConfig.fields_for`) applied."""
    if isinstance(overrides, dict):
        for section, keys in _nested(overrides, "overrides", allow_flat=False).items():
            values[section].update(keys)
    else:
        for item in overrides or ():
            section, key, value = _parse_override(item)
            values[section][key] = value
    if data is not None:
        voc_config = values["data"].get("voc_config", DataConfig.voc_config)
        values["data"].update(DataConfig.fields_for(data, voc_config=voc_config))
    return values


def _parse_override(item):
    """("section", "key", typed value) of a "section.key=value" string."""
    name, sep, text = str(item).partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot:
        hint = suggest_key(section if not dot else name)
        raise ValueError(f"override {item!r} must look like section.key=value"
                         + (f" (e.g. {hint}={text or 'VALUE'})" if hint else ""))
    if section not in SECTIONS:
        raise _unknown([section])
    types = field_types(SECTIONS[section])
    if key not in types:
        raise _unknown([key], section)
    return section, key, parse_value(text, types[key], f"{section}.{key}")


def packaged_configs():
    """Names of the configs packaged in ``deeplab_keras/configs`` (found with importlib.resources)."""
    folder = importlib.resources.files("deeplab_keras") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


MAX_CONFIG_BYTES = 64 << 10  # a config is a few KB; a larger file is refused before parsing (PyYAML: ~20 s per MB)
MAX_ERROR_CHARS = 300  # config error lines are cut here (a value in the message may be huge)
MAX_NESTING = 50  # YAML levels (a config uses 3)


def _read_yaml(path_or_name):
    """(values, where) of a YAML file, or of a packaged config by name (at most :data:`MAX_CONFIG_BYTES`, no
    aliases: a few bytes of nested aliases expand to gigabytes)."""
    path = str(path_or_name)
    if os.path.exists(path):
        resource, where = None, path
    else:
        name = path[:-5] if path.endswith(".yaml") else path
        if name not in packaged_configs():
            raise ValueError(f"config file {path[:200]!r} not found (packaged configs: {packaged_configs()})")
        resource = importlib.resources.files("deeplab_keras") / "configs" / f"{name}.yaml"
        where = f"packaged config {name}"
    with (resource.open("rb") if resource is not None else open(path, "rb")) as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f"config file {path!r} is over {MAX_CONFIG_BYTES} bytes; a config is a short YAML file")
    return _safe_yaml(data, path) or {}, where


def _safe_yaml(data, path):
    """``yaml.safe_load`` of ``data`` refusing aliases and nesting over :data:`MAX_NESTING`; errors are one short
    line."""
    import yaml

    def too_deep():
        return ValueError(f"config file {path!r} line {loader.line + 1}: nested deeper than {MAX_NESTING} levels; a "
                          "config is a few sections of keys")

    class Loader(yaml.SafeLoader):  # the depth is checked while scanning (PyYAML's scanner is quadratic in it)
        def fetch_flow_collection_start(self, token_class):
            if self.flow_level >= MAX_NESTING:
                raise too_deep()
            super().fetch_flow_collection_start(token_class)

        def add_indent(self, column):
            if len(self.indents) >= MAX_NESTING:
                raise too_deep()
            return super().add_indent(column)

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise ValueError(f"config file {path!r} line {mark.line + 1}: YAML aliases (*name) are not "
                                 "supported; write the value out")
            return super().compose_node(parent, index)

    loader = Loader(data)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path!r} is not valid YAML: {' '.join(str(e).split())[:200]}") from None
    finally:
        loader.dispose()


def load_config(path_or_packaged_name=None, overrides=None, data=None):
    """Reads a YAML config and applies ``overrides`` and ``data``.

    Args:
        path_or_packaged_name: a YAML file (nested layout, or 0.1's flat one), a packaged config name
            ("voc_resnet101_aspp_l", "voc_vgg16_largefov", "tiny_cpu"), or None for the defaults.
        overrides: "section.key=value" strings (``--set``; typed by the field) or a nested dict.
        data: the CLIs' ``--data PATH|synthetic`` (see :meth:`DataConfig.fields_for`), applied last.

    Returns:
        TrainConfig.

    Raises:
        ValueError: a missing or invalid file, an unknown section / key, or a bad value (one line naming it).
    """
    try:
        values, where = ({}, "defaults") if path_or_packaged_name is None else _read_yaml(path_or_packaged_name)
        return TrainConfig.from_dict(_merge(_nested(values, where), overrides, data), where)
    except ValueError as err:
        text = " ".join(str(err).split())
        if len(text) <= MAX_ERROR_CHARS:
            raise
        more = f" ... ({len(text)} characters in all)"
        raise ValueError(text[:MAX_ERROR_CHARS - len(more)] + more) from None


def _as_config(config):
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, dict):
        return TrainConfig.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return load_config(config)
    raise TypeError(f"config must be a TrainConfig, a dict or a YAML path, got {type(config).__name__}")
