"""The job schema in one import: `from configs.schema import JobConfig, TrainerConfig, ...`."""

from configs import *  # noqa: F403
from configs import __all__  # noqa: F401
