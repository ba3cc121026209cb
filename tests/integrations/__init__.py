"""A package, so that its test_hf.py and tests/peers/test_hf.py import under different names."""
