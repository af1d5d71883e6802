"""The Python tool environment: the model runs code in `rewards.sandbox` and reads its output.

Tool ``python(code)``: the code runs as a script in a fresh sandboxed process (CPU, memory
and wall-clock limits, no network, temp dir; see `rewards.sandbox`); the observation is its
stdout, then, when it failed, the tail of stderr and the reason ("exit status 1",
"killed: cpu_limit", "timed out after 10s"). The episode is done when the model answers
without a tool call. The environment gives no reward of its own: score the answer with
reward plugins (e.g. ``numeric`` or ``exact`` on the final turn).

`PythonSandboxEnv.factory(**limits)` builds (and probes) one `Sandbox` shared by every
episode's environment; a Sandbox holds only its limits, so sharing it is safe.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from envs.base import StepResult, row_messages
from envs.toolbox import Tool, ToolBox
from rewards.sandbox import Sandbox

PYTHON_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "python",
        "description": "Run a Python script and return what it prints (no network).",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "the script to run"}},
            "required": ["code"],
        },
    },
}
_STDERR_TAIL = 800


def describe(result: Any) -> str:
    """The observation for a `SandboxResult`: stdout, then stderr's tail and why it failed."""
    parts = [result.stdout.rstrip("\n")] if result.stdout.strip() else []
    if result.status != "ok":
        if result.stderr.strip():
            parts.append(result.stderr.strip()[-_STDERR_TAIL:])
        reason = {
            "timeout": f"timed out after {result.duration_s:.0f}s",
            "error": f"exit status {result.returncode}",
        }.get(result.status, f"killed: {result.status}")
        parts.append(f"[{reason}]")
    return "\n".join(parts) if parts else "[no output]"


class PythonSandboxEnv:
    """One episode with a sandboxed Python tool (see module doc)."""

    def __init__(
        self,
        *,
        sandbox: Sandbox | None = None,
        max_calls: int = 2,
        max_observation_chars: int = 2000,
        **limits: Any,
    ) -> None:
        self.sandbox = sandbox if sandbox is not None else Sandbox(**limits)
        self.toolbox = ToolBox(
            [Tool(PYTHON_TOOL, self._run)],
            max_calls=max_calls,
            max_observation_chars=max_observation_chars,
        )
        self.tools: list[dict[str, Any]] | None = self.toolbox.schemas

    @classmethod
    def factory(
        cls, *, max_calls: int = 2, max_observation_chars: int = 2000, **limits: Any
    ) -> Callable[[], PythonSandboxEnv]:
        """Build the Sandbox once (args: cpu_s, memory_mb, wall_s, processes, allow_weak, ...)."""
        sandbox = Sandbox(**limits)

        def make() -> PythonSandboxEnv:
            return cls(
                sandbox=sandbox, max_calls=max_calls, max_observation_chars=max_observation_chars
            )

        return make

    def reset(self, task_row: Mapping[str, Any]) -> list[dict[str, Any]]:
        return row_messages(task_row)

    async def step(self, assistant_text: str) -> StepResult:
        turn = await self.toolbox.respond(assistant_text)
        if turn.answered:
            return StepResult(done=True)
        return StepResult(observations=turn.observations)

    async def _run(self, arguments: dict[str, Any]) -> str:
        return describe(await self.sandbox.run(str(arguments["code"])))
