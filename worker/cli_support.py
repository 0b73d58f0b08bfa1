"""Pieces every ``billing-worker`` command group shares: the exit-2 error and settings loading."""

from __future__ import annotations

import click

from worker.errors import BillingError
from worker.settings import Settings, load_settings


class OperatorError(click.ClickException):
    """A one-line error with exit code 2 (bad argument, bad configuration, missing WAL, Redis)."""

    exit_code = 2


def settings_or_exit() -> Settings:
    """The ``BILLING_*`` settings, or :class:`OperatorError` with the one-line reason."""
    try:
        return load_settings()
    except BillingError as error:
        raise OperatorError(str(error)) from None
