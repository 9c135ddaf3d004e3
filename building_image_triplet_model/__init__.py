"""Preprocessing for the building-image triplet model: 3D Street View archives in, one HDF5 artifact out.

Importing the package imports nothing heavy; torch and timm load only in the embedding step.
"""

__version__ = "0.1.0"
