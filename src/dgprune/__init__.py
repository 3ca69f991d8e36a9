"""dgprune: domain-generalized filter pruning of convolutional networks.

Layers (each imports only from those before it): data, models, algorithms, pruning,
training, experiments, report, cli.
"""

__version__ = "0.1.0"
