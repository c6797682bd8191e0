"""The job system: job records on the data folder (``jobs.py``), the Huey queue (``queue.py``),
the GPU worker process with its warm model (``worker.py``) and the supervisor that starts it as a
child process (``supervisor.py``).

May import: ``studio.styles``, ``studio.store``, ``studio.engine``, ``studio.media`` and the bottom
modules. Inside: worker, supervisor -> jobs -> queue (the queue is handed the worker's message handler).
Never the API, the CLI or the UI.
"""
