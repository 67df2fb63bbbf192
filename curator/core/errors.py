"""The errors atelier raises for problems a user can fix; the CLIs turn them into one line and an exit code."""

from __future__ import annotations


class AtelierError(Exception):
    """A problem with the user's input or environment, explained in one sentence."""

    exit_code = 1


class UsageError(AtelierError):
    """A wrong argument, or a resource (model weights, device) that is not available: exit code 2."""

    exit_code = 2


class ManifestError(AtelierError):
    """A manifest file that is missing, unreadable or not of the expected schema."""


class SettingsError(UsageError, ValueError):
    """A settings object given a value it cannot run with. The one error every settings class raises (curator's and
    classify's); a `ValueError` too, so that code catching bad values the standard way still does."""
