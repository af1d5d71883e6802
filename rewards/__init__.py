"""Reward plugins: the protocol (`protocol`), one resolver shared with envs (`resolver`),
resolution of reward specs (`registry`), the weighted, time-limited scorer (`composite`),
the code sandbox (`sandbox`, on bubblewrap: `bwrap`), the safe arithmetic evaluator
(`safe_eval`) and the built-ins (`builtins/`). See README.md for writing a plugin."""
