"""Service logs: each service's rotated file in run_dir/logs, and a failed service named on the
console with its log path (from the error texts Ray 2.60 raises in the driver)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from physarum.logs import (
    ServiceFileHandler,
    explain_service_error,
    report_service_error,
    setup_service_logging,
)

# Copied from what Ray 2.60 raised here: an actor method that raised, and an actor whose
# process died (os._exit in a method). Ray colours the frame even in a pipe.
TASK_ERROR = (
    "\x1b[36mray::TrainerActor.rl_step()\x1b[39m (pid=8726, ip=192.0.2.2, "
    "actor_id=68a3c4b2fbc5253885eadb4201000000, repr=<TrainerActor object at 0x7f>)\n"
    '  File "trainer/service.py", line 6, in rl_step\nValueError: boom'
)
ACTOR_DIED = (
    "The actor died unexpectedly before finishing this task.\n\tclass_name: RolloutActor\n"
    "\tactor_id: 1abe32bcc5a4cbb3e183e6c501000000\n\tpid: 10726\n"
    "\tnamespace: 85d7c109\n\tip: 192.0.2.3\nThe actor is dead because its worker process died."
)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    rows = [
        {"role": "driver", "rank": 0, "pid": 1, "node_ip": "192.0.2.2"},
        {"role": "trainer", "rank": 1, "pid": 8726, "node_ip": "192.0.2.2"},
        {"role": "rollout", "rank": 3, "pid": 10726, "node_ip": "192.0.2.3"},
    ]
    (tmp_path / "placement.json").write_text(json.dumps(rows))
    return tmp_path


def test_a_failed_actor_is_named_with_its_log(run_dir: Path) -> None:
    assert explain_service_error(RuntimeError(TASK_ERROR), run_dir) == (
        f"service trainer-1 failed; its log: {run_dir}/logs/trainer-1.log"
    )
    assert explain_service_error(RuntimeError(ACTOR_DIED), run_dir) == (
        f"service rollout-3 failed; its log: {run_dir}/logs/rollout-3.log"
    )
    # a replacement worker that placement.json does not list yet: the role's logs
    unknown = ACTOR_DIED.replace("pid: 10726", "pid: 999")
    assert explain_service_error(RuntimeError(unknown), run_dir) == (
        f"service rollout (pid 999, 192.0.2.3) failed; its log: {run_dir}/logs/rollout-*.log"
    )
    assert explain_service_error(ValueError("trainer.lr: must be > 0"), run_dir) is None


def test_report_adds_the_line_to_the_console_and_the_traceback(run_dir: Path, caplog) -> None:
    exc = RuntimeError(TASK_ERROR)
    with caplog.at_level(logging.ERROR, logger="physarum"):
        report_service_error(exc, run_dir)
    assert "service trainer-1 failed; its log:" in caplog.text
    assert exc.__notes__ == [f"service trainer-1 failed; its log: {run_dir}/logs/trainer-1.log"]


def test_service_log_file_is_tagged_and_rotated(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("physarum.logs.MAX_BYTES", 2000)
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    try:
        path = setup_service_logging(tmp_path, "rollout-0", "INFO")
        setup_service_logging(tmp_path, "rollout-0", "INFO")  # again: one file handler, not two
        assert sum(isinstance(h, ServiceFileHandler) for h in root.handlers) == 1
        for i in range(100):
            logging.getLogger("rollout.worker").info("episode group %d pushed", i)
        logging.getLogger("rollout.worker").debug("below the level: not written")
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)
    assert path == tmp_path / "logs" / "rollout-0.log"
    last = path.read_text().splitlines()[-1]
    assert "[rollout-0 pid=" in last and "rollout.worker: episode group 99 pushed" in last
    assert (tmp_path / "logs" / "rollout-0.log.1").exists()  # rotated at MAX_BYTES
    assert not (tmp_path / "logs" / "rollout-0.log.4").exists()  # BACKUPS = 3
    assert "below the level" not in "".join(p.read_text() for p in path.parent.iterdir())
