"""The bottom layer: what every other folder may import, and which imports none of them."""
