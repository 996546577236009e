"""Faithfulness metrics that score any patch-importance map against the model itself."""

from .insertion_deletion import InsertionDeletion, cell_order, insertion_deletion, insertion_deletion_curves

__all__ = ["InsertionDeletion", "cell_order", "insertion_deletion", "insertion_deletion_curves"]
