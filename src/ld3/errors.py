"""The errors a user can fix, shared by every layer (it imports nothing).

``UserError``: reported by the command-line tools as one line and exit status 2. Layers subclass it
for their own mistakes (``ld3.models.registry.ModelError``), so no layer imports another's module
to raise one.
"""


class UserError(Exception):
    """A mistake the user can fix: reported as one line, exit status 2."""


__all__ = ["UserError"]
