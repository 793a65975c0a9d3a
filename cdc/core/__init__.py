"""Pure rules of the relay: no I/O, no event loop, no clock (callers pass the time)."""
