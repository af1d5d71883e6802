"""The live dashboard of a real RL job, opened in headless Chromium (selenium + chromedriver).

The job runs in a thread; the test paces it (the driver waits after each logged step until
the test lets it go on), so the page is seen growing while the job is alive without any
timing assumption. Checks: the charts get points and their series grow step by step, a
number on the page equals /api/metrics, a request without the token gets 401. The page's
screenshot is saved under the test's tmp dir (docs/dashboard.png is one of these).
Where wandb is installed, the same job also logs to W&B offline, read back against
metrics.jsonl (one real job for both: each costs a Ray start-up).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

try:
    import wandb  # noqa: F401

    WANDB = ["logging.wandb.project=physarum-test", "logging.wandb.mode=offline"]
except ImportError:
    WANDB = []

from configs import load_job
from physarum.context import JobContext
from physarum.launch import execute

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (scripts/setup.sh installs them: "
    "apt-get install chromium chromium-driver)",
)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")

STEPS = 5
JOB = [
    "model.preset=glm4moe-tiny",
    "data.n_train=200",
    "data.n_eval=8",
    "rollout.n_samples_per_prompt=4",
    "rollout.prompts_per_lease=4",
    "rollout.eval.n_prompts=8",
    "rollout.eval.interval=2",
    "trainer.prompts_per_step=4",
    f"trainer.steps={STEPS}",
    "cluster.num_cpus=2",
    "rollout.request_timeout_s=120",
    "checkpoint.save_hf=false",
]
WAIT_S = 180.0  # a loaded 2-core CI machine; never reached when things work


class Pacer:
    """Holds the job's driver after each logged step until the test calls `step()`."""

    def __init__(self) -> None:
        self._gate = threading.Semaphore(0)
        self.free = False

    def wrap(self, log: Callable[..., None]) -> Callable[..., None]:
        def paced(ctx: JobContext, step: int, version: int, metrics: dict[str, Any]) -> None:
            log(ctx, step, version, metrics)
            if not self.free and not self._gate.acquire(timeout=WAIT_S):
                raise TimeoutError("the browser test never let the job go on")

        return paced

    def step(self) -> None:
        self._gate.release()

    def release_all(self) -> None:
        self.free = True
        self._gate.release()


def wait_for(what: str, check: Callable[[], Any], page: Any, job: dict[str, Any]) -> Any:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if "error" in job:
            raise AssertionError(f"the job failed while waiting for {what}") from job["error"]
        value = check()
        if value:
            return value
        time.sleep(0.2)
    footer = snapshot(page).get("footer") if page is not None else ""
    raise AssertionError(f"timed out waiting for {what} (page footer: {footer!r})")


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """Headless Chromium, opened once the job is up (not to compete with its start-up)."""
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,2000")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(WAIT_S)  # a loaded machine starves the browser
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


# One read of everything the test looks at, in one JS turn: the page redraws every second,
# so elements found in one WebDriver call may be gone by the next (stale references).
SNAPSHOT_JS = """
const q = (sel) => [...document.querySelectorAll(sel)];
return {
  points: Object.fromEntries(q('path[data-series]').map(
    (p) => [p.dataset.series, Number(p.dataset.points)])),
  tiles: Object.fromEntries(q('[data-metric]').map(
    (t) => [t.dataset.metric, [t.textContent, Number(t.dataset.step)]])),
  phases: q('[data-chart="phases"] rect[data-phase]').length,
  services: Object.fromEntries(q('#services tr[data-service]').map(
    (r) => [r.dataset.service, r.textContent])),
  buffer: Object.fromEntries(q('[data-buffer]').map((c) => [c.dataset.buffer, c.textContent])),
  footer: document.getElementById('footer').textContent,
};
"""


def snapshot(page: Any) -> dict[str, Any]:
    from selenium.common.exceptions import TimeoutException

    try:
        return page.execute_script(SNAPSHOT_JS)
    except TimeoutException:  # a browser starved of CPU: ask again
        return {"points": {}, "tiles": {}, "phases": 0, "services": {}, "buffer": {}}


def points(page: Any, series: str) -> int:
    return snapshot(page)["points"].get(series, 0)


def test_dashboard_in_chromium_follows_a_live_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pacer = Pacer()
    monkeypatch.setattr(JobContext, "log", pacer.wrap(JobContext.log))
    run_dir = tmp_path / "run"
    job = load_job(Path("configs/toy_grpo.yaml"), [f"run_dir={run_dir}", *JOB, *WANDB])
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = execute(job)
        except BaseException as exc:  # surfaced by the test below
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="job", daemon=True)
    thread.start()
    with contextlib.ExitStack() as stack:
        stack.callback(thread.join, WAIT_S)
        stack.callback(pacer.release_all)  # first: the job finishes, then it is joined
        info_path = run_dir / "dashboard.json"
        wait_for("dashboard.json", info_path.exists, None, outcome)
        info = json.loads(info_path.read_text())
        base, token = info["base_url"], info["token"]

        # no token, a wrong token: 401, on the page and on the API alike
        for path in ("", "api/metrics", "api/status"):
            assert httpx.get(base + path).status_code == 401
            assert httpx.get(base + path, params={"token": "x" + token}).status_code == 401

        browser = stack.enter_context(chromium())
        browser.get(info["url"])
        # step 0's eval is logged first: the accuracy chart gets its first point
        first_eval = lambda: points(browser, "eval/accuracy") >= 1  # noqa: E731
        wait_for("the first accuracy point", first_eval, browser, outcome)
        seen = []
        for step in range(1, STEPS):
            pacer.step()  # the job runs one more step, logs it, and waits again
            grown = lambda s=step: points(browser, "reward") >= s  # noqa: E731
            wait_for(f"step {step}", grown, browser, outcome)
            seen.append(points(browser, "reward"))
        assert seen == list(range(1, STEPS))  # the series grew one point per step

        # the job is held after step STEPS-1: page and API are still
        api = httpx.get(base + "api/metrics", params={"token": token}).json()
        last = [r for r in api if r.get("reward") is not None][-1]
        # the tables come after the charts in a page update: wait for the one of this step
        trainer_row = lambda: snapshot(browser)["services"].get("trainer-0", "")  # noqa: E731
        wait_for("the services table", lambda: f"v{STEPS - 1}" in trainer_row(), browser, outcome)
        page = snapshot(browser)
        text, step = page["tiles"]["reward"]
        assert step == last["step"] == STEPS - 1
        assert float(text) == pytest.approx(last["reward"], rel=5e-3, abs=1e-9)  # 3-4 digits
        text, step = page["tiles"]["train/tokens_per_s"]
        assert float(text) == pytest.approx(last["train/tokens_per_s"], abs=0.5)
        assert page["points"]["train/entropy"] == STEPS - 1
        evals = [r for r in api if r.get("eval/accuracy") is not None]
        assert page["points"]["eval/accuracy"] == len(evals)
        assert page["phases"] == 4 * (STEPS - 1)  # wait, prep, optimizer, the rest, per step
        services = page["services"]
        assert {"driver-0", "buffer-0", "trainer-0", "rollout-0"} <= set(services)
        assert "up" in services["trainer-0"] and "up" in services["rollout-0"]
        assert int(page["buffer"]["prompts_queued"]) >= 0
        shot = tmp_path / "dashboard.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"]["steps"] == STEPS
    assert not (run_dir / "dashboard.json").exists()  # removed when the job stopped
    if WANDB:
        from tests.physarum.test_wandb import assert_wandb_matches_jsonl

        assert assert_wandb_matches_jsonl(run_dir) == STEPS + 2  # step 0's eval, the final eval
