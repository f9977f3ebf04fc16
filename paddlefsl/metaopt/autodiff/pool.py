"""Op family: pool (rules being written)."""
