"""The SPADE method: backbones, features, matching, fusion, scoring. No Ray and no fsspec (tests/test_layers.py)."""
