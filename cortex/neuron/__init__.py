"""The node plane: one neuron per GPU host."""
