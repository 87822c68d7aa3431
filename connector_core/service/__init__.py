"""Use cases: one module per area, each a set of functions over the container's ports."""
