"""ahmount: a versioned store for ML models and datasets, used through ordinary files.

``from ahmount import ah`` gives the documented ``t9k.ah`` API.
"""

__version__ = "0.1.0"
