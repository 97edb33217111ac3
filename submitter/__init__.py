"""whisper-batch submitter: S3 "object created" -> AWS Batch jobs over packs of objects, each
object content in exactly one job.

* :mod:`submitter.app` - the Lambda handler (``submitter.app.handler``), SQS/S3/EventBridge events
* :mod:`submitter.settings` - ``SubmitterSettings.from_env()``, validated at cold start
* :mod:`submitter.rules` - skip rules and THE list of supported extensions
* :mod:`submitter.packs` - which objects share a job (pure): estimate, bounds, balance
* :mod:`submitter.manifest` - the pack manifest the worker reads
* :mod:`submitter.jobs` - job naming, SubmitJob, idempotency claims, ``Outcome``, ``Clients``
* :mod:`submitter.objects` - ``ObjectRef`` (the S3 object every other module takes), ``normalize_etag``
* :mod:`submitter.bulk` - ``whisper-batch submit s3://BUCKET/PREFIX/`` (backfill)

Importing this package imports nothing heavy; the Lambda package holds only this directory
plus ``submitter/requirements.txt`` (powertools; boto3 comes with the Lambda runtime).
"""
