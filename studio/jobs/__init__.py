"""The job system: job records on the data folder (``jobs.py``), the Huey queue (``queue.py``),
the GPU worker process with its warm model and the supervisor that starts it (``worker.py``).

May import: ``studio.styles``, ``studio.store``, ``studio.engine``, ``studio.media`` and the bottom
modules. Inside: worker -> jobs -> queue (the queue is handed the worker's message handler).
Never the API, the CLI or the UI.
"""
