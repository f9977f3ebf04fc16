"""Op family: rnn (rules being written)."""
