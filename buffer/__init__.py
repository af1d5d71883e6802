"""Physarum buffer package."""
