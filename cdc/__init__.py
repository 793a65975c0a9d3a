"""outbox-cdc: stream transactional-outbox INSERTs from PostgreSQL to RabbitMQ, confirm-gated."""

from importlib.metadata import PackageNotFoundError, version

try:
    # From the installed package's metadata, so `--version`, `cdc_build_info` and
    # pyproject.toml can never disagree.
    __version__ = version("outbox-cdc")
except PackageNotFoundError:  # pragma: no cover - run from a source tree never installed
    __version__ = "0+unknown"
