"""Step configs, one module per family; `core.compression.spec` joins them into the recipe union."""
