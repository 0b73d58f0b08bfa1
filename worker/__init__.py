"""billing-worker: a fenced, write-ahead-logged Celery billing worker.

See README.md for the user guide and ../shared/DESIGN.md for the contract.
"""

__version__ = "0.1.0"
