"""lazymerge: evaluate and serve merged language models without materializing them."""

__version__ = "0.1.0"
