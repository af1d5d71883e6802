"""Physarum models package."""
