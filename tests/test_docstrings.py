"""Every ``>>>`` example in the package's docstrings runs (doctest; ``# doctest: +SKIP`` marks the ones that need
user data, a download or minutes), so the examples users copy stay true."""
import doctest
import importlib
import pkgutil

import pytest

import deeplab_keras
import deeplab_keras.export


def _modules():
    names = [m.name for m in pkgutil.walk_packages(deeplab_keras.__path__, "deeplab_keras.")]
    # deeplab_keras.export lives in the repository's export/ (package_dir), outside deeplab_keras.__path__
    names += [m.name for m in pkgutil.walk_packages(deeplab_keras.export.__path__, "deeplab_keras.export.")]
    return sorted(n for n in set(names) if not n.endswith("__main__") and not n.endswith("_dense_crf_op"))


MODULES = _modules()


def test_the_walk_finds_the_package():
    assert {"deeplab_keras.models.deeplab", "deeplab_keras.export.driver", "deeplab_keras.crf.ops"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    failures = []
    for test in finder.find(module, name):
        result = runner.run(test, out=failures.append)
        assert result.failed == 0, f"{test.name}:\n" + "".join(failures)
