"""redrec: RED-Rec, the cross-scenario two-tower recommender of Xu et al. (2025), on CPU first.

Data flows one way: data (adapters, event store) -> mixing -> features -> model -> losses/train
-> embeddings -> retrieval -> eval / serve.  See DESIGN.md in the shared folder and README.md.
"""

from redrec.errors import ConfigError, DataError, RedrecError

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "RedrecError", "__version__"]
