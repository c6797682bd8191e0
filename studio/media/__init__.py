"""Pictures in and out: reference image loading and validation (formats, EXIF, bombs, resizing) and
comic / meme / name-card composition. Pure Pillow and NumPy.

May import: only the bottom modules (``studio.errors``, ``studio.config``, ``studio.checks``).
"""
