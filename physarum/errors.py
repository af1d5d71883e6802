"""Errors a user can cause and fix (bad input); the CLI prints them as one line, no traceback."""


class UserError(ValueError):
    """Bad input: the message says what is wrong and what would be right."""


class ClusterError(UserError):
    """The cluster failed the job (a node lost, a rank that never joined, a run dir a node
    cannot see); the message names the node and says what to run next."""
