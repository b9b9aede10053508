"""Glue between torch_adamp and other libraries; each submodule imports its library only when called."""
