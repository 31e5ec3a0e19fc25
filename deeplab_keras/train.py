"""Training DeepLab v2: the public face of :mod:`deeplab_keras.training` (the recipe, resume and run directory
are described there), kept as the import path of ``deeplab train``, the notebooks and user code.

Example:
    >>> from deeplab_keras import train as T
    >>> T.load_config("tiny_cpu", ["schedule.steps=20"]).schedule.steps
    20
    >>> result = T.train(T.load_config("tiny_cpu", ["runtime.run_dir=/tmp/run", "schedule.steps=20"]))  # doctest: +SKIP
"""
from deeplab_keras.training import *  # noqa: F401,F403  (the public names, __all__)
from deeplab_keras.training import __all__  # noqa: F401
