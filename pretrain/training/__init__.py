"""The training core: the loop, its state and callbacks, and the pieces it is built from."""
