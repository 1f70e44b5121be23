"""What is wrong with a message, in one wording for every reader: HTTP answers, scoring results
and dead letters.

pydantic reports each error with a location (``loc``) and a message (``msg``); FastAPI's request
validation errors have the same shape. ``problems_of`` turns them into ``Problem``s whose
``field`` is a path such as ``[3].temp`` or ``features.hr``, and ``describe`` into one line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

# A message with thousands of bad values gets a readable answer, not a megabyte of errors.
MAX_REPORTED_PROBLEMS: Final = 50


@dataclass(frozen=True, slots=True)
class Problem:
    """What is wrong with one part of a message: where (``field``) and why (``reason``)."""

    field: str
    reason: str

    def under(self, prefix: str, whole: str = "body") -> Problem:
        """This problem of a part, as a problem of the message holding the part at ``prefix``.

        ``whole`` names the message when the problem is about all of it (no path at all).
        """
        if not prefix:
            return self if self.field else Problem(whole, self.reason)
        if not self.field:
            return Problem(prefix, self.reason)
        separator = "" if self.field.startswith("[") else "."
        return Problem(f"{prefix}{separator}{self.field}", self.reason)


def field_path(location: Iterable[int | str], prefix: str = "") -> str:
    """A pydantic location as a path: ``("features", "hr")`` -> ``features.hr``, ints as ``[3]``."""
    path = prefix
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def problems_of(
    errors: Iterable[Mapping[str, Any]], prefix: str = "", *, whole: str = "body"
) -> list[Problem]:
    """One problem per validation error (``ValidationError.errors()``), paths under ``prefix``.

    ``whole`` names the message itself when an error has no location.
    """
    return [
        Problem(field_path(error.get("loc", ()), prefix) or whole, str(error.get("msg", "invalid")))
        for error in errors
    ]


def capped(problems: Sequence[Problem], limit: int = MAX_REPORTED_PROBLEMS) -> list[Problem]:
    """At most ``limit`` problems, the last saying how many more there were."""
    if len(problems) <= limit:
        return list(problems)
    hidden = len(problems) - limit
    return [*problems[:limit], Problem("body", f"and {hidden} more problems")]


def describe(problems: Sequence[Problem], limit: int = 10) -> str:
    """The problems in one line: ``field: reason; field: reason; and N more``."""
    shown = [f"{problem.field}: {problem.reason}" for problem in problems[:limit]]
    if len(problems) > limit:
        shown.append(f"and {len(problems) - limit} more")
    return "; ".join(shown)
