"""Faithfulness metrics that score any patch-importance map against the model itself."""

from .correlation import spearman
from .faithfulness import KNOCKOUT_FRACTIONS, PatchFaithfulness, patch_faithfulness
from .insertion_deletion import (MIN_GAP, InsertionDeletion, cell_order, has_ties, insertion_deletion,
                                 insertion_deletion_curves, tie_orders)

__all__ = ["KNOCKOUT_FRACTIONS", "MIN_GAP", "InsertionDeletion", "PatchFaithfulness", "cell_order", "has_ties",
           "insertion_deletion", "insertion_deletion_curves", "patch_faithfulness", "spearman", "tie_orders"]
