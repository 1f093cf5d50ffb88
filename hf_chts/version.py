"""The package version, in one place (``hf_chts.__version__``, ``hf-chts --version``)."""

__version__ = "0.1.0"
