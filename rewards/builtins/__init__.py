"""Built-in reward plugins; `rewards.registry.BUILTIN_REWARDS` maps their short names here."""
