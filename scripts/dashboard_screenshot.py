"""Screenshot a live job's dashboard in headless Chromium once the job is past a step.

    python scripts/dashboard_screenshot.py RUN_DIR MIN_STEP OUT.png

docs/dashboard.png came from it, taken at step 69 of
    physarum run configs/toy_grpo.yaml --set model.path=RS_HF --set tokenizer.path=RS_HF \
        --set trainer.steps=80 --set rollout.eval.interval=10 --set rollout.eval.n_prompts=100
with RS_HF the rejection-sampling model of `make demo` (runs/demo/rejection_sampling/hf).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service


def main(run_dir: Path, min_step: int, out: Path) -> None:
    info_path = run_dir / "dashboard.json"
    while not info_path.exists():  # written once the dashboard serves
        time.sleep(1)
    info = json.loads(info_path.read_text())
    status = info["base_url"] + "api/status"
    while httpx.get(status, params={"token": info["token"]}).json()["step"] < min_step:
        time.sleep(1)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,2000")
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(info["url"])
        time.sleep(4)  # a few polls: every chart and table filled
        driver.save_screenshot(str(out))
    finally:
        driver.quit()
    print(f"saved {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
