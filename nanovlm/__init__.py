"""nanovlm: a tiny vision-language model, built to be read, run on a CPU, and copied piece by piece."""

__version__ = "0.1.0"
