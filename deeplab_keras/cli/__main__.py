"""``python -m deeplab_keras.cli COMMAND ...``: the same as ``deeplab COMMAND ...``."""
import sys

from deeplab_keras.cli import main

sys.exit(main())
