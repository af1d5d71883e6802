"""The embedded rollout engine: continuous batching over static KV slots, in-process."""

from rollout.embedded.engine import EmbeddedEngine, EngineBusyError, EngineStoppedError

__all__ = ["EmbeddedEngine", "EngineBusyError", "EngineStoppedError"]
