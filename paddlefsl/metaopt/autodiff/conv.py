"""Op family: conv (rules being written)."""
