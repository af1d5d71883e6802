"""Physarum envs package."""
