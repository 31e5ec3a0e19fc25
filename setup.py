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


# Minor-version pins: the CRF op is compiled against TensorFlow's headers, and _keras_compat reaches private
# Keras APIs checked for one minor release.
MINOR_PINNED = ("tensorflow", "keras")


def install_requires():
    """requirements.txt's exact pins (the tested set) as compatible ranges: ``name==X.Y.Z`` becomes
    ``name>=X.Y.Z,<X+1`` (``<X.Y+1`` for MINOR_PINNED), so the package installs beside other libraries."""
    ranges = []
    for line in open(os.path.join(HERE, "requirements.txt")):
        requirement = line.split("#")[0].strip()
        if not requirement:
            continue
        name, _, version = requirement.partition("==")
        parts = [int(p) for p in version.split(".")[:2]]
        upper = f"{parts[0]}.{parts[1] + 1}" if name in MINOR_PINNED else f"{parts[0] + 1}"
        ranges.append(f"{name}>={version},<{upper}")
    return ranges


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
    install_requires=install_requires(),
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
