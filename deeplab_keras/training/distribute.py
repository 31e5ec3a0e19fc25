"""Distribution strategies and the input streams: :func:`make_strategy`, the datasets a config names, the
seeded per-epoch training stream and :func:`distribute_stream` (exact per-replica slices of global batches).
"""
import os

import tensorflow as tf

from deeplab_keras.training.config import STRATEGIES, _as_config


def _split_cpu(n):
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    except RuntimeError as e:
        logical = tf.config.list_logical_devices("CPU")
        if len(logical) < n:
            raise RuntimeError(f"virtual_cpus={n}: TensorFlow is already initialised with {len(logical)} CPU "
                               "device(s); set virtual_cpus in a fresh process before any TF op runs") from e


def make_strategy(name="default", devices=None, tpu=None, virtual_cpus=0):
    """The ``tf.distribute`` strategy named by the config.

    Args:
        name: "default" (one device, no strategy), "one_device", "mirrored" (all local GPUs, or ``devices``),
            "multi_worker" (MultiWorkerMirroredStrategy; the cluster comes from the TF_CONFIG environment
            variable), "tpu" (TPUStrategy on ``tpu``).
        devices: device names for "mirrored" / "one_device".
        tpu: TPU name / grpc address (None: local).
        virtual_cpus: first split the CPU into this many logical devices (for tests on CPU).
    """
    if virtual_cpus:
        _split_cpu(int(virtual_cpus))
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(devices[0] if devices else
                                               (tf.config.list_logical_devices("GPU") or
                                                tf.config.list_logical_devices("CPU"))[0].name)
    if name == "mirrored":
        if devices is None and not tf.config.list_logical_devices("GPU"):
            cpus = tf.config.list_logical_devices("CPU")
            devices = [d.name for d in cpus] if len(cpus) > 1 else None
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("strategy 'multi_worker' reads the cluster from the TF_CONFIG environment variable, "
                             "which is not set")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")


def _is_chief(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0 and
                                              "chief" not in resolver.cluster_spec().as_dict())


def _task_id(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    return int(getattr(resolver, "task_id", 0) or 0) if resolver is not None else 0


def load_datasets(config):
    """The unbatched (train, validation) datasets of {"image", "label", "file_name"} a config names.

    Validation is None when ``schedule.validation_every`` is 0 (VOC, folder) or no ``data.val_folder`` is given.
    """
    return _raw_datasets(_as_config(config))


def _raw_datasets(cfg):
    from deeplab_keras import data

    d, validate = cfg.data, bool(cfg.schedule.validation_every)
    if d.dataset == "synthetic":
        from deeplab_keras.data import synthetic

        size, n = tuple(int(s) for s in d.synthetic_size), cfg.model.num_classes
        train = synthetic.make_synthetic(d.synthetic_images, size=size, num_classes=n, seed=cfg.runtime.seed)
        val = synthetic.make_synthetic(d.synthetic_val_images, size=size, num_classes=n,
                                       seed=cfg.runtime.seed + 1000003)
        return train, val
    if d.dataset == "voc":
        if not d.manual_dir and not d.data_dir:
            raise ValueError("data.dataset 'voc' needs data.manual_dir (the folder holding VOC2012/ and, for "
                             "data.voc_config 'aug', benchmark_RELEASE/) or a data.data_dir with the prepared "
                             "TFDS dataset")
        train = data.load_voc(d.train_split, config=d.voc_config, manual_dir=d.manual_dir, data_dir=d.data_dir)
        val = data.load_voc(d.val_split, config=d.voc_config, manual_dir=d.manual_dir,
                            data_dir=d.data_dir) if validate else None
        return train, val
    if d.dataset != "folder":  # a registry dataset read from data.root (data.load_dataset)
        return _registry_datasets(cfg, validate)
    if not d.folder:
        raise ValueError("data.dataset 'folder' needs data.folder: a directory with images/ and masks/")
    train = data.folder_dataset(d.folder)
    val = data.folder_dataset(d.val_folder) if d.val_folder and validate else None
    return train, val


def _registry_datasets(cfg, validate):
    """(train, val or None) of data.dataset cityscapes, pascal_context, person_part, cocostuff* under data.root;
    a model.num_classes other than the dataset's is a ValueError saying which to set."""
    from deeplab_keras import data

    d, info = cfg.data, data.dataset_info(cfg.data.dataset)
    if cfg.model.num_classes != info.num_classes:
        raise ValueError(f"model.num_classes={cfg.model.num_classes} but data.dataset {d.dataset} has "
                         f"{info.num_classes} classes; --set model.num_classes={info.num_classes}")
    if not d.root:
        raise ValueError(f"data.dataset {d.dataset!r} needs data.root (or --data): the folder holding "
                         f"{info.layout}")
    options = {"data_dir": d.data_dir} if d.dataset == "cityscapes" and d.data_dir else {}
    train = data.load_dataset(d.dataset, d.root, d.train_split, **options)
    return train, data.load_dataset(d.dataset, d.root, d.val_split, **options) if validate else None


def make_train_stream(raw, cfg, start_epoch=0, start_batch=0):
    """The training batches from batch ``start_batch`` of ``start_epoch`` to the end: epoch ``k`` is a pure
    function of (seed, k).

    Epoch ``k`` is ``deeplab_keras.data.make_pipeline(raw, training=True, repeat=True, seed=f(seed, k))``
    cut to ``schedule.steps_per_epoch`` batches (the pipeline's shuffle and augmentation are seeded per element), so
    a run resumed at epoch ``k`` sees exactly the batches an uninterrupted run sees from epoch ``k`` on.

    Args:
        raw: unbatched dataset of {"image" uint8 [H,W,3], "label" uint8 [H,W]} dicts.
        cfg: TrainConfig.
        start_epoch: first epoch to produce.
        start_batch: batches of ``start_epoch`` to skip (a run resumed inside an epoch).

    Returns:
        tf.data.Dataset of (images float32 [B,h,w,3], labels uint8 [B,h,w]) with global batches.
    """
    from deeplab_keras.data import make_pipeline

    d = cfg.data

    def epoch(k):  # k: int64 scalar tensor; the seed of epoch k is computed in the graph
        # This function's own graph-level seed (traced, so the process's global seed is untouched): the
        # stream then depends on runtime.seed only, and a global seed of 0 cannot trip tf's (0, 0) seed check.
        tf.random.set_seed(20160602)
        seed = (tf.constant(int(cfg.runtime.seed) * 1000003 + 17, tf.int64) + k * 7919) % (2 ** 31 - 1)
        return make_pipeline(raw, training=True, batch_size=d.batch_size, crop_size=_ints(d.crop_size),
                             scale_range=_floats(d.scale_range), flip=d.flip, ignore_label=d.ignore_label,
                             num_classes=cfg.model.num_classes, shuffle_buffer=d.shuffle_buffer, seed=seed,
                             repeat=True, prefetch=False).take(cfg.schedule.steps_per_epoch)

    # flat_map builds the pipeline graph once (not once per epoch) and instantiates it afresh for every
    # epoch and every iterator, so its seeded shuffle and augmentation restart identically each time
    # (iterating one dataset object twice would re-randomise it, and Keras opens an extra iterator under a
    # distribution strategy).
    stream = tf.data.Dataset.range(start_epoch, max(cfg.schedule.epochs, start_epoch)).flat_map(epoch)
    if start_batch:
        stream = stream.skip(start_batch)
    return _data_sharded(stream.prefetch(tf.data.AUTOTUNE))


def make_val_stream(raw, cfg):
    """Validation batches (no augmentation): full-size images when ``data.val_crop_size`` is None (batch 1)."""
    from deeplab_keras.data import make_pipeline

    d = cfg.data
    crop = _ints(d.val_crop_size) if d.val_crop_size else None
    ds = make_pipeline(raw, training=False, batch_size=d.val_batch_size, crop_size=crop,
                       ignore_label=d.ignore_label, num_classes=cfg.model.num_classes)
    if cfg.schedule.validation_steps:
        ds = ds.take(cfg.schedule.validation_steps)
    return _data_sharded(ds)


def _ints(values):
    return tuple(int(v) for v in values)


def _floats(values):
    return None if values is None else tuple(float(v) for v in values)


def _data_sharded(ds):
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options)


def distribute_stream(strategy, make_stream, global_batch):
    """Splits a stream of global batches between the replicas of ``strategy``, exactly and deterministically.

    Every input pipeline (one per worker) builds the same global stream with ``make_stream()`` and keeps its
    replicas' rows of each global batch: replica ``r`` gets rows ``[r * b, (r + 1) * b)`` with
    ``b = global_batch / replicas``. So a step sees the same global batch whatever the number of replicas.
    (``strategy.experimental_distribute_dataset`` rewrites the input graph, which was measured to change
    the seeded augmentation; this does not.)

    Args:
        strategy: the ``tf.distribute.Strategy``.
        make_stream: () -> dataset of (images [B,...], labels [B,...]) global batches.
        global_batch: B.

    Returns:
        the dataset itself for one replica, else a ``tf.distribute.DistributedDataset``.
    """
    replicas = strategy.num_replicas_in_sync
    if replicas == 1:
        return make_stream()
    if global_batch % replicas:
        raise ValueError(f"batch_size {global_batch} must be divisible by the number of replicas ({replicas})")
    per_replica = global_batch // replicas

    def dataset_fn(context):
        ds = make_stream()
        local = replicas // context.num_input_pipelines
        lo = context.input_pipeline_id * local * per_replica
        hi = lo + local * per_replica
        if context.num_input_pipelines > 1:
            ds = ds.map(lambda x, y: (x[lo:hi], y[lo:hi]))
        if local > 1:
            ds = ds.unbatch().batch(per_replica, drop_remainder=True)
        return _data_sharded(ds)

    return strategy.distribute_datasets_from_function(dataset_fn)
