"""vlminterp_utils: the engine of the executable book "How vision-language models see"."""
__version__ = "0.1.0"
