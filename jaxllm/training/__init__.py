"""Train state, step function, loop, metrics & MFU, checkpointing."""
