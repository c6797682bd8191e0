"""The seed features built on templates: style metrics (DINO / CLIP), the paper's evaluation
protocol, StyleDrop-style refinement, and retrieval of templates in CLIP space.

May import: ``studio.store``, ``studio.engine``, ``studio.media`` and the bottom modules. Never the
jobs, the API or the UI.
"""
