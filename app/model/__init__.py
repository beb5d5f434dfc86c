"""The mathematics: networks, latent densities, geometry, the five scores and their ONNX graphs."""
