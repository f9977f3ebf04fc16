"""Op family: loss (rules being written)."""
