"""Posterior: K parameter samples of one architecture, its HDF5 file and batched prediction."""

from .io import PosteriorFileError, load_posterior, save_posterior
from .posterior import Posterior

__all__ = ["Posterior", "PosteriorFileError", "load_posterior", "save_posterior"]
