"""gate-agent: the turnstile gate controller daemon."""

__version__ = "0.1.0"
