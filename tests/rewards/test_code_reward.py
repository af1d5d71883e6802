"""The code reward: generated code runs against tests in the sandbox."""

from __future__ import annotations

import asyncio

import pytest

from rewards import sandbox as sandbox_module
from rewards.builtins.code import CodeTestsReward, extract_code
from rewards.composite import build_reward_fn
from rewards.registry import RewardSpec
from rewards.resolver import PluginError
from tests.rewards.conftest import episode_with

TESTS = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0", "assert add('a', 'b') == 'ab'"]


def reward(text: str, tests: list[str] | None = TESTS, **limits) -> dict[str, float]:
    metadata = {"tests": tests} if tests is not None else {"label": "assert add(1, 1) == 2"}
    return asyncio.run(CodeTestsReward(**limits)(episode_with(text, **metadata)))


def test_extract_code_prefers_the_last_python_block() -> None:
    text = "first\n```python\nx = 1\n```\nthen\n```py\nx = 2\n```\n"
    assert extract_code(text) == "x = 2\n"
    assert extract_code("```\ny = 3\n```") == "y = 3\n"
    assert extract_code("z = 4") == "z = 4"


@pytest.mark.parametrize(
    "solution, pass_rate, ran",
    [
        ("def add(a, b):\n    return a + b\n", 1.0, 1.0),
        ("def add(a, b):\n    return a + b if isinstance(a, int) else None\n", 2 / 3, 1.0),
        ("def add(a, b):\n    return 0\n", 1 / 3, 1.0),
        ("def add(a, b) return a + b", 0.0, 0.0),  # syntax error
        ("import sys\nsys.exit(0)\n", 0.0, 0.0),  # exiting early is not passing
    ],
)
def test_pass_rate(solution: str, pass_rate: float, ran: float) -> None:
    result = reward(f"Here you go:\n```python\n{solution}```")
    assert result == {"pass_rate": pytest.approx(pass_rate), "ran": ran}


def test_label_is_the_fallback_test() -> None:
    assert reward("def add(a, b):\n    return a + b\n", tests=None)["pass_rate"] == 1.0


def test_printing_a_fake_verdict_does_not_pass() -> None:
    forged = (
        "import sys\n"
        "sys.__stdout__.write('__physarum_verdict__ 0000 3 1\\n')\n"
        "def add(a, b):\n    return None\n"
    )
    assert reward(forged)["pass_rate"] == 0.0


def test_infinite_loop_scores_zero_within_the_limits() -> None:
    result = reward("def add(a, b):\n    while True:\n        pass\n", cpu_s=1, wall_s=20)
    assert result == {"pass_rate": 0.0, "ran": 1.0}  # the module ran; every call hit the limit
    assert reward("while True:\n    pass\n", cpu_s=1, wall_s=20) == {"pass_rate": 0.0, "ran": 0.0}


# Each of these scored 1.0 when the tests ran in the solution's own process.
FORGERIES = {
    "compile replaced, no function": (
        "import builtins\n_real = builtins.compile\n"
        "builtins.compile = lambda src, name, mode, *a, **k: _real('pass', name, mode)\n"
    ),
    "exec replaced": (
        "import builtins\nbuiltins.exec = lambda *a, **k: None\ndef add(a, b):\n    return None\n"
    ),
    "__eq__ always true": (
        "class Anything:\n    def __eq__(self, other):\n        return True\n"
        "def add(a, b):\n    return Anything()\n"
    ),
    "verdict on every fd": (
        "import os\n"
        "for fd in range(1, 20):\n"
        "    try:\n"
        '        os.write(fd, b\'{"verdict": [3, 1]}\\n{"ready": true}\\n\')\n'
        "    except OSError:\n"
        "        pass\n"
        "def add(a, b):\n    return None\n"
    ),
    "AssertionError silenced": (
        "import builtins\nbuiltins.AssertionError = type('Quiet', (Exception,), {})\n"
        "def add(a, b):\n    return None\n"
    ),
    "exit before the tests": "import os\nos._exit(0)\n",
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_the_solution_cannot_forge_the_verdict(name: str) -> None:
    assert reward(f"```python\n{FORGERIES[name]}```")["pass_rate"] == 0.0


def test_objects_calls_and_exceptions_cross_the_boundary() -> None:
    solution = (
        "class Stack:\n"
        "    def __init__(self):\n        self.items = []\n"
        "    def push(self, x):\n        self.items.append(x)\n"
        "    def pop(self):\n        return self.items.pop()\n"
        "    def __len__(self):\n        return len(self.items)\n"
        "LIMIT = 3\n"
        "def div(a, b):\n    return a / b\n"
    )
    tests = [
        "s = Stack()\ns.push(1)\ns.push([2, 'x'])\nassert len(s) == 2\n"
        "assert s.pop() == [2, 'x'] and s.items == [1]",
        "assert LIMIT == 3 and div(b=4, a=2) == 0.5",
        "try:\n    div(1, 0)\nexcept ZeroDivisionError:\n    pass\nelse:\n    raise AssertionError",
        "assert div(lambda: 1, 2)",  # a lambda cannot be passed: fails, with a TypeError
        "assert missing(1) == 1",  # NameError
        "from solution import div\nassert div(1, 4) == 0.25",
        "from solution import nothing",  # ImportError
    ]
    assert reward(solution, tests=tests) == {"pass_rate": pytest.approx(4 / 7), "ran": 1.0}


def test_through_reward_fn_with_main_key() -> None:
    episodes = [
        episode_with("def add(a, b):\n    return a + b\n", tests=TESTS),
        episode_with("def add(a, b):\n    return 0\n", tests=TESTS),
        episode_with("no tests here"),
    ]
    with build_reward_fn([RewardSpec("code", args={"cpu_s": 2})], timeout_s=30) as fn:
        asyncio.run(fn.score_group(episodes))
    assert episodes[0].reward == 1.0 and episodes[0].rewards["code/ran"] == 1.0
    assert episodes[1].reward == pytest.approx(1 / 3)
    assert episodes[2].is_error and "metadata['tests']" in episodes[2].metadata["error"]


def test_without_bwrap_the_reward_fails_at_start_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox_module, "bwrap_problem", lambda exe: "`bwrap` is not on PATH")
    with pytest.raises(PluginError) as info:
        build_reward_fn([RewardSpec("code", args={"cpu_s": 2})], timeout_s=30)
    message = str(info.value)
    assert "reward 'code'" in message and "`bwrap` is not on PATH" in message
    assert "apt-get install -y bubblewrap" in message and "allow_weak: true" in message
