"""Data for deeplab_keras: one registry of datasets (:func:`load_dataset`, :func:`dataset_info`: VOC 2012 (+ SBD
aug) through TFDS, Cityscapes, PASCAL-Context, PASCAL-Person-Part, COCO-Stuff, folder datasets, synthetic data), the
tf.data training / evaluation pipeline, and the packaged sample data (:func:`sample_data_dir`: a few real VOC
2012 pairs).

Every source yields dicts ``{"image": uint8 [H, W, 3], "label": uint8 [H, W], "file_name": string}``
(labels are class indices, 255 = ignore); :func:`make_pipeline` turns them into batches of
``(image float32 [B, h, w, 3] RGB 0..255, label uint8 [B, h, w])``.

Importing this package registers the TFDS builder ``voc2012_segmentation`` (configs ``voc`` and ``aug``).

Example:
    >>> from deeplab_keras import data
    >>> ds = data.make_synthetic(8, size=(65, 65), num_classes=4)
    >>> batches = data.make_pipeline(ds, training=True, batch_size=2, crop_size=(49, 49), seed=0)
"""
import deeplab_keras.data.synthetic as synthetic  # public as data.synthetic (not a self-import of the package)
from deeplab_keras.data._common import BadDataError
from deeplab_keras.data.classes import VOC_CLASSES, voc_palette
from deeplab_keras.data.datasets import DATASET_NAMES, DatasetInfo, dataset_info, detect_dataset, load_dataset
from deeplab_keras.data.folder import folder_dataset, read_class_names, read_colour_table
from deeplab_keras.data.packaged import sample_data_dir
from deeplab_keras.data.pipeline import distributed_pipeline, make_pipeline
from deeplab_keras.data.synthetic import make_synthetic, write_synthetic_folder
from deeplab_keras.data.voc import Voc2012Segmentation, load_voc

__all__ = ["load_dataset", "dataset_info", "detect_dataset", "DATASET_NAMES", "DatasetInfo", "read_colour_table",
           "load_voc", "folder_dataset", "read_class_names", "make_pipeline", "distributed_pipeline",
           "make_synthetic", "write_synthetic_folder", "synthetic", "Voc2012Segmentation", "VOC_CLASSES",
           "voc_palette", "BadDataError", "sample_data_dir"]
