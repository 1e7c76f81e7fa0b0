"""The module's Refine section: fix one segment with a box and clicks, undoably.

``logic`` (no Qt: it runs in 3D Slicer and on slicer-core in the tests) holds the sessions and drives the
two refiners on the engine's torch worker; ``widget`` (Qt) is the section of the module's panel. The
module imports them from here; they are a package, not files beside ``FINESegmentation.py``, because
Slicer takes every ``.py`` file of a module folder for a module of its own.
"""
