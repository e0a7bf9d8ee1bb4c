"""The one exception type the CLI turns into a single clear line and a non-zero exit."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: the message names the setting and the fix.

    May hold several problems (one per line) so that validation reports all of them at once.
    """

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class ModelUnavailable(UserError):
    """MODEL_NAME is a hub name that is neither cached nor reachable (offline, or a typo).

    ``make info`` still shows resources, tier and settings for it; everything that needs the
    weights stops with the one line, which holds the download command."""

    def __init__(self, problem: str, name: str, command: str):
        super().__init__(problem)
        self.name, self.command = name, command
