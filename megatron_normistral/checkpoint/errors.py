"""The checkpoint package's error."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, damaged, or cannot be used as asked (e.g. at
    another layout); the message is one line naming the folder and what to do."""
