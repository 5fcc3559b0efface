"""Convolution engines behind one dispatch function (engine helper fills this)."""
