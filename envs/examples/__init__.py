"""Example agents and environments, written the way a user would write their own."""
