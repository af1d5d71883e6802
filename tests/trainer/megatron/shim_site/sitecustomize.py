"""TEST-ONLY: put this directory on PYTHONPATH (with the repo root) and set
PHYSARUM_MEGATRON_CPU_SHIM=1 to run the megatron backend on a CPU inside processes a test
does not start itself (Ray trainer actors of `physarum run`).

Python imports `sitecustomize` at start-up. This one installs nothing until the process first
imports `trainer.megatron.backend`; only then does it apply tests/trainer/megatron/cpu_shim.py,
so every other process (rollout workers, Ray's own) stays untouched. Production code never
sees this file.
"""

import os
import sys


class _InstallShimOnMegatronBackend:
    def find_spec(self, name, path=None, target=None):
        if name == "trainer.megatron.backend":
            sys.meta_path.remove(self)
            from tests.trainer.megatron import cpu_shim

            cpu_shim.install()
        return None


if os.environ.get("PHYSARUM_MEGATRON_CPU_SHIM") == "1":
    sys.meta_path.insert(0, _InstallShimOnMegatronBackend())
