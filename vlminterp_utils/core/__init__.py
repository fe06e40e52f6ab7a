"""The core: loading a VLM and its adapter, the shapes world, reading the model, statistics, files."""
