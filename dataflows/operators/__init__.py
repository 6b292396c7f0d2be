"""Pure operators: input to output and state, no I/O."""
