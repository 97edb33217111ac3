"""``whisper-batch status``: progress, failures and cost read from the markers under an output prefix."""
from batch_job.status.cli import register

__all__ = ["register"]
