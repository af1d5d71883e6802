"""Physarum rollout package."""
