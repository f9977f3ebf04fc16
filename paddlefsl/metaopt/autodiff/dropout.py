"""Op family: dropout (rules being written)."""
