"""`cnnserve show`: PNG pictures of what the networks see (feature maps, first-layer weights,
Kirsch edges, shift equivariance), drawn with Pillow and numpy alone."""
