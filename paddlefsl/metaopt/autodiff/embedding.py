"""Op family: embedding (rules being written)."""
