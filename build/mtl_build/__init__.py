"""mtl-build: config.yaml + labelled data → a Triton model repository for the multi-task classifier."""
