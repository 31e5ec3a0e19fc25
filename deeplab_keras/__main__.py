"""``python -m deeplab_keras COMMAND ...``: the ``deeplab`` command line (:func:`deeplab_keras.cli.main`)."""
import sys

from deeplab_keras.cli import main

sys.exit(main())
