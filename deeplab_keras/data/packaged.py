"""The sample data packaged with deeplab_keras: 7 real PASCAL VOC 2012 image/label pairs (``samples/VOC2012``;
provenance and licence note in ``samples/README.txt``), the default data of ``deeplab-demo``.

Example:
    >>> import os
    >>> from deeplab_keras.data import sample_data_dir
    >>> sorted(os.listdir(os.path.join(sample_data_dir(), "VOC2012", "SegmentationClass")))
    ['2007_000032.png', '2007_000033.png', '2007_000063.png', '2008_000009.png', '2009_000006.png',
     '2010_000002.png', '2011_000003.png']
"""
import importlib.resources
import os


def sample_data_dir():
    """The folder holding the packaged ``VOC2012/`` (JPEGImages, SegmentationClass, ImageSets/Segmentation).

    Found with ``importlib.resources``, so it is the installed package's own folder (wheel or editable install),
    whatever the working directory. Usable wherever a folder holding ``VOC2012/`` is expected
    (``deeplab-demo --data``, ``demo.voc_crf_study``).

    Returns:
        str: path of a real folder.

    Raises:
        FileNotFoundError: the package was imported from an archive or installed without its package data.
    """
    folder = importlib.resources.files("deeplab_keras.data") / "samples"
    if not isinstance(folder, os.PathLike) or not os.path.isdir(os.path.join(folder, "VOC2012", "SegmentationClass")):
        raise FileNotFoundError(f"the packaged sample data is missing ({folder}/VOC2012 is not a folder: an install "
                                "without package data, or an import from an archive); pass a folder holding VOC2012/")
    return os.fspath(folder)
