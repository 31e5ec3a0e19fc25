"""Install deeplab_keras; builds the dense-CRF custom op from source against the installed TensorFlow.

Install with ``pip install --no-build-isolation -e .`` (or without ``-e``) after ``pip install -r
requirements.txt``: the op is compiled with the flags of the TensorFlow that is already installed, so the build
must see it (hence ``--no-build-isolation``).
"""
import importlib.util
import os

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildCRFOp(build_ext):
    """Compiles deeplab_keras/crf/*.cc into the op library with g++ and tf.sysconfig flags."""

    def build_extension(self, ext):
        spec = importlib.util.spec_from_file_location(
            "_dk_build_op", os.path.join(HERE, "deeplab_keras", "crf", "build_op.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        module.build(out_path=out, verbose=True)


packages = find_packages(include=["deeplab_keras", "deeplab_keras.*"])
packages += ["deeplab_keras.export"]

setup(
    name="deeplab_keras",
    version="0.1.0",
    description="DeepLab v2 (atrous ResNet/VGG, ASPP, MSC, dense CRF op) for TensorFlow / Keras 3",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"deeplab_keras.export": "export"},
    package_data={"deeplab_keras.crf": ["*.cc", "*.h"], "deeplab_keras": ["configs/*.yaml"],
                  "deeplab_keras.data": ["samples/README.txt", "samples/VOC2012/*/*.*",
                                         "samples/VOC2012/ImageSets/Segmentation/*.txt"]},
    ext_modules=[Extension("deeplab_keras.crf._dense_crf_op", sources=[])],
    cmdclass={"build_ext": BuildCRFOp},
    install_requires=[line.split("#")[0].strip() for line in open(os.path.join(HERE, "requirements.txt"))
                      if line.split("#")[0].strip()],
    entry_points={"console_scripts": [
        "deeplab=deeplab_keras.cli:main",  # deeplab {train,eval,predict,export,convert,demo}
        "deeplab-train=deeplab_keras.cli:train_main",  # the same commands with the sub-command preselected
        "deeplab-eval=deeplab_keras.cli:eval_main",
        "deeplab-predict=deeplab_keras.cli:predict_main",
        "deeplab-export=deeplab_keras.cli:export_main",
        "deeplab-demo=deeplab_keras.cli:demo_main",
        "deeplab-convert=deeplab_keras.cli:convert_main",
    ]},
)
