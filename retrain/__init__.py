"""retrain: train an image classifier on your own folders of photos by transfer learning.

The import path stays light (no torch): `retrain label` starts fast.
"""

__version__ = "0.1.0"
