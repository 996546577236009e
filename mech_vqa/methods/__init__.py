"""Methods: each module implements one published method on top of capture / interventions."""
