"""What every kernel family shares: constants, device queries, argument checks, the Mosaic GPU pipeline."""
