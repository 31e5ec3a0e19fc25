"""Applications built on the library (not imported by it): :mod:`deeplab_keras.apps.demo`, the end-to-end demo
behind ``deeplab demo``."""
