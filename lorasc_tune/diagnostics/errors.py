"""The one error the diagnostics raise for a run folder that lacks what a number or plot needs."""


class DiagnosticsError(RuntimeError):
    """A run directory lacks what a plot needs; the message names the missing file or folder."""
