"""Consumer workers for the events the relay publishes (billing metering, notifications)."""
