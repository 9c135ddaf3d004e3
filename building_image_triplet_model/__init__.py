"""Preprocessing for the building-image triplet model."""
