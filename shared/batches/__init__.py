"""Batches, by concern: ``admission`` (may it be accepted?), ``service`` (create, cancel),
``read`` (counts, the batch object, ETA), ``results`` (the results read model)."""
