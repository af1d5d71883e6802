"""Physarum rewards package."""
