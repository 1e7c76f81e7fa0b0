"""FINESegmentation engine: the FINE transformer and everything around it.

Importable with no ``slicer``, ``qt`` or ``ctk``; the Slicer module, the
``fine-seg`` command line and Python scripts all call this package.
"""

__version__ = "0.1.0"
