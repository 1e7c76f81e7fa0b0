"""Data the engine trains and tests on: synthetic phantoms and dataset layouts."""
from .phantoms import PhantomCase, PhantomGenerator, write_dataset

__all__ = ["PhantomCase", "PhantomGenerator", "write_dataset"]
