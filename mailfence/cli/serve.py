"""`mailfence serve`: run the relay in the foreground."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from mailfence import config as config_module
from mailfence.cli.common import EXIT_STARTUP, ConfigOption, fail, load_config
from mailfence.server import Server, StartupError


def serve(config: ConfigOption = None) -> None:
    """Run the relay in the foreground until SIGTERM or Ctrl-C (a second Ctrl-C forces exit).

    SIGHUP reloads users, the certificate and the settings that can change live.

    Example: mailfence serve --config /etc/mailfence/mailfence.toml
    """
    settings = load_config(config)
    logging.basicConfig(
        stream=sys.stdout,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # aiosmtpd logs every command at INFO; that is a debugging aid, not an operator's log.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    path = config
    if path is None and Path(config_module.DEFAULT_CONFIG_NAME).exists():
        path = Path(config_module.DEFAULT_CONFIG_NAME)
    try:
        Server(settings, path).run()
    except StartupError as error:
        fail(str(error), EXIT_STARTUP)
