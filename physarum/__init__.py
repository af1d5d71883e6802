"""Physarum physarum package."""
