"""mailfence: an SMTP submission relay that sheds the bots, never the customers."""

__version__ = "0.1.0"
