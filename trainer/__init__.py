"""Physarum trainer package."""
