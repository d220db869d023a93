"""`mailfence serve`: run the relay in the foreground."""

from __future__ import annotations

import logging
import sys

from mailfence import config as config_module
from mailfence.cli.common import EXIT_STARTUP, ConfigOption, fail, load_config
from mailfence.observe.logs import TEXT_FORMAT, JsonFormatter, configure_logging
from mailfence.server import Server, StartupError


def serve(config: ConfigOption = None) -> None:
    """Run the relay in the foreground until SIGTERM or Ctrl-C (a second Ctrl-C forces exit).

    SIGHUP reloads users, the certificate and the settings that can change live.

    Example: mailfence serve --config /etc/mailfence/mailfence.toml
    """
    settings = load_config(config)
    # Other libraries' loggers (aiosmtpd's among them) go to the root handler, same format.
    root = logging.StreamHandler(sys.stdout)
    root.setFormatter(
        JsonFormatter() if settings.log.format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    logging.basicConfig(level=logging.WARNING, handlers=[root])
    flood_limiter = configure_logging(
        settings.log.format,
        settings.log.level,
        flood_lines=settings.log.flood_lines,
        flood_window=settings.log.flood_window,
    )
    # aiosmtpd logs every command at INFO; that is a debugging aid, not an operator's log.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    path = config
    if path is None:
        path = config_module.default_path()
    try:
        Server(settings, path, flood_limiter=flood_limiter).run()
    except StartupError as error:
        fail(str(error), EXIT_STARTUP)
