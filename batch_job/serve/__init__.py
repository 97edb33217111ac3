"""``whisper-batch serve``: the worker image as a SageMaker inference endpoint.

Real-time, asynchronous and serverless endpoints and Batch Transform all post one audio file per
request to ``/invocations``; one server answers them all. Modules, bottom to top:

* :mod:`~batch_job.serve.contract`  what a request may ask (parameters, content types, ``Accept``)
                                    and the error statuses;
* :mod:`~batch_job.serve.scheduler` :class:`RequestScheduler`: a bounded queue in front of the one
                                    engine thread, which batches the windows of every request in
                                    flight (:class:`~batch_job.stream.TranscriptionStream`);
* :mod:`~batch_job.serve.http`      the Starlette app: ``/ping``, ``/invocations``, logs, metrics;
* :mod:`~batch_job.serve.cli`       the subcommand: settings, port, uvicorn, SIGTERM drain.

docs/serving.md has the contract, the settings and how each SageMaker mode is configured.
"""

from batch_job.serve.cli import register

__all__ = ["register"]
