"""The errors a user can fix, shared by every layer (it imports nothing).

``UserError``: reported by the command-line tools as one line and exit status 2. Layers subclass it
for their own mistakes (``ld3.models.registry.ModelError``), so no layer imports another's module
to raise one.

``PeerFailed``: another process of a torchrun job failed; one line (from rank 0 only) and exit status 1.
"""


class UserError(Exception):
    """A mistake the user can fix: reported as one line, exit status 2."""


class PeerFailed(Exception):
    """Another process of a multi-process job failed: this one stops (one line on rank 0, exit status 1)."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


__all__ = ["UserError", "PeerFailed"]
