"""The method and the model work: noise-level samplers (``snr.py``, the paper in one screen), the
training recipe and loop, generation with its options (mixing, fusion, noise prior), the memory
plan, and one module per model family under ``backbones/``.

May import: ``studio.media``, ``studio.config``, ``studio.errors``, ``studio.checks``,
``studio.diskspace``, and torch / diffusers / peft. Never Gradio, Huey or Redis, and nothing of the
store, the jobs or the UI (a function that needs one takes it as an argument).
"""
