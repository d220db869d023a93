"""Seeing the running relay: live figures, health, history, the control socket, metrics and logs."""
