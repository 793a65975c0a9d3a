"""The worker runtime: topology, inbox dedup, retries, parking, shutdown (see ``spec``)."""
