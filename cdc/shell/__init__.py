"""The relay's I/O: the asyncio shells around the pure rules of :mod:`cdc.core`."""
