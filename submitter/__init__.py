"""whisper-batch submitter: S3 "object created" -> one AWS Batch job per object content.

* :mod:`submitter.app` - the Lambda handler (``submitter.app.handler``), SQS/S3/EventBridge events
* :mod:`submitter.settings` - ``SubmitterSettings.from_env()``, validated at cold start
* :mod:`submitter.rules` - skip rules and THE list of supported extensions
* :mod:`submitter.jobs` - job naming/sizing, SubmitJob, idempotency, injectable ``Clients``
* :mod:`submitter.bulk` - ``whisper-batch submit s3://BUCKET/PREFIX/`` (backfill)

Importing this package imports nothing heavy; the Lambda package holds only this directory
plus ``submitter/requirements.txt`` (powertools; boto3 comes with the Lambda runtime).
"""
