"""The argument parser of every console script: a bad option is one line and exit status 2, and options are
only taken by their full names, so that a flag added later never changes what an old command line means.

argparse's default takes any unambiguous prefix (`--gpu 0` for `--gpus 0`): a script or a Kubernetes manifest
written that way would stop starting, or start differently, the day another flag shares the prefix. A prefix or
a misspelling is refused instead, with the option it may mean.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import Any

__all__ = ["OneLineParser"]

_UNRECOGNIZED = "unrecognized arguments: "


class OneLineParser(argparse.ArgumentParser):
    """argparse reporting a bad command line as `error_format` (one line, exit status 2, not the usage block of
    every option), full option names only, and the option a prefix or a misspelling may mean."""

    error_format = "{prog}: error: {message} (see --help)"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        self._argv = list(sys.argv[1:] if args is None else args)  # for the suggestion with any error
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(self.error_format.format(prog=self.prog, message=message + self.suggestion(message)) + "\n")
        raise SystemExit(2)

    def suggestion(self, message: str) -> str:
        """'; --gpu: did you mean --gpus?' when the command line has options this parser does not know (argparse
        may report a missing required option first), else ''."""
        known = sorted(_option_names(self))
        words = message[len(_UNRECOGNIZED):].split() if message.startswith(_UNRECOGNIZED) else getattr(
            self, "_argv", [])
        meant = []
        for word in words:
            name = str(word).split("=", 1)[0]
            if not name.startswith("--") or name in known or name == "--":
                continue
            candidates = [k for k in known if k.startswith(name)] or \
                difflib.get_close_matches(name, known, n=1, cutoff=0.7)  # (0.6 took --addr for --draw)
            if len(candidates) == 1:
                meant.append(f"{name}: did you mean {candidates[0]}?")
            elif candidates:
                meant.append(f"{name}: did you mean one of {', '.join(candidates)}?")
        return f"; {' '.join(meant)}" if meant else ""


def _option_names(parser: argparse.ArgumentParser) -> set[str]:
    """Every long option of `parser` and of its sub-commands (an unknown option after a sub-command is reported
    by the main parser)."""
    names = {s for s in parser._option_string_actions if s.startswith("--")}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                names |= _option_names(sub)
    return names
