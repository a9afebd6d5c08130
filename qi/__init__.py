"""qi: automated visual quality inspection with tuned, tracked, registered classifiers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("qi")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
