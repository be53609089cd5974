"""Checkpoints: the on-disk format, the checkpointer that saves and loads them, resharding and
consolidation into one set of full weights."""
