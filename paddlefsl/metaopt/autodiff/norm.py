"""Op family: norm (rules being written)."""
