"""Errors shared by the checkpoint reader and the architecture analysis (a module of its own: both import it)."""


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used; the message names the folder and what is wrong."""
