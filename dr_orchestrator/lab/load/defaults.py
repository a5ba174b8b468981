"""What the load generator's modules share: its defaults and its error (apart from the package, which
imports those modules when its functions are called)."""

DEFAULT_RATE = 20.0  # requests per second per service
DEFAULT_TIMEOUT = 1.0  # seconds per request: an outage shows as failures, not as a hang


class LoadError(Exception):
    """A load command cannot do what was asked; the message is one sentence for the user."""
