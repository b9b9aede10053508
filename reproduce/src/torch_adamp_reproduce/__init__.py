"""What the ``torch-adamp`` command runs: the toy problems, the Fashion-MNIST comparison, their plots."""
