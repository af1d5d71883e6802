"""Code-execution reward: run the generated code against tests in the sandbox.

The code is the last fenced block of the final model turn (```` ```python ... ``` ````, else
any ```` ``` ```` block, else the whole text). The tests come from ``metadata["tests"]`` (a
list of Python snippets, e.g. ``"assert add(2, 3) == 5"``, or one snippet), else from
``metadata["label"]`` (one snippet). Everything runs in ONE sandboxed process
(`rewards.sandbox.Sandbox`: CPU, memory, wall-clock limits, no network, temp dir): the
solution is executed as module ``solution``, then each test in the solution's namespace.

Result: ``{"pass_rate": passed / total, "ran": 1.0 if the solution itself executed}``; the
scalar is ``pass_rate`` (the main key). A timeout, crash or limit gives pass_rate 0.

The harness reports its verdict on stdout behind a per-run random nonce it reads from stdin
before the solution runs, so printing a fake verdict does not work; code that deliberately
inspects the harness's frames could still forge it (the sandbox is a resource and network
barrier, not a defence against reward hacking by introspection).
"""

from __future__ import annotations

import json
import re
import secrets

from buffer.episode import Episode
from rewards.protocol import RewardInputError, final_text
from rewards.sandbox import Sandbox

_VERDICT = "__physarum_verdict__"
_FENCED = re.compile(r"```[ \t]*(?:python|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_ANY_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)

_HARNESS = """\
import json, sys
class _Discard:
    def write(self, text):
        return len(text)
    def flush(self):
        pass
def _run(tests):
    nonce = sys.stdin.readline().strip()
    sys.stdout = _Discard()  # the solution's prints must not push the verdict out of the cap
    namespace = {"__name__": "solution"}
    passed, ran = 0, 0
    try:
        with open("solution.py", encoding="utf-8") as handle:
            source = handle.read()
        exec(compile(source, "solution.py", "exec"), namespace)
        ran = 1
    except BaseException as exc:
        print(f"solution failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    if ran:
        for index, test in enumerate(tests):
            try:
                exec(compile(test, f"test_{index}", "exec"), namespace)
                passed += 1
            except BaseException as exc:
                print(f"test {index} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    sys.__stdout__.write(f"\\n%s {nonce} {passed} {ran}\\n")
    sys.__stdout__.flush()
_run(json.loads(%r))
"""


def extract_code(text: str) -> str:
    """The last ```python block, else the last ``` block, else the text itself."""
    for pattern in (_FENCED, _ANY_FENCE):
        blocks = pattern.findall(text)
        if blocks:
            return blocks[-1]
    return text


def _tests(episode: Episode) -> list[str]:
    raw = episode.metadata.get("tests", episode.metadata.get("label"))
    if isinstance(raw, str) and raw.strip():
        return [raw]
    if isinstance(raw, list) and raw and all(isinstance(t, str) for t in raw):
        return list(raw)
    raise RewardInputError(
        "metadata['tests'] (a list of Python snippets) or metadata['label'] (one snippet) is "
        f"required, got {raw!r}"
    )


class CodeTestsReward:
    """Sandboxed test execution; args are the sandbox limits (see `rewards.sandbox`)."""

    reward_main_key = "pass_rate"

    def __init__(
        self,
        *,
        cpu_s: int = 5,
        memory_mb: int = 512,
        wall_s: float = 10.0,
        use_unshare: bool | None = None,
    ) -> None:
        self.sandbox = Sandbox(
            cpu_s=cpu_s, memory_mb=memory_mb, wall_s=wall_s, use_unshare=use_unshare
        )

    async def __call__(self, episode: Episode) -> dict[str, float]:
        tests = _tests(episode)
        code = extract_code(final_text(episode))
        nonce = secrets.token_hex(16)
        harness = _HARNESS % (_VERDICT, json.dumps(tests))
        result = await self.sandbox.run(harness, stdin=nonce + "\n", files={"solution.py": code})
        passed, ran = 0, 0
        for line in reversed(result.stdout.splitlines()):
            parts = line.split()
            if len(parts) == 4 and parts[0] == _VERDICT and parts[1] == nonce:
                passed, ran = int(parts[2]), int(parts[3])
                break
        return {"pass_rate": passed / len(tests), "ran": float(ran)}
