"""Code-execution reward: run the generated code against tests, the verdict kept out of reach.

The code is the last fenced block of the final model turn (```` ```python ... ``` ````, else
any ```` ``` ```` block, else the whole text). The tests come from ``metadata["tests"]`` (a
list of Python snippets, e.g. ``"assert add(2, 3) == 5"``, or one snippet), else from
``metadata["label"]`` (one snippet).

Two sandboxes (`rewards.sandbox.Sandbox`), so that nothing the solution does can fake a pass:

* the *solution* sandbox executes the code as module ``solution``, then serves requests on
  its stdin/stdout: look a name up, get an attribute, call an object. A result that is a
  Python literal (numbers, strings, bytes, None, and lists, tuples, dicts, sets of them)
  goes back as its ``repr``; anything else as a handle to the object, which stays there.
* the *tests* sandbox runs each test snippet. Each global name a test uses that is not a
  builtin is looked up in the solution: literals become plain values, other objects become
  proxies whose calls, attributes, ``len``, indexing, iteration and ``in`` go to the
  solution. Results are parsed here with ``ast.literal_eval``, so they are plain data: an
  object with a rigged ``__eq__`` never crosses, and the comparison is done by this
  process's own, untouched builtins.
* this process relays the two and reads the verdict from the tests sandbox only; the
  solution cannot reach that channel (separate namespaces, no shared memory or files).

Arguments passed to the solution must be literals or solution objects (a test passing a
lambda fails with a TypeError saying so). A missing function is a NameError in the test.
Tests may also ``from solution import f``.

Result: ``{"pass_rate": passed / total, "ran": 1.0 if the solution itself executed}``; the
scalar is ``pass_rate`` (the main key). A timeout, crash or limit gives pass_rate 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re

from buffer.episode import Episode
from rewards.protocol import RewardInputError, final_text
from rewards.sandbox import Sandbox

_FENCED = re.compile(r"```[ \t]*(?:python|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_ANY_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)
_CRASHED = json.dumps({"error": "RuntimeError", "message": "the solution process ended"})

# Untrusted: runs the solution, then answers requests. It may lie; the tests side trusts
# nothing from it but parsed literals.
_SERVER = r"""
import ast, json, os, sys
reply = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)  # the solution's own prints go to stderr
handles = []
def send(message):
    reply.write(json.dumps(message) + "\n")
    reply.flush()
def encode(value):
    try:
        text = repr(value)
        if len(text) < 100_000 and ast.literal_eval(text) == value:
            return {"value": text}
    except Exception:
        pass
    handles.append(value)
    return {"handle": len(handles) - 1}
def decode(arg):
    return handles[arg["handle"]] if "handle" in arg else ast.literal_eval(arg["value"])
namespace = {"__name__": "solution"}
try:
    with open("solution.py", encoding="utf-8") as handle:
        exec(compile(handle.read(), "solution.py", "exec"), namespace)
except BaseException as exc:
    print(f"solution failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    send({"ready": False})
    sys.exit(0)
send({"ready": True})
special = {"len": len, "iter": list, "getitem": lambda o, k: o[k], "contains": lambda o, k: k in o}
for line in sys.stdin:
    request = json.loads(line)
    try:
        op = request["op"]
        target = namespace if request.get("obj") is None else handles[request["obj"]]
        if op == "lookup":
            if request["name"] not in namespace:
                send({"missing": True})
                continue
            result = namespace[request["name"]]
        elif op == "get":
            result = getattr(target, request["name"])
        elif op == "call":
            args = [decode(a) for a in request["args"]]
            kwargs = {k: decode(v) for k, v in request["kwargs"].items()}
            result = target(*args, **kwargs)
        else:
            result = special[op](target, *[decode(a) for a in request["args"]])
        send(encode(result))
    except BaseException as exc:
        send({"error": type(exc).__name__, "message": str(exc)[:2000]})
"""

# Trusted: runs the tests; asks the solution through this process (its stdin/stdout).
_TESTS = r"""
import ast, builtins, json, os, sys
channel = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)  # the tests' prints go to stderr
def ask(request):
    channel.write(json.dumps(request) + "\n")
    channel.flush()
    line = sys.stdin.readline()
    if not line:
        raise RuntimeError("no answer from the solution")
    return json.loads(line)
def encode(value):
    if isinstance(value, Remote):
        return {"handle": object.__getattribute__(value, "_handle")}
    text = repr(value)
    try:
        ast.literal_eval(text)
    except Exception:
        raise TypeError(f"cannot pass a {type(value).__name__} to the solution: only Python "
                        "literals and the solution's own objects cross the sandbox") from None
    return {"value": text}
def decode(answer):
    if "error" in answer:
        kind = getattr(builtins, str(answer["error"]), None)
        if not (isinstance(kind, type) and issubclass(kind, Exception)):
            kind = RuntimeError
        raise kind(f"{answer['error']} in the solution: {answer.get('message', '')}")
    if "handle" in answer:
        return Remote(int(answer["handle"]))
    return ast.literal_eval(answer["value"])
class Remote:
    __slots__ = ("_handle",)
    def __init__(self, handle):
        object.__setattr__(self, "_handle", handle)
    def _ask(self, op, *args, **kwargs):
        request = {"op": op, "obj": object.__getattribute__(self, "_handle")}
        return decode(ask({**request, **kwargs, "args": [encode(a) for a in args]}))
    def __call__(self, *args, **kwargs):
        kwargs = {k: encode(v) for k, v in kwargs.items()}
        return object.__getattribute__(self, "_ask")("call", *args, kwargs=kwargs)
    def __getattr__(self, name):
        return object.__getattribute__(self, "_ask")("get", name=name)
    def __len__(self):
        return object.__getattribute__(self, "_ask")("len")
    def __getitem__(self, key):
        return object.__getattribute__(self, "_ask")("getitem", key)
    def __contains__(self, key):
        return object.__getattribute__(self, "_ask")("contains", key)
    def __iter__(self):
        return iter(object.__getattribute__(self, "_ask")("iter"))
def lookup(name):
    answer = ask({"op": "lookup", "name": name})
    if answer.get("missing"):
        raise AttributeError(f"the solution defines no {name!r}")
    return decode(answer)
module = type(sys)("solution")  # `from solution import f` in a test works too
module.__getattr__ = lookup
sys.modules["solution"] = module
def names(code):
    found = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            found |= names(const)
    return found
def main(tests):
    ready = ask({"op": "ready"}).get("ready") is True
    passed = 0
    for index, test in enumerate(tests if ready else []):
        try:
            code = compile(test, f"test_{index}", "exec")
            namespace = {"__name__": "__test__"}
            for name in sorted(names(code) - set(dir(builtins)) - {"solution"}):
                try:
                    namespace[name] = lookup(name)
                except AttributeError:
                    pass  # not the solution's: the test's own name, or a NameError to come
            exec(code, namespace)
            passed += 1
        except BaseException as exc:
            print(f"test {index} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    channel.write(json.dumps({"verdict": [passed, int(ready)]}) + "\n")
    channel.flush()
main(json.loads(%r))
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
    """Sandboxed test execution; args are the sandbox's (see `rewards.sandbox.Sandbox`:
    cpu_s, memory_mb, wall_s, processes, allow_weak, ...), the same for both sandboxes."""

    reward_main_key = "pass_rate"

    def __init__(self, **sandbox_args: object) -> None:
        self.sandbox = Sandbox(**sandbox_args)  # type: ignore[arg-type]

    async def __call__(self, episode: Episode) -> dict[str, float]:
        tests = _tests(episode)
        code = extract_code(final_text(episode))
        passed, ran = 0, 0
        with contextlib.suppress(TimeoutError):
            passed, ran = await asyncio.wait_for(self._grade(code, tests), self.sandbox.wall_s)
        return {"pass_rate": passed / len(tests), "ran": float(ran)}

    async def _grade(self, code: str, tests: list[str]) -> tuple[int, int]:
        """Relay the tests sandbox's requests to the solution sandbox; return its verdict."""
        async with (
            self.sandbox.open(_SERVER, files={"solution.py": code}) as solution,
            self.sandbox.open(_TESTS % json.dumps(tests)) as grader,
        ):
            drains = [asyncio.ensure_future(_discard(p.stderr)) for p in (solution, grader)]
            try:
                while line := await grader.stdout.readline():
                    message = json.loads(line)
                    if "verdict" in message:
                        passed, ran = message["verdict"]
                        return int(passed), int(ran)
                    answer = await _answer(solution, None if message.get("op") == "ready" else line)
                    grader.stdin.write(answer.encode() + b"\n")
                    await grader.stdin.drain()
                return 0, 0  # the tests sandbox died (a limit): no verdict, no pass
            finally:
                for drain in drains:
                    drain.cancel()


async def _answer(solution: asyncio.subprocess.Process, request: bytes | None) -> str:
    """Send `request` (None: just read the "ready" message) and return the solution's reply
    line as it sent it: only the tests sandbox parses it."""
    try:
        if request is not None:
            solution.stdin.write(request)
            await solution.stdin.drain()
        line = await solution.stdout.readline()
    except (ValueError, ConnectionError):  # a reply over 1 MiB, or the solution is gone
        return _CRASHED
    text = line.decode("utf-8", "replace").strip()
    return text if text and "\n" not in text else _CRASHED


async def _discard(stream: asyncio.StreamReader | None) -> None:
    while stream is not None and await stream.read(65536):
        pass
