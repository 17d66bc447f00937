"""URLs, file formats and artifacts through fsspec: images, inputs, datasets, feature shards, results, outputs."""
