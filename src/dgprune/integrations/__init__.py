"""dgprune's criteria inside other pruning libraries (see docs/torch_pruning.md)."""

from dgprune.integrations.torch_pruning import DomainImportance

__all__ = ["DomainImportance"]
