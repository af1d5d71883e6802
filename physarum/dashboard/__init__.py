"""The live dashboard of a running job: token-protected page, charts and tables over the JSON
API of `physarum.api`."""

from physarum.dashboard.app import create_dashboard_app
from physarum.dashboard.server import DashboardServer

__all__ = ["DashboardServer", "create_dashboard_app"]
